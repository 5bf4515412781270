"""Atomic writes, overwrite policy and hashing shared by every command that writes a file.

A file is written under a temporary name beside it, ``.<name>.<8 random characters>.tmp``
(:data:`TEMP_NAME`), then renamed over its final path, so a reader never sees a half-written
file. The temporary file is created with mode 0666 minus the process umask, as any normal write
would be. A killed process (SIGKILL) can leave such temporaries behind:
:func:`remove_stale_temps` removes them.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import secrets
from pathlib import Path
from typing import Iterable, Iterator

from fcn_deploy.errors import (
    ArtifactExistsError,
    DiskFullError,
    DISK_FULL_ERRNOS,
    FcnDeployError,
    OutputWriteError,
)

#: Name of a temporary file of :func:`atomic_path`: group ``name`` is the final file's name
#: (the random part was 8 characters of ``[a-z0-9_]`` from ``tempfile.mkstemp`` in older runs,
#: 8 hex digits now).
TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp$")

#: errno values of a failed write that are the output's fault, not the program's: reported in
#: one line as an :class:`~fcn_deploy.errors.OutputWriteError`.
WRITE_ERRNOS = DISK_FULL_ERRNOS | {errno.EFBIG, errno.EIO, errno.EROFS, errno.EACCES, errno.EPERM}


def check_output_file(path: str | os.PathLike, force: bool, option: str | None = None) -> Path:
    """Check, before any work, that a file can be written at ``path``; return it as a Path.

    Refuses (one-line :class:`~fcn_deploy.errors.FcnDeployError` naming ``option``, e.g.
    ``"--report"``, and the path): an existing file without ``force``
    (:class:`~fcn_deploy.errors.ArtifactExistsError`), a directory, and a parent folder that
    cannot be created or written (its nearest existing ancestor is a file or not writable).
    Creates nothing.
    """
    path = Path(path)
    what = f"{option} {path}" if option else str(path)
    if path.is_dir():
        raise FcnDeployError(f"{what} is a directory, expected a file path")
    if path.exists() and not force:
        raise ArtifactExistsError(f"{path} exists; pass --force to overwrite it")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise FcnDeployError(f"{what}: cannot create a folder there, {parent} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise FcnDeployError(f"{what}: folder {parent} is not writable")
    return path


def check_writable(path: str | os.PathLike, force: bool) -> Path:
    """:func:`check_output_file` without an option name (kept for existing callers)."""
    return check_output_file(path, force)


def write_error(path: str | os.PathLike, exc: OSError) -> OutputWriteError:
    """The one-line error for an OSError raised while writing ``path``:
    :class:`~fcn_deploy.errors.DiskFullError` when the disk is full."""
    reason = exc.strerror or str(exc)
    if exc.errno in DISK_FULL_ERRNOS:
        return DiskFullError(f"cannot write {path}: {reason}; the disk is full, stopping", exc.errno)
    if exc.errno == errno.EFBIG:
        reason += " (a file-size limit was reached)"
    return OutputWriteError(f"cannot write {path}: {reason}", exc.errno)


def _create_temp(path: Path) -> Path:
    """Create (exclusively, mode 0666 minus the umask) and return a :data:`TEMP_NAME` file
    beside ``path``."""
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it over ``path``.

    On any exception (KeyboardInterrupt and SIGTERM included) the temporary file is removed and
    ``path`` is left as it was, so a reader never sees a half-written artifact. An OSError of a
    full disk, a file-size limit or an I/O error while writing becomes a one-line
    :class:`~fcn_deploy.errors.OutputWriteError`.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FcnDeployError(f"cannot create folder {path.parent}: {exc.strerror}") from None
    try:
        tmp_path = _create_temp(path)
    except OSError as exc:
        raise FcnDeployError(f"cannot write in {path.parent}: {exc.strerror}") from None
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp_path.unlink()
        if isinstance(exc, OSError) and exc.errno in WRITE_ERRNOS:
            raise write_error(path, exc) from None
        raise


def remove_stale_temps(folder: str | os.PathLike, suffixes: Iterable[str] = ("",)) -> list[Path]:
    """Remove the :data:`TEMP_NAME` files under ``folder`` (recursively) whose final name ends
    with one of ``suffixes``: what a killed run (SIGKILL, power loss) left. Returns them."""
    suffixes = tuple(suffixes)
    removed: list[Path] = []
    for root, _, files in os.walk(folder):
        for name in files:
            m = TEMP_NAME.match(name)
            if m and m.group("name").endswith(suffixes):
                tmp = Path(root) / name
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
                    removed.append(tmp)
    return removed


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
