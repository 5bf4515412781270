"""``infer`` against hostile inputs and failing disks: outputs that would replace inputs,
decompression bombs, FIFOs, file-size limits, a full disk, SIGTERM, stale temporaries, huge
batches, a model that fails to load, file modes."""

from __future__ import annotations

import errno
import os
import resource
import signal
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from fcn_deploy.cli import cli
from fcn_deploy.errors import DiskFullError, UsageError
from fcn_deploy.infer.inputs import MARKER_NAME
from fcn_deploy.infer.pipeline import run_inference
from fcn_deploy.runners.base import Runner, TensorSpec, argmax_labels
from fcn_deploy.runners.torch_runner import TorchRunner
from fcn_deploy.infer.segmenter import Segmenter

SMALL = (64, 96)
OVERLAP = 32


@pytest.fixture(scope="module")
def small_runner(checkpoint_path):
    runner = TorchRunner(checkpoint_path, tile_hw=SMALL)
    with runner:
        yield runner


class _ConstantRunner(Runner):
    """Class 4 everywhere; ``on_batch(n)`` is called before batch n (a fault to inject)."""

    name = "const"

    def __init__(self, tile_hw=SMALL, on_batch=None):
        super().__init__()
        self.input_spec = TensorSpec("image", (-1, 3, *tile_hw), "float32")
        self.batches = 0
        self.on_batch = on_batch

    def _activate(self):
        pass

    def _deactivate(self):
        pass

    def _infer(self, tiles, output):
        self.batches += 1
        if self.on_batch:
            self.on_batch(self.batches)
        logits = np.zeros((len(tiles), 21, *tiles.shape[2:]), np.float32)
        logits[:, 4] = 1
        return argmax_labels(logits) if output == "labels" else logits


def _listing(folder):
    """The names in ``folder`` but the marker of an output folder."""
    return sorted(n for n in os.listdir(folder) if n != MARKER_NAME)


def _save(path, h, w, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path




# -- 1. no output replaces an input ------------------------------------------------------------
def test_output_never_replaces_the_input(small_runner, tmp_path):
    """A file named as input, its folder as -o: the output that would replace it fails, by name."""
    photo = _save(tmp_path / "p" / "photo.png", 30, 40)
    other = _save(tmp_path / "p" / "other.jpg", 30, 40, seed=1)
    before = photo.read_bytes()
    summary = run_inference([photo], tmp_path / "p", runner=small_runner, overlap=OVERLAP, progress=False)
    assert photo.read_bytes() == before
    assert [p for p, _ in summary.failed] == [str(photo)]
    assert "would replace the input" in summary.failed[0][1]
    assert summary.images == 0 and other.exists()
    with pytest.raises(UsageError, match="is the input folder"):  # the folder as -o: refused before any work
        run_inference([tmp_path / "p"], tmp_path / "p", runner=small_runner, overlap=OVERLAP, progress=False)
    assert photo.read_bytes() == before and not (tmp_path / "p" / "other.png").exists()


def test_output_hard_link_to_an_input_is_refused(small_runner, tmp_path):
    photo = _save(tmp_path / "in" / "a.jpg", 30, 40)
    (tmp_path / "out").mkdir()
    os.link(photo, tmp_path / "out" / "a.overlay.jpg")  # the overlay would be written through it
    before = photo.read_bytes()
    summary = run_inference([photo], tmp_path / "out", runner=small_runner, overlap=OVERLAP, overlay=True,
                            progress=False)
    assert photo.read_bytes() == before and summary.images == 0 and len(summary.failed) == 1


def test_cli_infer_into_the_input_folder_keeps_the_photo(checkpoint_path, tmp_path):
    photo = _save(tmp_path / "p" / "photo.png", 30, 40)
    before = photo.read_bytes()
    res = CliRunner().invoke(cli, ["infer", str(tmp_path / "p"), "-o", str(tmp_path / "p"), "--backend", "torch",
                                   "--model", str(checkpoint_path)])
    assert res.exit_code == 2 and photo.read_bytes() == before
    assert "is the input folder" in res.output and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1


# -- 3. decompression bombs --------------------------------------------------------------------
def test_decompression_bombs_fail_by_name_and_the_rest_runs(tmp_path, bomb_png):
    root = tmp_path / "in"
    good = _save(root / "good.png", 30, 40)
    bombs = [bomb_png(root / f"bomb{n}.png", n, n) for n in (60000, 50000, 30000)]
    assert all(b.stat().st_size < 1000 for b in bombs)
    summary = run_inference([root], tmp_path / "out", runner=_ConstantRunner(), overlap=OVERLAP, progress=False)
    assert summary.images == 1 and (tmp_path / "out" / "good.png").exists()
    failures = dict(summary.failed)
    assert sorted(failures) == sorted(str(b) for b in bombs)
    for bomb in bombs:
        message = failures[str(bomb)]
        assert "too large" in message and "--max-pixels" in message and "\n" not in message
    assert "900.0 MP exceeds the limit of 134.2 MP" in failures[str(root / "bomb30000.png")]
    assert good.exists()


def test_default_pixel_limit_admits_large_photos():
    from fcn_deploy.images import DEFAULT_MAX_PIXELS, check_size

    check_size("scan.png", 8000, 8000)
    check_size("photo.jpg", 6000, 8000)
    assert 8000 * 8000 <= DEFAULT_MAX_PIXELS < 30000 * 30000


def test_cli_max_pixels_is_enforced_and_can_be_raised(tmp_path):
    from fcn_deploy import images

    _save(tmp_path / "in" / "a.png", 40, 40)
    args = ["infer", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--backend", "torch"]
    try:
        res = CliRunner().invoke(cli, args + ["--max-pixels", "1000", "--model", str(tmp_path / "none.pt")])
        assert res.exit_code == 2  # model missing, but the option parsed
        assert images.max_pixels() == 1000
        assert "40x40 (1600 pixels) exceeds the limit of 1000 pixels" in str(
            pytest.raises(images.ImageTooLargeError, images.load_rgb, tmp_path / "in" / "a.png").value)
        images.set_max_pixels(2000)
        assert images.load_rgb(tmp_path / "in" / "a.png").shape == (40, 40, 3)
    finally:
        images.set_max_pixels(None)


# -- 13. FIFO, disk full, empty folder ----------------------------------------------------------
def test_explicit_fifo_is_rejected_without_opening_it(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    good = _save(tmp_path / "ok.png", 20, 20)
    summary = run_inference([fifo, good], tmp_path / "out", runner=_ConstantRunner(), overlap=OVERLAP,
                            progress=False)  # would block forever if the FIFO were opened
    assert summary.images == 1
    assert "pipe.png" in dict(summary.failed)[str(fifo)] and "not a regular file" in dict(summary.failed)[str(fifo)]


def test_disk_full_stops_at_the_first_image(tmp_path, monkeypatch):
    """ENOSPC from the allocation of the logits file (the syscall fails as on a full disk)."""
    for i in range(4):
        _save(tmp_path / "in" / f"p{i}.png", 100, 150, seed=i)
    calls = []

    def full(fd, offset, size):
        calls.append(size)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(DiskFullError, match=r"p0.logits.npy: No space left on device; the disk is full, stopping"):
        run_inference([tmp_path / "in"], tmp_path / "out", runner=_ConstantRunner(), batch_size=2,
                      overlap=OVERLAP, save_logits=True, workers=1, progress=False)
    assert len(calls) == 1  # no attempt on the next images
    assert _listing(tmp_path / "out") == []  # no temporary left


def test_cli_file_size_limit_on_logits_is_one_line_per_image(checkpoint_path, tmp_path):
    """A real EFBIG in a child process (RLIMIT_FSIZE, SIGXFSZ ignored): the big image's logits
    cannot be allocated, it fails in one line, the small one is written, no temporary is left.
    Before: a sparse memory map, SIGBUS on a full disk and an OSError traceback here."""
    _save(tmp_path / "in" / "big.png", 200, 300)  # logits 21*200*300*2 = 2.5 MB
    _save(tmp_path / "in" / "small.png", 20, 30, seed=1)  # 25 KB

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, 1_000_000))

    res = subprocess.run(
        [sys.executable, "-m", "fcn_deploy", "infer", str(tmp_path / "in"), "-o", str(tmp_path / "out"),
         "--backend", "torch", "--model", str(checkpoint_path), "--save-logits", "--workers", "1"],
        capture_output=True, text=True, preexec_fn=limit, timeout=300,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    assert res.returncode == 1, res.stderr
    assert "Traceback" not in res.stderr
    failed = [ln for ln in res.stderr.splitlines() if ln.startswith("failed:")]
    assert len(failed) == 1 and "big.logits.npy" in failed[0] and "file-size limit" in failed[0]
    out = tmp_path / "out"
    assert _listing(out) == ["small.logits.npy", "small.png"]


def test_model_failing_to_load_leaves_no_output_folder(tmp_path):
    _save(tmp_path / "a.png", 20, 20)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(os.urandom(500))
    res = CliRunner().invoke(cli, ["infer", str(tmp_path / "a.png"), "-o", str(tmp_path / "out"),
                                   "--backend", "torch", "--model", str(bad)])
    assert res.exit_code == 2 and "bad.pt" in res.output
    assert not (tmp_path / "out").exists()


# -- 7. SIGTERM and stale temporaries ----------------------------------------------------------
def test_sigterm_is_handled_like_ctrl_c(tmp_path, monkeypatch):
    for i in range(3):
        _save(tmp_path / "in" / f"p{i}.png", 100, 150, seed=i)

    def terminate(n):
        if n == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    import fcn_deploy.runners as runners

    monkeypatch.setattr(runners, "open_runner", lambda *a, **k: _ConstantRunner(on_batch=terminate))
    before = signal.getsignal(signal.SIGTERM)
    res = CliRunner().invoke(cli, ["infer", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--save-logits",
                                   "--batch-size", "2", "--overlap", "32"])
    assert res.exit_code == 143, res.output
    assert res.stderr.strip().splitlines()[-1] == "terminated (SIGTERM)"
    assert "Traceback" not in res.output
    assert not [p for p in (tmp_path / "out").rglob("*") if p.name.endswith(".tmp")]
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is the CLI's only while it runs


def test_skip_existing_removes_stale_temporaries(tmp_path):
    _save(tmp_path / "in" / "a.png", 20, 20)
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    stale = [out / ".a.png.abcd1234.tmp", out / "sub" / ".b.logits.npy.x_y_z_w1.tmp"]
    foreign = [out / ".notes.txt.abcd1234.tmp", out / "keep.tmp"]
    for p in stale + foreign:
        p.write_bytes(b"left by a killed run")
    summary = run_inference([tmp_path / "in"], out, runner=_ConstantRunner(), overlap=OVERLAP,
                            skip_existing=True, progress=False)
    assert summary.images == 1
    assert not any(p.exists() for p in stale) and all(p.exists() for p in foreign)


# -- 8. modes, 9. batch size --------------------------------------------------------------------
def test_outputs_follow_the_umask(tmp_path):
    _save(tmp_path / "in" / "a.png", 100, 150)
    old = os.umask(0o022)
    try:
        run_inference([tmp_path / "in"], tmp_path / "out", runner=_ConstantRunner(), overlap=OVERLAP, overlay=True,
                      save_logits=True, progress=False)
    finally:
        os.umask(old)
    names = _listing(tmp_path / "out")
    assert names == ["a.logits.npy", "a.overlay.jpg", "a.png"]
    assert {(tmp_path / "out" / n).stat().st_mode & 0o777 for n in names} == {0o644}


def test_huge_batch_size_is_refused_in_one_line(tmp_path):
    with pytest.raises(UsageError, match=r"--batch-size 100000: .* GiB .*use --batch-size \d+ or less"):
        Segmenter(_ConstantRunner(), batch_size=100000, overlap=OVERLAP).prepare()
    Segmenter(_ConstantRunner(), batch_size=64, overlap=OVERLAP).prepare()  # a normal batch is fine


def test_cli_huge_batch_size(checkpoint_path, tmp_path):
    _save(tmp_path / "a.png", 20, 20)
    res = CliRunner().invoke(cli, ["infer", str(tmp_path / "a.png"), "-o", str(tmp_path / "out"), "--backend",
                                   "torch", "--model", str(checkpoint_path), "--batch-size", "100000"])
    assert res.exit_code == 2 and "Traceback" not in res.output
    lines = res.stderr.strip().splitlines()  # "device: cpu (...)" may come first (--device auto)
    assert lines[-1].startswith("error: --batch-size 100000") and [ln for ln in lines if not ln.startswith("device: ")] == lines[-1:]
