"""The data-loss and hang defects of a hostile-user trial, one test (or more) each: outputs
nested in the input tree (1), a concurrent run's temporaries (2), PIL files cut short (3),
file names that are no UTF-8 under Ray (5), unreachable Ray addresses (6), symlinked folders and
broken links (7), ``--skip-existing`` with missing outputs (8), names too long for their
temporaries (10), decode-ahead by bytes (11) and the work limit (12). Each defect's test failed on
the code before its fix (the defect-5 test under Ray is in test_ray.py)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from fcn_deploy import fileio, images
from fcn_deploy.cli import cli
from fcn_deploy.errors import FcnDeployError, UsageError
from fcn_deploy.infer import pipeline
from fcn_deploy.infer.inputs import MARKER_NAME
from fcn_deploy.infer.pipeline import run_inference
from fcn_deploy.runners.base import Runner, TensorSpec, argmax_labels

SMALL = (64, 96)
OVERLAP = 32


class _ConstantRunner(Runner):
    """Class 4 everywhere, as fast as numpy allows; ``on_batch()`` runs before each batch."""

    name = "const"

    def __init__(self, on_batch=None):
        super().__init__()
        self.input_spec = TensorSpec("image", (-1, 3, *SMALL), "float32")
        self.batches = 0
        self.on_batch = on_batch

    def _activate(self):
        pass

    def _deactivate(self):
        pass

    def _infer(self, tiles, output):
        self.batches += 1
        if self.on_batch:
            self.on_batch()
        logits = np.zeros((len(tiles), 21, *tiles.shape[2:]), np.float32)
        logits[:, 4] = 1
        return argmax_labels(logits) if output == "labels" else logits


def _save(path, h=30, w=40, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def _infer(paths, out, **kwargs):
    kwargs.setdefault("runner", _ConstantRunner())
    return run_inference(paths, out, overlap=OVERLAP, progress=False, **kwargs)


def _tree(root):
    """{relative path: bytes} of every file under ``root``."""
    return {os.path.relpath(os.path.join(d, n), root): open(os.path.join(d, n), "rb").read()
            for d, _, names in os.walk(root) for n in names}


# -- 1. an output folder nested in the input tree ----------------------------------------------
def _photo_tree(tmp_path):
    t = tmp_path / "t"
    _save(t / "2024" / "beach.png", seed=1)
    _save(t / "beach.jpg", seed=2)
    return t


@pytest.mark.parametrize("layout", ["output-is-a-photo-folder-inside", "output-above-the-input",
                                    "output-is-a-symlink-into-the-tree", "output-is-a-folder-holding-a-photo"])
def test_an_output_folder_among_the_photos_is_refused_and_no_photo_changes(tmp_path, layout):
    t = _photo_tree(tmp_path)
    if layout == "output-is-a-photo-folder-inside":
        paths, out = [t], t / "2024"
    elif layout == "output-above-the-input":
        paths, out = [t / "2024"], t
    elif layout == "output-is-a-symlink-into-the-tree":
        (tmp_path / "link").symlink_to(t / "2024")
        paths, out = [t], tmp_path / "link"
    else:  # the photo folder is no input, but the folder above it is
        _save(t / "2024" / "deep" / "x.png", seed=3)
        paths, out = [t / "beach.jpg", t / "2024" / "deep"], t / "2024"
    before = _tree(t)
    runner = _ConstantRunner()
    with pytest.raises(UsageError) as info:
        _infer(paths, out, runner=runner)
    assert "\n" not in str(info.value) and str(out) in str(info.value)
    assert _tree(t) == before and runner.batches == 0


def test_cli_output_folder_among_the_photos_is_one_line(checkpoint_path, tmp_path):
    t = _photo_tree(tmp_path)
    before = _tree(t)
    res = CliRunner().invoke(cli, ["infer", str(t), "-o", str(t / "2024"), "--backend", "torch",
                                   "--model", str(checkpoint_path)])
    assert res.exit_code == 2 and "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1
    assert str(t / "2024") in res.output and _tree(t) == before


def test_a_new_output_folder_inside_the_tree_works_and_is_never_read_back(tmp_path):
    t = _photo_tree(tmp_path)
    before = _tree(t)
    for run in range(2):
        summary = _infer([t], t / "preds")
        assert summary.images == 2 and summary.failed == [], run
    assert sorted(p for p in _tree(t / "preds") if not p.startswith(".")) == ["2024/beach.png", "beach.png"]
    assert {k: v for k, v in _tree(t).items() if not k.startswith("preds")} == before


def test_an_earlier_runs_output_folder_in_the_tree_is_no_input(tmp_path):
    t = _photo_tree(tmp_path)
    assert _infer([t], t / "2024" / "run1").images == 2
    (t / "2024" / "run2").mkdir()  # empty: a legal -o inside the photo folder
    summary = _infer([t], t / "2024" / "run2")
    assert summary.images == 2 and summary.failed == []
    assert sorted(p for p in _tree(t / "2024" / "run2") if not p.startswith(".")) == ["2024/beach.png", "beach.png"]


def test_a_folder_of_photos_as_output_is_never_marked(tmp_path):
    """``infer t/2024/beach.png -o t`` is legal (no output replaces an input), but ``t`` holds the
    user's photos: marking it as an output folder would hide them from every later walk."""
    t = _photo_tree(tmp_path)
    assert _infer([t / "2024" / "beach.png"], t).images == 1
    assert not (t / MARKER_NAME).exists()
    summary = _infer([tmp_path], tmp_path / "out")
    assert sorted(p for p in _tree(tmp_path / "out") if not p.startswith(".")) == ["t/2024/beach.png"]
    # t's photos are still walked: beach.jpg and the mask beside it clash on their output name
    assert sorted(p for p, _ in summary.failed) == [str(t / "beach.jpg"), str(t / "beach.png")]


# -- 2. a concurrent run's temporaries ----------------------------------------------------------
def test_cleanup_keeps_a_live_runs_temporary_and_removes_a_dead_ones(tmp_path):
    out = tmp_path / "oc"
    photo = _save(tmp_path / "x.jpg")
    with fileio.atomic_path(out / "huge.logits.npy") as held:  # a first run, writing
        held.write_bytes(b"173 tiles of work")
        stale = out / ".dead.logits.npy.0123abcd.tmp"  # a killed run's, unlocked
        stale.write_bytes(b"x")
        summary = _infer([photo], out, skip_existing=True, save_logits=True)
        assert summary.images == 1
        assert held.read_bytes() == b"173 tiles of work"
        assert not stale.exists()
    assert (out / "huge.logits.npy").read_bytes() == b"173 tiles of work"


# -- 3. files that PIL writes, on a disk that fills up -------------------------------------------
_FSIZE_CHILD = """
import resource, signal, sys
import numpy as np
from fcn_deploy.errors import FcnDeployError
from fcn_deploy.infer.outputs import write_overlay
from fcn_deploy.defaults import VOC_COLORMAP
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (8192, 8192))
rgb = np.random.default_rng(0).integers(0, 256, (150, 200, 3), dtype=np.uint8)
try:
    write_overlay(sys.argv[1], rgb, np.zeros((150, 200), np.uint8), VOC_COLORMAP)
except FcnDeployError as exc:
    print(type(exc).__name__, exc)
"""


def test_an_overlay_cut_short_by_the_disk_is_an_error_and_leaves_nothing(tmp_path):
    """A real short write (RLIMIT_FSIZE, SIGXFSZ ignored, in a child): a JPEG smaller than PIL's
    64 KiB buffer goes out in one write(), cut short at the limit, which PIL's encoder ignores.
    The bytes are checked, so the write fails in one line and nothing is left."""
    target = tmp_path / "p.overlay.jpg"
    res = subprocess.run([sys.executable, "-c", _FSIZE_CHILD, str(target)], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("OutputWriteError") and "p.overlay.jpg" in res.stdout, res.stdout
    assert os.listdir(tmp_path) == []


def test_save_image_writes_what_pil_encodes(tmp_path):
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (50, 70, 3), dtype=np.uint8))
    fileio.save_image(tmp_path / "a.png", img, "PNG")
    with Image.open(tmp_path / "a.png") as back:
        assert np.array_equal(np.asarray(back), np.asarray(img))


# -- 5. file names that are no UTF-8, in the Ray manifest -----------------------------------------
def test_manifest_of_a_name_that_is_no_utf8_round_trips():
    from fcn_deploy.infer.ray import MANIFEST_FIELDS, manifest_bytes

    name = os.fsdecode(b"in/bad\xffbyte.jpg")
    row = {k: 0 for k in MANIFEST_FIELDS} | {"input": name, "output": "out/bad\udcffbyte.png"}
    data = manifest_bytes([row, row | {"input": "in/café.jpg"}])
    first, second = (json.loads(line) for line in data.decode("utf-8").splitlines())
    assert os.fsencode(first["input"]) == b"in/bad\xffbyte.jpg"
    assert os.fsencode(first["output"]) == b"out/bad\xffbyte.png"
    assert second["input"] == "in/café.jpg" and "café".encode() in data


# -- 6. a Ray address where nothing (or no Ray) answers ---------------------------------------------
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def listener():
    """(port, stop) of a TCP server on 127.0.0.1: ``mode`` "close" accepts and closes at once,
    "silent" accepts and never answers."""
    servers = []

    def start(mode):
        server = socket.socket()
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        held = []

        def serve():
            while True:
                try:
                    conn, _ = server.accept()
                except OSError:
                    return
                if mode == "close":
                    conn.close()
                else:
                    held.append(conn)

        threading.Thread(target=serve, daemon=True).start()
        servers.append((server, held))
        return server.getsockname()[1]

    yield start
    for server, held in servers:
        server.close()
        for conn in held:
            conn.close()


@pytest.mark.parametrize("mode", ["nothing", "close", "silent"])
def test_an_address_where_no_ray_answers_fails_in_one_line_within_seconds(listener, mode):
    from fcn_deploy.distributed import probe_cluster

    port = _free_port() if mode == "nothing" else listener(mode)
    start = time.monotonic()
    with pytest.raises(FcnDeployError) as info:
        probe_cluster(f"127.0.0.1:{port}", timeout=2)
    assert time.monotonic() - start < 10
    message = str(info.value)
    assert f"127.0.0.1:{port}" in message and "\n" not in message and "Ray" in message
    with pytest.raises(FcnDeployError, match=f"--ray ray://127.0.0.1:{port}: cannot join"):
        probe_cluster(f"ray://127.0.0.1:{port}", timeout=2)


def test_without_grpcio_an_address_where_nothing_listens_fails_in_one_line(monkeypatch):
    from fcn_deploy.distributed import probe_cluster

    monkeypatch.setitem(sys.modules, "grpc", None)  # import grpc raises ImportError
    port = _free_port()
    with pytest.raises(FcnDeployError, match=f"127.0.0.1:{port}: nothing listens there"):
        probe_cluster(f"127.0.0.1:{port}", timeout=2)


def test_cli_infer_on_an_unreachable_ray_address_exits_in_one_line(checkpoint_path, tmp_path):
    """Before: ``--ray=127.0.0.1:1`` hung for more than 10 minutes printing GCS warnings."""
    photo = _save(tmp_path / "x.jpg")
    port = _free_port()
    res = subprocess.run([sys.executable, "-m", "fcn_deploy", "infer", str(photo), "-o", str(tmp_path / "o"),
                          "--backend", "torch", "--model", str(checkpoint_path), f"--ray=127.0.0.1:{port}"],
                         capture_output=True, text=True, timeout=90)
    assert res.returncode != 0 and "Traceback" not in res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and f"127.0.0.1:{port}" in lines[0], res.stderr


# -- 7. symlinked folders and broken links -------------------------------------------------------
def test_a_symlinked_folder_is_followed_and_a_broken_link_is_reported(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    _save(elsewhere / "far.png")
    root = tmp_path / "in"
    _save(root / "near.png", seed=1)
    (root / "linked").symlink_to(elsewhere, target_is_directory=True)
    (root / "photo.jpg").symlink_to(tmp_path / "gone.jpg")
    summary = _infer([root], tmp_path / "out")
    assert summary.images == 2
    assert (tmp_path / "out" / "linked" / "far.png").is_file() and (tmp_path / "out" / "near.png").is_file()
    assert [p for p, _ in summary.failed] == [str(root / "photo.jpg")]
    assert "broken symbolic link" in summary.failed[0][1]


# -- 8. --skip-existing and outputs never written -------------------------------------------------
def test_skip_existing_writes_the_outputs_a_earlier_run_did_not(tmp_path):
    photo = _save(tmp_path / "camA" / "IMG_0001.jpg")
    out = tmp_path / "sk"
    assert _infer([photo.parent], out).images == 1
    summary = _infer([photo.parent], out, overlay=True, save_logits=True, skip_existing=True)
    assert summary.images == 1 and summary.skipped == 0
    assert (out / "IMG_0001.overlay.jpg").is_file() and (out / "IMG_0001.logits.npy").is_file()
    again = _infer([photo.parent], out, overlay=True, save_logits=True, skip_existing=True)
    assert again.images == 0 and again.skipped == 1


# -- 10. long names ---------------------------------------------------------------------------------
def test_a_long_legal_name_is_written_and_a_too_long_one_fails_before_inference(tmp_path):
    limit = fileio.name_max(tmp_path)
    stem = "a" * (limit - len(".png"))  # the mask's name is exactly as long as the system allows
    long_ok = _save(tmp_path / "in" / f"{stem}.jpg")
    summary = _infer([long_ok], tmp_path / "out")
    assert summary.images == 1 and summary.failed == []
    assert (tmp_path / "out" / f"{stem}.png").is_file()
    assert not [n for n in os.listdir(tmp_path / "out") if n.endswith(".tmp")]
    runner = _ConstantRunner()
    summary = _infer([long_ok], tmp_path / "out2", overlay=True, runner=runner)  # .overlay.jpg: too long
    assert summary.images == 0 and runner.batches == 0
    assert len(summary.failed) == 1 and "more than the" in summary.failed[0][1]


# -- 11. decode-ahead bounded by bytes, not by --workers -----------------------------------------
def test_decoding_ahead_is_bounded_by_bytes_whatever_the_workers(tmp_path, monkeypatch):
    for i in range(20):
        _save(tmp_path / "in" / f"p{i:02}.png", 100, 150, seed=i)
    decoded = []
    real_load = pipeline.load_rgb
    monkeypatch.setattr(pipeline, "load_rgb", lambda path: decoded.append(path) or real_load(path))
    monkeypatch.setattr(pipeline, "DECODE_AHEAD_BYTES", 100 * 150 * 3, raising=False)
    at_first_batch = []
    runner = _ConstantRunner(on_batch=lambda: at_first_batch.append(len(decoded)) if not at_first_batch else None)
    summary = _infer([tmp_path / "in"], tmp_path / "out", runner=runner, workers=8, batch_size=4)
    assert summary.images == 20
    assert at_first_batch[0] <= 3, at_first_batch  # before: workers + 2 = 10 whole images ahead


# -- 12. the work limit ----------------------------------------------------------------------------
def test_a_thin_image_within_the_pixel_limit_is_refused_for_its_tiles(tmp_path, monkeypatch):
    monkeypatch.setattr(images, "_max_pixels", images.max_pixels())
    images.set_max_pixels(100_000)
    thin = tmp_path / "thin.png"
    Image.new("RGB", (50_000, 1)).save(thin)  # 50,000 pixels: half the pixel limit
    runner = _ConstantRunner()
    summary = _infer([thin, _save(tmp_path / "ok.png")], tmp_path / "out", runner=runner)
    assert summary.images == 1
    assert [p for p, _ in summary.failed] == [str(thin)]
    message = summary.failed[0][1]
    assert "too much work" in message and "--max-tiles" in message and "\n" not in message
    assert runner.batches == 1  # the thin image never reached the model
    summary = _infer([thin], tmp_path / "out2", max_tiles=10_000)
    assert summary.images == 1


# -- smaller ones ----------------------------------------------------------------------------------
def test_cli_empty_output_and_missing_input_leave_nothing(checkpoint_path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    photo = _save(tmp_path / "x.jpg")
    res = CliRunner().invoke(cli, ["infer", str(photo), "-o", "", "--backend", "torch",
                                   "--model", str(checkpoint_path)])
    assert res.exit_code == 2 and "-o" in res.output and "Traceback" not in res.output
    assert sorted(os.listdir(tmp_path)) == ["x.jpg"]
    res = CliRunner().invoke(cli, ["infer", str(tmp_path / "nope"), "-o", "predictions", "--backend", "torch",
                                   "--model", str(checkpoint_path)])
    assert res.exit_code != 0 and "nope" in res.output and "Traceback" not in res.output
    assert sorted(os.listdir(tmp_path)) == ["x.jpg"]


def test_pil_warnings_are_one_line_naming_their_file(checkpoint_path, tmp_path):
    exif = Image.Exif()
    exif[0x010E] = "x" * 200  # ImageDescription, then cut: PIL warns "Tag data larger than file"
    photo = tmp_path / "odd.jpg"
    Image.new("RGB", (40, 30), (10, 20, 30)).save(photo, exif=exif.tobytes()[:-150])
    res = subprocess.run([sys.executable, "-m", "fcn_deploy", "infer", str(photo), "-o", str(tmp_path / "out"),
                          "--backend", "torch", "--model", str(checkpoint_path)],
                         capture_output=True, text=True, timeout=120)  # pytest would catch the warnings itself
    assert res.returncode == 0, res.stderr
    warned = [ln for ln in res.stderr.splitlines() if "Tag data" in ln]
    assert len(warned) == 1 and warned[0].startswith(f"warning: {photo}: "), res.stderr
    assert "TiffImagePlugin" not in res.stderr


def test_progress_bar_is_off_when_stderr_is_no_terminal(capsys):
    bar = pipeline.progress_bar(3, show=True)
    bar.update(3)
    bar.close()
    assert capsys.readouterr().err == ""  # pytest's captured stderr is no terminal
