"""fcn_deploy.fileio on its own: atomic writes (modes, temporaries, write errors), output-path
checks before work, the overwrite check, file hashing; and errors.first_line."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import resource
import signal
import subprocess
import sys
import textwrap

import pytest

from fcn_deploy import fileio
from fcn_deploy.errors import ArtifactExistsError, DiskFullError, FcnDeployError, OutputWriteError, first_line
from fcn_deploy.fileio import (
    TEMP_NAME,
    atomic_path,
    check_output_file,
    check_writable,
    remove_stale_temps,
    sha256_file,
    write_bytes_atomic,
    write_error,
    write_json_atomic,
)

MIB = 1 << 20


@pytest.mark.parametrize("umask, mode", [(0o027, 0o640), (0o022, 0o644), (0o000, 0o666)])
def test_written_files_follow_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        write_bytes_atomic(tmp_path / "a.bin", b"x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.bin").stat().st_mode & 0o777 == mode  # mkstemp gave 0600


def test_atomic_path_never_reuses_an_existing_temporary(tmp_path, monkeypatch):
    """Two writers drawing the same random name: the second draws again and leaves the first's
    temporary as it was."""
    draws = iter(["aaaaaa", "bbbbbb"])
    monkeypatch.setattr(fileio.secrets, "token_hex", lambda nbytes: next(draws))
    owner = f"{fileio._HOST}-{os.getpid()}"
    other = tmp_path / f".out.bin.{owner}-aaaaaa.tmp"
    other.write_bytes(b"another writer's data")
    with atomic_path(tmp_path / "out.bin") as tmp:
        assert tmp.name == f".out.bin.{owner}-bbbbbb.tmp"
        tmp.write_bytes(b"mine")
    assert other.read_bytes() == b"another writer's data"
    assert (tmp_path / "out.bin").read_bytes() == b"mine"


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


def test_check_output_file_unwritable_folder_any_user(tmp_path, monkeypatch):
    """As test_check_output_file_unwritable_folder, also as root (which the mode bits do not stop):
    the OS answers that the folder cannot be written or searched."""
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access

    def access(path, mode, **kw):  # what the OS says of a 0500 folder to a non-root user
        if os.fspath(path) == os.fspath(locked) and mode & os.W_OK:
            return False
        return real_access(path, mode, **kw)

    monkeypatch.setattr(os, "access", access)
    with pytest.raises(FcnDeployError) as info:
        check_output_file(locked / "sub" / "m.pt", False, "-o")
    assert str(info.value) == f"-o {locked / 'sub' / 'm.pt'}: folder {locked} is not writable"
    assert check_output_file(tmp_path / "m.pt", False, "-o") == tmp_path / "m.pt"


def test_check_output_file_messages_without_an_option(tmp_path):
    with pytest.raises(FcnDeployError) as info:
        check_output_file(tmp_path, True)
    assert str(info.value) == f"{tmp_path} is a directory, expected a file path"
    (tmp_path / "afile").write_text("x")
    with pytest.raises(FcnDeployError) as info:
        check_output_file(tmp_path / "afile" / "r.json", True)
    assert str(info.value) == (f"{tmp_path / 'afile' / 'r.json'}: cannot create a folder there, "
                               f"{tmp_path / 'afile'} is a file")


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


def test_remove_stale_temps_skips_a_temporary_removed_meanwhile(tmp_path, monkeypatch):
    """Two cleaners at once: a temporary the other one removed after the folder was listed is
    neither an error nor reported as removed."""
    gone, stale = tmp_path / ".a.png.00000000.tmp", tmp_path / ".b.png.11111111.tmp"
    gone.write_bytes(b"")
    stale.write_bytes(b"")
    real_walk = os.walk

    def walk(top, *args, **kw):
        for entry in real_walk(top, *args, **kw):
            gone.unlink(missing_ok=True)  # the other cleaner, between listing and unlink
            yield entry

    monkeypatch.setattr(os, "walk", walk)
    assert remove_stale_temps(tmp_path, (".png",)) == [stale]
    assert os.listdir(tmp_path) == []


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


@pytest.mark.parametrize("code, cls, suffix", [
    (errno.ENOSPC, DiskFullError, "; the disk is full, stopping"),
    (errno.EDQUOT, DiskFullError, "; the disk is full, stopping"),
    (errno.EFBIG, OutputWriteError, " (a file-size limit was reached)"),
    (errno.EIO, OutputWriteError, ""),
    (errno.EACCES, OutputWriteError, ""),
    (errno.EROFS, OutputWriteError, ""),
])
def test_write_error_in_atomic_path_is_one_line(tmp_path, code, cls, suffix):
    """An OSError while writing (as tmp.write_bytes on a full disk raises it): one line naming
    the file, the errno kept, the old file kept and no temporary left."""
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(OutputWriteError) as info:
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise OSError(code, os.strerror(code))
    assert type(info.value) is cls
    assert str(info.value) == f"cannot write {target}: {os.strerror(code)}{suffix}"
    assert info.value.errno == code and info.value.disk_full == (cls is DiskFullError)
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["out.bin"]


def test_write_error_without_strerror():
    """An OSError with a message but no errno (as some libraries raise): the message is the reason."""
    exc = write_error("out/m.onnx", OSError("stream closed"))
    assert type(exc) is OutputWriteError
    assert str(exc) == "cannot write out/m.onnx: stream closed" and exc.errno is None


def test_write_error_keeps_other_errors(tmp_path):
    """An OSError that is not the output's fault (here ENOENT) goes through unchanged."""
    with pytest.raises(FileNotFoundError):
        with atomic_path(tmp_path / "out.bin"):
            raise OSError(errno.ENOENT, os.strerror(errno.ENOENT))
    assert os.listdir(tmp_path) == []


def test_first_line_cuts_at_a_word_boundary():
    text = "word " * 100
    line = first_line(ValueError(text), limit=50)
    assert len(line) <= 50 and line.endswith("...")
    assert line[:-3].split(" ")[-1] == "word"  # no word cut in the middle
    assert first_line(ValueError("short\nsecond line")) == "short"
    assert first_line(ValueError("x" * 400), limit=20) == "x" * 17 + "..."
    assert first_line(ValueError("")) == "ValueError"


@pytest.mark.parametrize("size", [0, 1, MIB - 1, MIB, MIB + 1, 2 * MIB + 12345])
def test_sha256_file_hashes_every_byte(tmp_path, size):
    """Files shorter, equal to and longer than the 1 MiB read chunk hash like hashlib on the
    whole content (a hash of the first chunk only would miss a change in the last byte)."""
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()
    if size:
        path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # only the last byte differs
        assert sha256_file(path) != hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_sha256_file_any_chunk_size(tmp_path, chunk):
    data = b"fcn-deploy" * 50  # 500 bytes: several chunks, a partial last one, or one chunk
    (tmp_path / "f").write_bytes(data)
    assert sha256_file(tmp_path / "f", chunk=chunk) == hashlib.sha256(data).hexdigest()


def test_atomic_path_replaces_on_success(tmp_path):
    target = tmp_path / "out.json"
    target.write_text("old")
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp != target  # beside the target: same file system
        assert tmp.name.startswith(".") and tmp.name.endswith(".tmp")  # hidden from "*.json" globs
        tmp.write_text("new")
        assert target.read_text() == "old"  # nothing visible before the block ends
    assert target.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_atomic_path_keeps_the_old_file_on_error(tmp_path):
    target = tmp_path / "model.onnx"
    target.write_bytes(b"good")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("boom")
    assert target.read_bytes() == b"good"
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]  # no temporary file left
    with pytest.raises(KeyboardInterrupt):  # an interrupt cleans up too
        with atomic_path(tmp_path / "new.onnx") as tmp:
            tmp.write_bytes(b"half")
            raise KeyboardInterrupt
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


def test_atomic_path_creates_missing_folders(tmp_path):
    target = tmp_path / "a" / "b" / "c.txt"
    write_bytes_atomic(target, b"x")
    assert target.read_bytes() == b"x"
    write_bytes_atomic(target, b"y")  # the folders exist now: no error
    assert target.read_bytes() == b"y"


def test_atomic_path_names_the_folder_it_cannot_create(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(FcnDeployError, match=r"cannot create folder .*file"):
        write_bytes_atomic(tmp_path / "file" / "sub" / "x.bin", b"x")


def test_write_json_atomic_format(tmp_path):
    path = tmp_path / "meta.json"
    obj = {"z": 1, "a": [1, 2], "m": {"k": None}}
    write_json_atomic(path, obj)
    text = path.read_text()
    assert json.loads(text) == obj
    assert list(json.loads(text)) == ["z", "a", "m"]  # key order kept
    assert text == json.dumps(obj, indent=2) + "\n"  # indented, one trailing newline


def test_check_writable(tmp_path):
    new = tmp_path / "new.bin"
    assert check_writable(str(new), force=False) == new
    new.write_bytes(b"")
    with pytest.raises(ArtifactExistsError, match=r"new\.bin exists; pass --force"):
        check_writable(new, force=False)
    assert check_writable(new, force=True) == new
    with pytest.raises(FcnDeployError, match="is a directory"):
        check_writable(tmp_path, force=True)
    with pytest.raises(FcnDeployError, match="is a directory"):  # with or without --force
        check_writable(tmp_path, force=False)


def test_sha256_file_reads_in_bounded_chunks(tmp_path):
    """Hashing a multi-GB engine must not load it whole: memory stays near the 1 MiB chunk."""
    import tracemalloc

    path = tmp_path / "big.bin"
    path.write_bytes(bytes(12 * MIB))
    tracemalloc.start()
    try:
        digest = sha256_file(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert digest == hashlib.sha256(bytes(12 * MIB)).hexdigest()
    assert peak < 4 * MIB, f"peak {peak / MIB:.1f} MiB"
