"""Atomic, verified writes, overwrite policy, the output-path rule and hashing shared by every
command that writes a file.

**Temporaries.** A file is written under a hidden temporary name beside it, then renamed over its
final path, so a reader never sees a half-written file:
``.<name>.<host>-<pid>-<random>.tmp`` (:data:`TEMP_NAME`; ``<host>`` is 6 hex digits of a hash
of the host name, ``<pid>`` the writing process). When that would exceed the file system's
``NAME_MAX`` (255 bytes on most), ``<name>`` is cut to fit and ends with ``~`` and 8 hex digits of
a hash of the full name, so a temporary can always be created whatever the final name's length.
The writer holds an advisory lock (``flock``) on its temporary until the rename: a concurrent
run's :func:`remove_stale_temps` removes only temporaries nobody holds (what a killed run,
SIGKILL or power loss, left), never a live run's. The temporary is created with mode 0666 minus
the process umask, as any normal write would be.

**Verified bytes.** :func:`write_bytes_atomic`, :func:`atomic_file` and :func:`save_image` write
through a loop that checks every ``write()``'s count and, before the rename, that the file on disk
has exactly the bytes written: a short write (a full disk; PIL's C encoders ignore short writes,
which is why images are encoded into memory first) is an error, never a truncated file renamed
into place.

**The output-path rule** (:func:`check_output_location`): no output may be, or lie under, an
input file, and no output folder may be or contain an input folder; symlinks are resolved.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import re
import secrets
import socket
from pathlib import Path
from typing import Any, Iterable, Iterator

try:  # POSIX: the advisory lock that marks a temporary as in use
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: temporaries are judged by their pid only
    fcntl = None

from fcn_deploy.errors import (
    ArtifactExistsError,
    DiskFullError,
    DISK_FULL_ERRNOS,
    FcnDeployError,
    OutputWriteError,
    UsageError,
)

#: Name of a temporary file of :func:`atomic_path`: group ``name`` is the final file's name (cut
#: to fit NAME_MAX and ending ``~<8 hex>`` when it is too long), ``host`` and ``pid`` its
#: writer's; temporaries of older versions (``.<name>.<8 characters of [a-z0-9_]>.tmp``, no
#: owner) match too, without ``host`` and ``pid``.
TEMP_NAME = re.compile(
    r"^\.(?P<name>.+)\.(?:(?P<host>[0-9a-f]{6})-(?P<pid>[0-9]+)-[0-9a-f]{6}|[a-z0-9_]{8})\.tmp$", re.S)
#: The end of a ``name`` group that was cut to fit NAME_MAX.
_CUT_NAME = re.compile(r"~[0-9a-f]{8}$")
#: NAME_MAX where the file system does not say.
DEFAULT_NAME_MAX = 255
#: PATH_MAX where the system does not say.
DEFAULT_PATH_MAX = 4096

#: errno values of a failed write that are the output's fault, not the program's: reported in
#: one line as an :class:`~fcn_deploy.errors.OutputWriteError`.
WRITE_ERRNOS = DISK_FULL_ERRNOS | {errno.EFBIG, errno.EIO, errno.EROFS, errno.EACCES, errno.EPERM}
#: errno values of flock() on a file system without advisory locks.
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS, errno.EBADF}


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


def _pathconf(folder: str | os.PathLike, name: str, default: int) -> int:
    """``os.pathconf(name)`` of ``folder``'s file system (its nearest existing ancestor's), or
    ``default`` where it does not say."""
    folder = os.path.abspath(folder)
    while not os.path.isdir(folder) and os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
    try:
        value = os.pathconf(folder, name)
    except (OSError, ValueError, AttributeError):
        return default
    return value if value and value > 0 else default


def name_max(folder: str | os.PathLike) -> int:
    """The longest file name, in bytes, the file system of ``folder`` (or of its nearest
    existing ancestor) allows: ``NAME_MAX``, :data:`DEFAULT_NAME_MAX` where it does not say."""
    return _pathconf(folder, "PC_NAME_MAX", DEFAULT_NAME_MAX)


def path_max(folder: str | os.PathLike) -> int:
    """``PATH_MAX`` of ``folder``'s file system (:data:`DEFAULT_PATH_MAX` where it does not say)."""
    return _pathconf(folder, "PC_PATH_MAX", DEFAULT_PATH_MAX)


def name_too_long(path: str | os.PathLike, limit: int | None = None) -> str | None:
    """Why ``path`` cannot be created (its last component longer than NAME_MAX bytes, or the
    whole path longer than PATH_MAX), in words; None when it can."""
    path = os.path.abspath(path)
    name = os.fsencode(os.path.basename(path))
    folder = os.path.dirname(path)
    limit = name_max(folder) if limit is None else limit
    if len(name) > limit:
        return f"its name is {len(name)} bytes long, more than the {limit} the file system allows"
    total = len(os.fsencode(path))
    longest = path_max(folder)
    if total >= longest:
        return f"its path is {total} bytes long, more than the {longest - 1} the system allows"
    return None


_HOST = hashlib.sha1(socket.gethostname().encode("utf-8", "surrogateescape")).hexdigest()[:6]


def _temp_name(final: str, limit: int) -> str:
    """``.<final>.<host>-<pid>-<6 hex>.tmp`` (:data:`TEMP_NAME`), with ``final`` cut to fit
    ``limit`` bytes (and ``~<8 hex of its hash>`` appended) when it is too long."""
    owner = f".{_HOST}-{os.getpid()}-{secrets.token_hex(3)}.tmp"
    encoded = os.fsencode(final)
    room = limit - 1 - len(owner)
    if len(encoded) > room:
        digest = "~" + hashlib.sha1(encoded).hexdigest()[:8]
        encoded = encoded[: max(1, room - len(digest))]
        final = os.fsdecode(encoded) + digest  # a cut multi-byte character stays bytes (surrogateescape)
    return f".{final}{owner}"


def _lock(fd: int, block: bool) -> bool | None:
    """flock(LOCK_EX) ``fd``: True when locked, False when another holder has it (``block``
    False), None when the file system has no advisory locks."""
    if fcntl is None:  # pragma: no cover - not POSIX
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if block else fcntl.LOCK_NB))
        return True
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return False
        if exc.errno in _NO_LOCKS:
            return None
        raise


def _create_temp(path: Path) -> tuple[Path, int]:
    """Create (exclusively, mode 0666 minus the umask) a :data:`TEMP_NAME` file beside ``path``
    and lock it (flock, held until the returned descriptor is closed); returns (its path, the
    descriptor)."""
    limit = name_max(path.parent)
    while True:
        tmp = path.parent / _temp_name(path.name, limit)
        try:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
        except FileExistsError:
            continue
        try:
            _lock(fd, block=True)  # a cleaner holding it for a moment is waited for
            same = os.fstat(fd).st_ino == os.stat(tmp).st_ino
        except FileNotFoundError:  # a cleaner removed it between our open and our lock: draw again
            same = False
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        if same:
            return tmp, fd
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it over ``path``.

    On any exception (KeyboardInterrupt and SIGTERM included) the temporary file is removed and
    ``path`` is left as it was, so a reader never sees a half-written artifact. An OSError of a
    full disk, a file-size limit or an I/O error while writing becomes a one-line
    :class:`~fcn_deploy.errors.OutputWriteError`. The temporary is locked (flock) until the
    rename, so :func:`remove_stale_temps` in a concurrent run leaves it alone.

    Writers that write by path (PIL, ``np.save``) are not verified here: use
    :func:`atomic_file`, :func:`write_bytes_atomic` or :func:`save_image`, which are.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FcnDeployError(f"cannot create folder {path.parent}: {exc.strerror}") from None
    try:
        tmp_path, lock_fd = _create_temp(path)
    except OSError as exc:
        if exc.errno in DISK_FULL_ERRNOS:
            raise write_error(path, exc) from None
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
    finally:
        os.close(lock_fd)


class CheckedFile(io.RawIOBase):
    """A write-only binary file over a descriptor whose :meth:`write` writes every byte it is
    given (looping over short writes; a write of 0 bytes is ENOSPC) and counts them."""

    def __init__(self, fd: int) -> None:
        super().__init__()
        self.fd = fd
        self.written = 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        total = len(view)
        while view:
            n = os.write(self.fd, view)
            if n <= 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            view = view[n:]
        self.written += total
        return total

    def tell(self) -> int:
        return self.written


def _verify(fd: int, expected: int) -> None:
    """Raise OSError(EIO) unless the file of ``fd`` holds ``expected`` bytes."""
    size = os.fstat(fd).st_size
    if size != expected:
        raise OSError(errno.EIO, f"{size} bytes on disk after writing {expected} (a short write)")


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[CheckedFile]:
    """:func:`atomic_path` with a :class:`CheckedFile` open on the temporary: every write is
    checked, and before the rename the size on disk must equal the bytes written."""
    with atomic_path(path) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0))
        try:
            file = CheckedFile(fd)
            yield file
            _verify(fd, file.written)
        finally:
            os.close(fd)  # an error of close (NFS reports write errors here) propagates


def write_bytes_atomic(path: str | os.PathLike, data: bytes | bytearray | memoryview) -> None:
    """Write ``data`` to ``path`` atomically, every byte checked (see the module docstring)."""
    with atomic_file(path) as file:
        file.write(data)


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def save_image(path: str | os.PathLike, image: Any, format: str, **params: Any) -> None:
    """Write a PIL ``image`` to ``path`` atomically, as ``image.save(path, format, **params)``
    would, but verified: PIL encodes into memory and the bytes go through
    :func:`write_bytes_atomic` (PIL's encoders ignore a short ``write()`` to a file: on a full
    disk they would leave a truncated image)."""
    buffer = io.BytesIO()
    image.save(buffer, format=format, **params)
    write_bytes_atomic(path, buffer.getbuffer())


def _temp_in_use(path: Path, match: re.Match) -> bool:
    """Whether the temporary ``path`` belongs to a live writer: its flock is held; where the
    file system has no locks, its writer's pid is alive on this host (a temporary of another
    host is then assumed alive; an old unowned one, not)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        return True  # gone already: nothing to remove
    except OSError:
        return True  # cannot be opened (a symlink, no permission): not ours to remove
    try:
        locked = _lock(fd, block=False)
    finally:
        os.close(fd)  # releases our lock: removing a file does not need it held
    if locked is not None:
        return not locked
    if match.group("pid") is None:
        return False
    if match.group("host") != _HOST:
        return True
    try:
        os.kill(int(match.group("pid")), 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, another user's
        return True
    return True


def remove_stale_temps(folder: str | os.PathLike, suffixes: Iterable[str] = ("",)) -> list[Path]:
    """Remove the :data:`TEMP_NAME` files under ``folder`` (recursively) whose final name ends
    with one of ``suffixes`` (a name cut to fit NAME_MAX always qualifies) and that no live writer
    holds: what a killed run (SIGKILL, power loss) left. A concurrent run's temporaries are
    locked by it and kept. Returns the removed paths."""
    suffixes = tuple(suffixes)
    removed: list[Path] = []
    for root, _, files in os.walk(folder):
        for name in files:
            m = TEMP_NAME.match(name)
            if not m or not (m.group("name").endswith(suffixes) or _CUT_NAME.search(m.group("name"))):
                continue
            tmp = Path(root) / name
            if _temp_in_use(tmp, m):
                continue
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
                removed.append(tmp)
    return removed


# -- the output-path rule ----------------------------------------------------------------------
def real(path: str | os.PathLike) -> str:
    """``path`` absolute with every symlink resolved (the part that does not exist yet kept)."""
    return os.path.realpath(os.path.abspath(path))


def is_within(path: str, folder: str) -> bool:
    """Whether the real path ``path`` is ``folder`` or lies under it (both from :func:`real`)."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_output_location(output: str | os.PathLike, inputs: Iterable[str | os.PathLike], *, option: str,
                          folder: bool, allow_inside: bool = False) -> None:
    """The output-path rule, before any work: raise a one-line
    :class:`~fcn_deploy.errors.UsageError` naming ``option``, the output and the input when

    * the output is an input file, or lies under one (same real path, or the same file by inode:
      a hard link);
    * the output is an input folder, or (``folder``) contains one: its outputs would be written
      among the inputs, and read back as inputs by the next run;
    * the output lies inside an input folder, unless ``allow_inside`` (the caller then keeps the
      output subtree out of its inputs, as ``infer`` does).

    Symlinks are resolved on both sides; inputs that do not exist are ignored.
    """
    out = real(output)
    try:
        out_stat = os.stat(out)
    except OSError:
        out_stat = None
    for given in inputs:
        src = real(given)
        if not os.path.exists(src):
            continue
        is_dir = os.path.isdir(src)
        same = out == src or (out_stat is not None and os.path.samestat(out_stat, os.stat(src)))
        if not is_dir:
            if same or is_within(out, src):
                raise UsageError(f"{option} {output} is the input file {given}; choose another output path")
            continue
        if same:
            raise UsageError(f"{option} {output} is the input folder {given}: its outputs would be read as "
                             f"inputs by the next run; choose an output folder outside it")
        if folder and is_within(src, out):
            raise UsageError(f"{option} {output} contains the input folder {given}: outputs would be written "
                             f"among the inputs; choose an output folder outside it")
        if is_within(out, src) and not allow_inside:
            raise UsageError(f"{option} {output} lies inside the input folder {given}; choose an output "
                             f"{'folder' if folder else 'path'} outside it")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
