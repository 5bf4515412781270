"""Input discovery of ``fcn-deploy infer``: files and folders expanded into images, each with
the output stem its masks get, and the output folder checked before any work."""

from __future__ import annotations

import contextlib
import functools
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from fcn_deploy.errors import FcnDeployError
from fcn_deploy.infer.outputs import MASK_SUFFIX, output_path


@dataclass(frozen=True)
class InputImage:
    """One image to segment and where its outputs go (``rel_stem`` + suffix under the output folder)."""

    path: Path
    rel_stem: Path


@functools.cache  # once per process: PIL's registry is complete after Image.init()
def _image_extensions() -> frozenset[str]:
    """The extensions of the formats PIL can open: its registered extensions less those of formats
    it can only write (``.pdf``, ``.palm``); ``.mpo`` stays (PIL's JPEG plugin opens it)."""
    from PIL import Image

    Image.init()
    return frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN or fmt == "MPO")


def _is_image_candidate(path: Path) -> bool:
    """True when the name has an image extension (a broken ``photo.jpg`` is then reported, not
    ignored) or, for other names, when PIL recognises the content; files like ``notes.txt`` or
    ``report.pdf`` (a format PIL only writes) are False. Only files without an image extension
    are opened (this runs before any work)."""
    from PIL import Image, UnidentifiedImageError

    if path.suffix.lower() in _image_extensions():
        return True
    try:
        with Image.open(path):
            return True
    except Image.DecompressionBombError:  # an image, refused by name when it is loaded
        return True
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return False


def collect_inputs(
    paths: Sequence[str | os.PathLike], exclude: str | os.PathLike | None = None
) -> tuple[list[InputImage], list[tuple[str, str]]]:
    """Expand files and folders (recursively, hidden entries and ``exclude`` skipped) into images.

    Inside folders, files are kept when :func:`_is_image_candidate`; a file named explicitly is
    always kept (a non-image then fails to decode, by name). Output stems mirror the tree below
    each folder argument (a file argument: its name); two inputs whose stems collide keep their
    extension in the output name. Returns (images, failures) where failures are (path, message)
    for missing paths and outputs that would still collide.
    """
    excluded = Path(exclude).resolve() if exclude is not None else None
    found: list[tuple[Path, Path]] = []  # (path, relative path incl. extension)
    failed: list[tuple[str, str]] = []
    seen: set[str] = set()  # resolved paths

    def add(path: Path, rel: Path, key: str | None = None) -> None:
        key = key or str(path.resolve())
        if key not in seen:
            seen.add(key)
            found.append((path, rel))

    for arg in map(Path, paths):
        if arg.is_dir():
            for root, dirs, files in os.walk(arg):
                root_path = Path(root)
                dirs[:] = sorted(
                    d for d in dirs if not d.startswith(".") and (root_path / d).resolve() != excluded
                )
                real_root = os.path.realpath(root)  # once per folder: resolve() per file cost ~30 us
                rel_root = root_path.relative_to(arg)
                for name in sorted(files):
                    if name.startswith("."):
                        continue
                    path = root_path / name
                    if path.is_file() and _is_image_candidate(path):
                        # a file that is no symlink resolves to its resolved folder / its name
                        add(path, rel_root / name, None if path.is_symlink() else os.path.join(real_root, name))
        elif arg.is_file():
            add(arg, Path(arg.name))
        elif arg.exists():  # a FIFO, socket or device: never opened (a FIFO would block)
            failed.append((str(arg), f"{arg}: not a regular file (a FIFO, socket or device), not an image"))
        else:
            failed.append((str(arg), f"{arg}: no such file or folder"))

    bare = [rel.with_suffix("") for _, rel in found]
    stems: dict[str, int] = {}
    for stem in bare:
        key = str(stem).casefold()
        stems[key] = stems.get(key, 0) + 1
    images: list[InputImage] = []
    owners: dict[str, Path] = {}
    for (path, rel), stem in zip(found, bare):
        stem = stem if stems[str(stem).casefold()] == 1 else rel
        key = str(stem).casefold()
        if key in owners:
            failed.append((str(path), f"{path}: output name {stem}{MASK_SUFFIX} is already used by {owners[key]}"))
            continue
        owners[key] = path
        images.append(InputImage(path, stem))
    return images, failed


def find_images(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """The image files under ``paths`` (files and folders), as :func:`collect_inputs` finds
    them; paths that do not exist are left out."""
    return [item.path for item in collect_inputs(paths)[0]]


def refuse_overwriting_inputs(
    items: list[InputImage], output_dir: str | os.PathLike, suffixes: Sequence[str]
) -> tuple[list[InputImage], list[tuple[str, str]]]:
    """Split ``items`` into those whose outputs (``rel_stem`` + each of ``suffixes`` under
    ``output_dir``) replace no input file, and (path, message) failures for the others.

    An output replaces an input when it is the same path or the same file (inode: a hard link or
    a symlink to it), e.g. ``infer photos/a.png -o photos``. Such an image is never segmented.
    """
    if not os.path.isdir(output_dir):  # nothing exists under it yet: no output can replace an input
        return list(items), []
    inputs: dict[tuple[int, int], Path] = {}
    for item in items:
        with contextlib.suppress(OSError):
            st = item.path.stat()
            inputs[(st.st_dev, st.st_ino)] = item.path
    kept: list[InputImage] = []
    failed: list[tuple[str, str]] = []
    for item in items:
        for suffix in suffixes:
            target = output_path(output_dir, item.rel_stem, suffix)
            try:
                st = target.stat()
            except OSError:
                continue  # absent (or unreadable): it is no input file
            victim = inputs.get((st.st_dev, st.st_ino))
            if victim is not None:
                failed.append((str(item.path), f"{item.path}: its output {target} would replace the input "
                                               f"{victim}; choose another output folder (-o)"))
                break
        else:
            kept.append(item)
    return kept, failed


def check_output_dir(output_dir: str | os.PathLike, create: bool = True) -> Path:
    """Create ``output_dir`` if needed and prove it writable, else raise a one-line error.

    With ``create=False`` nothing is created: the folder, or its nearest existing ancestor, must
    be a writable folder (a check before the model loads; no empty folder is left behind)."""
    out = Path(output_dir)
    if not create:
        parent = out
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
            reason = "not a folder" if not parent.is_dir() else "not writable"
            raise FcnDeployError(f"output folder {out} is not writable: {parent} is {reason}")
        return out
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as exc:
        raise FcnDeployError(f"output folder {out} is not writable: {exc.strerror or exc}") from None
    return out


