"""Atomic writes (modes, temporaries, write errors), output-path checks before work, one-line
error text."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import textwrap

import pytest

from fcn_deploy.errors import ArtifactExistsError, FcnDeployError, first_line
from fcn_deploy.fileio import TEMP_NAME, atomic_path, check_output_file, remove_stale_temps, write_bytes_atomic


@pytest.fixture()
def umask_027():
    old = os.umask(0o027)
    yield
    os.umask(old)


def test_written_files_follow_the_umask(tmp_path, umask_027):
    write_bytes_atomic(tmp_path / "a.bin", b"x")
    assert (tmp_path / "a.bin").stat().st_mode & 0o777 == 0o640  # mkstemp gave 0600


def test_check_output_file_before_any_work(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(FcnDeployError, match=r"--report .*afile/r.json: cannot create a folder there, .*afile is a file"):
        check_output_file(afile / "r.json", False, "--report")
    with pytest.raises(FcnDeployError, match=r"afile/deeper/r.json: cannot create a folder there"):
        check_output_file(afile / "deeper" / "r.json", True, "--grid")
    with pytest.raises(ArtifactExistsError, match="afile exists; pass --force"):
        check_output_file(afile, False, "-o")
    assert check_output_file(afile, True, "-o") == afile
    with pytest.raises(FcnDeployError, match="is a directory"):
        check_output_file(tmp_path, True, "-o")
    new = tmp_path / "new" / "folders" / "out.json"
    assert check_output_file(new, False, "--report") == new
    assert not (tmp_path / "new").exists()  # nothing created by the check


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_check_output_file_unwritable_folder(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(FcnDeployError, match="locked is not writable"):
            check_output_file(locked / "sub" / "m.pt", False, "-o")
    finally:
        locked.chmod(0o700)


def test_interrupt_leaves_no_temporary(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(tmp_path / "m.pt") as tmp:
            assert TEMP_NAME.match(tmp.name).group("name") == "m.pt"
            tmp.write_bytes(b"half")
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == []


def test_remove_stale_temps_only_touches_our_pattern(tmp_path):
    (tmp_path / "sub").mkdir()
    stale = [tmp_path / ".a.png.k2j4_x9q.tmp", tmp_path / "sub" / ".b.logits.npy.0123abcd.tmp"]
    kept = [tmp_path / ".a.png.tmp", tmp_path / "notes.tmp", tmp_path / ".x.json.0123abcd.tmp",
            tmp_path / "a.png", tmp_path / ".a.png.toolongrandom.tmp"]
    for p in stale + kept:
        p.write_bytes(b"")
    removed = remove_stale_temps(tmp_path, (".png", ".logits.npy"))
    assert sorted(removed) == sorted(stale)
    assert all(p.exists() for p in kept) and not any(p.exists() for p in stale)


def test_file_size_limit_is_one_line_and_leaves_no_temporary(tmp_path):
    """A real EFBIG: a child process with RLIMIT_FSIZE (SIGXFSZ ignored, as a shell may do)."""
    script = textwrap.dedent(f"""
        from fcn_deploy.errors import OutputWriteError
        from fcn_deploy.fileio import write_bytes_atomic
        try:
            write_bytes_atomic({str(tmp_path / "big.bin")!r}, bytes(200_000))
        except OutputWriteError as exc:
            print("ERROR", exc)
    """)

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, preexec_fn=limit,
                         env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("ERROR cannot write ") and "big.bin" in res.stdout
    assert "file-size limit" in res.stdout
    assert os.listdir(tmp_path) == []


def test_first_line_cuts_at_a_word_boundary():
    text = "word " * 100
    line = first_line(ValueError(text), limit=50)
    assert len(line) <= 50 and line.endswith("...")
    assert line[:-3].split(" ")[-1] == "word"  # no word cut in the middle
    assert first_line(ValueError("short\nsecond line")) == "short"
    assert first_line(ValueError("x" * 400), limit=20) == "x" * 17 + "..."
    assert first_line(ValueError("")) == "ValueError"
