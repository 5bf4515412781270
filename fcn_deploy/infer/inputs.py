"""Input discovery of ``fcn-deploy infer``: files and folders expanded into images, each with the
output name its masks get, and the output folder checked against the inputs before any work.

The rules (docs/infer.md):

* **Discovery.** Folders are walked recursively in name order, hidden entries (``.name``) and
  output folders of ``infer`` (below a root, holding :data:`MARKER_NAME`) skipped; symlinked
  folders are followed, each real folder walked once (a link to an ancestor does not loop); a
  symlinked file is its target; a broken symlink with an image extension is
  a failure by name. Files with an image extension are inputs; other names only when PIL
  recognises their content. A file named explicitly is always an input.
* **Naming.** A pure function of the input path and its input root: the mask of
  ``<root>/<rel>/<name>.<ext>`` is ``<out>/<rel>/<name>.png`` (``keep_extension``:
  ``<out>/<rel>/<name>.<ext>.png``), whatever the other inputs; a file named explicitly is its
  own root. Two inputs with the same output name (``a.jpg`` beside ``a.png``, or ``IMG_1.JPG`` in
  two folders given together; names differing only in case when the output file system ignores
  case) all fail, by name, before any work: none of them gets a mask that another could own.
* **The output-path rule** (:func:`check_output_folder`, on
  :func:`fcn_deploy.fileio.check_output_location`): the output folder may not be an input
  folder nor contain one, nor be or lie under an input file (symlinks resolved). It may lie
  inside an input folder (``infer . -o predictions``): its subtree is then no input, and it must
  be new, empty of images, or an output folder of ``infer`` (it holds :data:`MARKER_NAME`);
  a folder of photos is refused in one line naming both. Per image
  (:func:`refuse_overwriting_inputs`), no output may replace an input file (same path or inode:
  a hard link, a symlink to it), be written through a symlink into an input folder, or have a
  name the file system cannot hold.
"""

from __future__ import annotations

import contextlib
import functools
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from fcn_deploy.errors import FcnDeployError, UsageError
from fcn_deploy.fileio import check_output_location, is_within, name_max, path_max, real
from fcn_deploy.infer.outputs import MASK_SUFFIX, output_path

#: Hidden file that marks a folder as an output folder of ``infer`` (written into every output
#: folder it writes): such a folder inside an input folder is left out of the inputs.
MARKER_NAME = ".fcn-deploy-infer"
MARKER_TEXT = b"Outputs of fcn-deploy infer. Inside an input folder, this folder is never read as input.\n"


@dataclass(frozen=True)
class InputImage:
    """One image to segment and where its outputs go (``rel_stem`` + suffix under the output folder)."""

    path: Path
    rel_stem: Path


@dataclass
class InputListing:
    """What :func:`list_inputs` found: the images (output names assigned), failures as (path,
    message), and the real paths of the folders walked as roots (the folder arguments and the
    targets of the symlinked folders followed)."""

    images: list[InputImage] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    roots: list[str] = field(default_factory=list)


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


def _broken_link(path: Path) -> str:
    try:
        target = os.readlink(path)
    except OSError:
        target = "?"
    return f"{path}: a broken symbolic link (its target {target} does not exist or loops)"


def _walk(arg: Path, rel: Path, arg_real: str, excluded: str | None, found: list[tuple[Path, Path, str]],
          failed: list[tuple[str, str]], visited: set[tuple[int, int]],
          links: list[tuple[Path, Path, str]]) -> None:
    """Walk the folder ``arg`` (``rel`` below its input root, real path ``arg_real``) depth first
    in name order, files of a folder before its subfolders, appending (path, path relative to
    the input root, real path) of candidate files to ``found``. Symlinked folders are not
    entered but appended to ``links`` (:func:`list_inputs` follows them once every real folder
    is walked, so a folder keeps its own name when it is also reachable by a link)."""
    stack: list[tuple[Path, Path, str]] = [(arg, rel, arg_real)]
    while stack:
        folder, rel, folder_real = stack.pop()
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            failed.append((str(folder), f"{folder}: cannot list this folder: {exc.strerror or exc}"))
            continue
        subdirs: list[tuple[Path, Path, str]] = []
        for entry in entries:
            name = entry.name
            if name.startswith("."):
                continue
            path = folder / name
            try:
                is_dir = entry.is_dir()  # follows symlinks
                is_file = not is_dir and entry.is_file()
                is_link = entry.is_symlink()
            except OSError:
                continue
            if is_dir:
                sub_real = real(path) if is_link else os.path.join(folder_real, name)
                if excluded is not None and is_within(sub_real, excluded):
                    continue  # the output folder (or a link into it): outputs are no inputs
                if os.path.isfile(os.path.join(path, MARKER_NAME)):
                    continue  # an output folder of an earlier run (another -o): its masks are no inputs
                if is_link:
                    links.append((path, rel / name, sub_real))
                    continue
                try:
                    st = entry.stat()
                except OSError:
                    continue
                key = (st.st_dev, st.st_ino)
                if key not in visited:  # else walked already (a bind mount, a second route)
                    visited.add(key)
                    subdirs.append((path, rel / name, sub_real))
            elif is_file:
                if _is_image_candidate(path):
                    found.append((path, rel / name, real(path) if is_link else os.path.join(folder_real, name)))
            elif is_link and not os.path.exists(path) and Path(name).suffix.lower() in _image_extensions():
                failed.append((str(path), _broken_link(path)))  # (a FIFO or device behind a link: skipped)
        stack.extend(reversed(subdirs))


def output_stem(rel: Path, keep_extension: bool = False) -> Path:
    """The output stem of an input at ``rel`` below its root: ``rel`` less its extension, or
    ``rel`` itself with ``keep_extension`` (the naming rule of the module docstring)."""
    return rel if keep_extension else rel.with_suffix("")


def list_inputs(
    paths: Sequence[str | os.PathLike],
    exclude: str | os.PathLike | None = None,
    *,
    keep_extension: bool = False,
    case_insensitive: bool = False,
    suffixes: Sequence[str] = (MASK_SUFFIX,),
    assign: bool = True,
) -> InputListing:
    """Expand files and folders into images with their output names (module docstring).

    ``exclude``: a folder (its real path) whose subtree is never walked: the output folder.
    ``case_insensitive``: whether the output file system ignores case (output names are then
    compared case-blind). ``suffixes``: the outputs each image gets, for the check that no output
    file has the name of an output folder. Failures are (path, message) for missing paths, FIFOs,
    broken symlinks and clashing output names. ``assign=False``: no output names (``rel_stem``
    is the path below its root), so no clash fails (for commands that only read the images).
    """
    excluded = real(exclude) if exclude is not None else None
    found: list[tuple[Path, Path, str]] = []  # (path, relative path incl. extension, real path)
    listing = InputListing()
    visited: set[tuple[int, int]] = set()
    links: list[tuple[Path, Path, str]] = []  # symlinked folders met, followed after the real walk

    def walk(folder: Path, rel: Path, folder_real: str) -> None:
        st = os.stat(folder_real)
        if (st.st_dev, st.st_ino) in visited:
            return  # a link to an ancestor or to a folder walked already: no loop, no second walk
        visited.add((st.st_dev, st.st_ino))
        listing.roots.append(folder_real)
        _walk(folder, rel, folder_real, excluded, found, listing.failed, visited, links)

    for arg in map(Path, paths):
        if arg.is_dir():
            walk(arg, Path(), real(arg))
        elif arg.is_file():
            found.append((arg, Path(arg.name), real(arg)))
        elif arg.is_symlink():
            listing.failed.append((str(arg), _broken_link(arg)))
        elif arg.exists():  # a FIFO, socket or device: never opened (a FIFO would block)
            listing.failed.append((str(arg), f"{arg}: not a regular file (a FIFO, socket or device), not an image"))
        else:
            listing.failed.append((str(arg), f"{arg}: no such file or folder"))

    while links:  # breadth of links: each followed once, in the order met
        path, rel, target = links.pop(0)
        with contextlib.suppress(OSError):
            walk(path, rel, target)
    seen: set[str] = set()
    unique: list[tuple[Path, Path, str]] = []
    for path, rel, key in found:  # each file once (a symlink to it, a file named twice)
        if key not in seen:
            seen.add(key)
            unique.append((path, rel, os.path.dirname(real(path.parent / "x"))))
    if not assign:
        listing.images = [InputImage(path, rel) for path, rel, _ in unique]
        return listing
    images, failed = _assign_names(unique, keep_extension, case_insensitive, suffixes)
    listing.images = images
    listing.failed += failed
    return listing


def _assign_names(found: list[tuple[Path, Path, str]], keep_extension: bool, case_insensitive: bool,
                  suffixes: Sequence[str]) -> tuple[list[InputImage], list[tuple[str, str]]]:
    """Output stems of ``found`` ((path, path below its root, real folder)) by
    :func:`output_stem`; inputs sharing one all fail."""
    fold = (lambda s: s.casefold()) if case_insensitive else (lambda s: s)
    stems = [output_stem(rel, keep_extension) for _, rel, _ in found]
    owners: dict[str, list[int]] = {}
    for i, stem in enumerate(stems):
        owners.setdefault(fold(stem.as_posix()), []).append(i)
    folders = {fold(parent.as_posix()) for stem in stems for parent in stem.parents if parent != Path(".")}
    images: list[InputImage] = []
    failed: list[tuple[str, str]] = []
    for i, ((path, rel, folder), stem) in enumerate(zip(found, stems)):
        group = owners[fold(stem.as_posix())]
        if len(group) > 1:
            others = [found[j][0] for j in group if j != i]
            same_folder = all(found[j][2] == folder for j in group)
            hint = ("rename one, or pass --keep-extension (masks named <name>.<ext>.png)"
                    if same_folder and not keep_extension else "give each input folder its own -o")
            if case_insensitive and len({stems[j].as_posix() for j in group}) > 1:
                hint += "; the output file system ignores case"
            failed.append((str(path), f"{path}: its output name {stem}{MASK_SUFFIX} is also that of "
                                      f"{', '.join(map(str, others))}; {hint}"))
            continue
        clash = next((s for s in suffixes if fold(stem.as_posix() + s) in folders), None)
        if clash is not None:
            failed.append((str(path), f"{path}: its output {stem}{clash} has the name of an output folder; rename it"))
            continue
        images.append(InputImage(path, stem))
    return images, failed


def collect_inputs(
    paths: Sequence[str | os.PathLike], exclude: str | os.PathLike | None = None, *,
    keep_extension: bool = False, case_insensitive: bool = False,
) -> tuple[list[InputImage], list[tuple[str, str]]]:
    """(images, failures) of :func:`list_inputs`."""
    listing = list_inputs(paths, exclude, keep_extension=keep_extension, case_insensitive=case_insensitive)
    return listing.images, listing.failed


def find_images(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """The image files under ``paths`` (files and folders), as :func:`collect_inputs` finds
    them (output names do not matter here: no clash leaves one out); paths that do not exist
    are left out."""
    return [item.path for item in list_inputs(paths, assign=False).images]


# -- the output folder -------------------------------------------------------------------------
def output_ignores_case(output_dir: str | os.PathLike) -> bool:
    """Whether the file system of ``output_dir`` (or of its nearest existing ancestor) ignores
    the case of names: told by an entry of that folder whose name has letters (its swapped-case
    name is the same file), else by a hidden probe file made and removed at once."""
    folder = os.path.abspath(output_dir)
    while not os.path.isdir(folder) and os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
    with contextlib.suppress(OSError):
        with os.scandir(folder) as entries:
            for n, entry in enumerate(entries):
                if n > 64:
                    break
                if entry.name == entry.name.swapcase():
                    continue  # no letters
                other = os.path.join(folder, entry.name.swapcase())
                if not os.path.lexists(other):
                    return False
                with contextlib.suppress(OSError):
                    if os.path.samestat(os.lstat(entry.path), os.lstat(other)):
                        return True
                return False  # both names exist as different files: case matters
    try:
        fd, probe = tempfile.mkstemp(prefix=".fcn-deploy-case-", dir=folder)
    except OSError:
        return False  # not writable: the output check says so
    os.close(fd)
    try:
        return os.path.exists(os.path.join(folder, os.path.basename(probe).upper()))
    finally:
        with contextlib.suppress(OSError):
            os.unlink(probe)


def _first_foreign_image(folder: Path) -> Path | None:
    """The first image file under ``folder`` (hidden entries skipped), or None."""
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            path = Path(root) / name
            if not name.startswith(".") and path.is_file() and _is_image_candidate(path):
                return path
    return None


def check_output_folder(output_dir: str | os.PathLike, paths: Sequence[str | os.PathLike],
                        roots: Sequence[str] = (), option: str = "-o") -> None:
    """The output-path rule for an output folder (module docstring), before any work: a one-line
    :class:`~fcn_deploy.errors.UsageError` naming both folders when it breaks it. ``paths``:
    the inputs as given; ``roots``: real paths of the folders walked (:attr:`InputListing.roots`,
    symlinked folders included)."""
    if not os.fspath(output_dir):
        raise UsageError(f"{option} is empty: name an output folder (e.g. {option} predictions)")
    check_output_location(output_dir, [*paths, *roots], option=option, folder=True, allow_inside=True)
    out = Path(output_dir)
    out_real = real(out)
    inside = [p for p in [*map(str, paths), *roots] if os.path.isdir(p) and is_within(out_real, real(p))]
    if not inside or not out.is_dir() or (out / MARKER_NAME).is_file():
        return
    photo = _first_foreign_image(out)
    if photo is not None:
        raise UsageError(
            f"{option} {output_dir} lies inside the input folder {inside[0]} and holds images infer did not write "
            f"(e.g. {photo}): they would be neither read nor safe from being overwritten; choose an output folder "
            f"outside {inside[0]}, or a new one")


def write_marker(output_dir: str | os.PathLike) -> bool:
    """Mark ``output_dir`` (existing) as an output folder of ``infer`` (:data:`MARKER_NAME`),
    before any output is written, unless it holds images ``infer`` did not write: a folder of the
    user's photos (``infer a.jpg -o photos``) is never marked, since a marked folder is left out
    of every input walk. Returns whether the folder is marked."""
    from fcn_deploy.fileio import write_bytes_atomic

    folder = Path(output_dir)
    marker = folder / MARKER_NAME
    if marker.is_file():
        return True
    if _first_foreign_image(folder) is not None:
        return False
    write_bytes_atomic(marker, MARKER_TEXT)
    return True


def refuse_overwriting_inputs(
    items: list[InputImage], output_dir: str | os.PathLike, suffixes: Sequence[str], roots: Sequence[str] = (),
) -> tuple[list[InputImage], list[tuple[str, str]]]:
    """Split ``items`` into those whose outputs (``rel_stem`` + each of ``suffixes`` under
    ``output_dir``) can be written and replace no input, and (path, message) failures for the
    others, before any work.

    An output fails when its name or path is longer than the file system allows; when it is an
    input file (the same path, or the same file by inode: a hard link or a symlink to it), e.g.
    ``infer photos/a.png -o photos``; or when a symlinked folder inside the output folder would
    put it inside one of ``roots`` (the real input folders) outside the output folder.
    """
    out_real = real(output_dir)
    limit, longest = name_max(output_dir), path_max(output_dir)
    out_exists = os.path.isdir(output_dir)
    inputs: dict[tuple[int, int], Path] = {}
    if out_exists:  # nothing exists under a new folder: no output can be an input there
        for item in items:
            with contextlib.suppress(OSError):
                st = item.path.stat()
                inputs[(st.st_dev, st.st_ino)] = item.path
    escapes: dict[str, str | None] = {}  # output sub-folder -> the input root it lands in, if any
    kept: list[InputImage] = []
    failed: list[tuple[str, str]] = []
    for item in items:
        problem = None
        for suffix in suffixes:
            target = output_path(output_dir, item.rel_stem, suffix)
            name = os.fsencode(target.name)
            if len(name) > limit:
                problem = (f"its output {target} cannot be written: its name is {len(name)} bytes, more than the "
                           f"{limit} the file system allows")
                break
            total = len(os.fsencode(os.path.abspath(target)))
            if total >= longest:
                problem = (f"its output {target} cannot be written: its path is {total} bytes, more than the "
                           f"{longest - 1} the system allows")
                break
            if not out_exists:
                continue
            parent = os.path.dirname(target)
            if parent not in escapes:
                where = real(parent)
                escapes[parent] = None if is_within(where, out_real) else next(
                    (r for r in roots if is_within(where, r)), None)
            if escapes[parent] is not None:
                problem = (f"its output {target} would be written through a symlink into the input folder "
                           f"{escapes[parent]}; remove the link or choose another output folder (-o)")
                break
            try:
                st = target.stat()
            except OSError:
                continue  # absent (or unreadable): it is no input file
            victim = inputs.get((st.st_dev, st.st_ino))
            if victim is not None:
                problem = f"its output {target} would replace the input {victim}; choose another output folder (-o)"
                break
        if problem is None:
            kept.append(item)
        else:
            failed.append((str(item.path), f"{item.path}: {problem}"))
    return kept, failed


def check_output_dir(output_dir: str | os.PathLike, create: bool = True) -> Path:
    """Create ``output_dir`` if needed and prove it writable, else raise a one-line error.

    With ``create=False`` nothing is created: the folder, or its nearest existing ancestor, must
    be a writable folder (a check before the model loads; no empty folder is left behind)."""
    out = Path(output_dir)
    if not os.fspath(output_dir):
        raise UsageError("-o is empty: name an output folder (e.g. -o predictions)")
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
