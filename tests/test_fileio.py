"""Atomic writes, the overwrite check and file hashing (fcn_deploy.fileio) on their own."""

from __future__ import annotations

import hashlib
import json

import pytest

from fcn_deploy.errors import ArtifactExistsError, FcnDeployError
from fcn_deploy.fileio import (atomic_path, check_writable, sha256_file, write_bytes_atomic,
                               write_json_atomic)

MIB = 1 << 20


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
    with pytest.raises(ArtifactExistsError):  # a folder is an existing path, too
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
