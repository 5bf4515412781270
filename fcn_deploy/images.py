"""Image decoding to RGB uint8 and normalisation to the network's float32 CHW input.

Handles what real photo folders hold: EXIF orientation, grayscale, palette, RGBA/LA (alpha
dropped, colour kept), CMYK, 16-bit and float images. Every decode failure becomes an
:class:`~fcn_deploy.errors.ImageReadError` naming the file.

Decompression bombs: an image is refused before decoding when its header declares more than
:func:`max_pixels` pixels (default :data:`DEFAULT_MAX_PIXELS`; ``infer --max-pixels`` raises it).
A PNG of a few kilobytes can declare 900 megapixels, which decode to gigabytes.

PIL's warnings while a file is decoded (e.g. "Corrupt EXIF data", one per damaged tag) name no
file: they are gathered per file and given again as one :class:`ImageWarning`,
``<file>: <what PIL said>`` (the CLI prints it as one ``warning:`` line).
"""

from __future__ import annotations

import os
import re
import stat
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from fcn_deploy.errors import ImageReadError, ImageTooLargeError, UsageError

#: Default pixel limit of :func:`load_rgb`: 2**27 (134 megapixels, e.g. 11585 x 11585). It admits
#: 8000x8000 scans, 6000x8000 photos and 100-megapixel medium-format frames, and refuses
#: 30000x30000 (900 MP). Decoding costs about 3 bytes per pixel for the RGB array plus as much
#: again for PIL's copy, so an admitted image needs at most ~1 GB of host memory to decode.
DEFAULT_MAX_PIXELS = 1 << 27

_max_pixels = DEFAULT_MAX_PIXELS
# PIL warns above its own limit and raises above twice it, at Image.open; it follows ours, and its
# warning is silenced because load_rgb refuses such an image itself, in one line.
Image.MAX_IMAGE_PIXELS = _max_pixels
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


class ImageWarning(UserWarning):
    """What PIL warned about while decoding one file, naming the file."""


_sink = threading.local()  # .messages: the PIL warnings of the file this thread is decoding
_hook_lock = threading.Lock()
_hooked = False
_PIL_DIR = os.sep + "PIL" + os.sep


def _install_warning_hook() -> None:
    """Once per process: PIL's warnings raised in a thread inside :func:`naming_warnings` go to
    that thread's list instead of being shown (thread-safe, unlike ``warnings.catch_warnings``);
    every other warning is shown as before. PIL's UserWarnings are shown each time ("always"), so
    every file's are seen, not only the first file's."""
    global _hooked
    with _hook_lock:
        if _hooked:
            return
        previous = warnings.showwarning

        def showwarning(message, category, filename, lineno, file=None, line=None):
            messages = getattr(_sink, "messages", None)
            if messages is not None and _PIL_DIR in str(filename):
                messages.append(str(message))
                return
            previous(message, category, filename, lineno, file, line)

        warnings.showwarning = showwarning
        warnings.filterwarnings("always", category=UserWarning, module=r"PIL\.")
        _hooked = True


@contextmanager
def naming_warnings(path: str | os.PathLike, keep: bool = True) -> Iterator[None]:
    """PIL's warnings in this thread during the block become one :class:`ImageWarning`
    ``<path>: <messages>`` at its end (``keep=False``: dropped, for a header read before the
    file is decoded, which warns again)."""
    _install_warning_hook()
    outer = getattr(_sink, "messages", None)
    _sink.messages = messages = []
    try:
        yield
    finally:
        _sink.messages = outer
        if messages and keep:
            unique = list(dict.fromkeys(m.strip() for m in messages))
            text = "; ".join(unique[:3]) + (f"; and {len(unique) - 3} more" if len(unique) > 3 else "")
            warnings.warn(ImageWarning(f"{path}: {text}"), stacklevel=3)


def max_pixels() -> int:
    """The pixel limit :func:`load_rgb` enforces in this process."""
    return _max_pixels


def set_max_pixels(limit: int | None) -> None:
    """Set the process-wide pixel limit of :func:`load_rgb` (None: :data:`DEFAULT_MAX_PIXELS`);
    also PIL's decompression-bomb limit, which guards the other images PIL opens (labels)."""
    global _max_pixels
    limit = DEFAULT_MAX_PIXELS if limit is None else int(limit)
    if limit < 1:
        raise UsageError(f"--max-pixels must be at least 1, not {limit}")
    _max_pixels = limit
    Image.MAX_IMAGE_PIXELS = limit


def _megapixels(n: int) -> str:
    return f"{n / 1e6:.1f} MP" if n >= 100_000 else f"{n} pixels"


def check_size(path: str | os.PathLike, width: int, height: int, limit: int | None = None) -> None:
    """Raise :class:`~fcn_deploy.errors.ImageTooLargeError` (naming the file, its size and the
    limit) when ``width * height`` exceeds ``limit`` (default :func:`max_pixels`)."""
    limit = _max_pixels if limit is None else limit
    if width * height > limit:
        raise ImageTooLargeError(
            f"{path}: too large, {width}x{height} ({_megapixels(width * height)}) exceeds the limit "
            f"of {_megapixels(limit)}; raise it with --max-pixels {width * height}"
        )


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB (16-bit and float scaled to their range)."""
    if img.mode in ("RGB",):
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16"):
            arr = arr / 65535.0
        else:
            lo, hi = float(arr.min()), float(arr.max())
            arr = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
        gray = np.clip(np.rint(arr * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(np.repeat(gray[..., None], 3, axis=2), "RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")


def check_regular_file(path: Path) -> None:
    """Raise ImageReadError unless ``path`` is a regular file (a FIFO would block forever)."""
    mode = os.stat(path).st_mode
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(path)
    if not stat.S_ISREG(mode):
        raise ImageReadError(f"{path}: not a regular file (a FIFO, socket or device), not an image")


@contextmanager
def image_errors(path: Path, limit: int | None = None) -> Iterator[None]:
    """Turn what opening or decoding ``path`` raises into one-line
    :class:`~fcn_deploy.errors.ImageReadError` / ``ImageTooLargeError`` naming the file."""
    try:
        yield
    except FileNotFoundError:
        raise ImageReadError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ImageReadError(f"{path}: is a directory, not an image") from None
    except UnidentifiedImageError:
        raise ImageReadError(f"{path}: not an image PIL can decode") from None
    except Image.DecompressionBombError as exc:  # PIL's check at open, beyond twice the limit
        m = re.search(r"\((\d+) pixels\)", str(exc))
        size = _megapixels(int(m.group(1))) if m else "more pixels"
        raise ImageTooLargeError(
            f"{path}: too large, {size} exceeds the limit of {_megapixels(_max_pixels if limit is None else limit)}; "
            "raise it with --max-pixels"
        ) from None
    except MemoryError:
        raise ImageTooLargeError(f"{path}: too large to decode in the memory available") from None
    except (OSError, SyntaxError, ValueError) as exc:  # truncated / corrupt data
        raise ImageReadError(f"{path}: corrupt or truncated image ({exc})") from None


def load_rgb(path: str | os.PathLike, limit: int | None = None) -> np.ndarray:
    """Decode ``path`` to an (H, W, 3) uint8 RGB array in its displayed orientation (EXIF applied).

    Refuses, before decoding, an image of more than ``limit`` pixels (default
    :func:`max_pixels`) and anything but a regular file (a FIFO would block forever).
    """
    path = Path(path)
    with naming_warnings(path), image_errors(path, limit):
        check_regular_file(path)
        with Image.open(path) as img:
            check_size(path, *img.size, limit)
            img = ImageOps.exif_transpose(img)
            img.load()
            rgb = to_rgb(img)
            return np.asarray(rgb, dtype=np.uint8).copy()


#: EXIF orientations that swap width and height for display.
_TRANSPOSED = (5, 6, 7, 8)


def read_size(path: str | os.PathLike) -> tuple[int, int] | None:
    """(height, width) of ``path`` as displayed (EXIF orientation applied), from its header
    alone; None when the header cannot be read (decoding the file then reports why)."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return None  # a FIFO would block: load_rgb refuses it by name
        with naming_warnings(path, keep=False), Image.open(path) as img:
            width, height = img.size
            orientation = img.getexif().get(0x0112, 1) if img.format in ("JPEG", "MPO", "TIFF", "WEBP", "PNG") else 1
    except Exception:  # noqa: BLE001 - anything PIL raises on a bad header: the decode reports it
        return None
    return (width, height) if orientation in _TRANSPOSED else (height, width)


def normalize(rgb: np.ndarray, mean, std) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (3, H, W) float32 ``(x / 255 - mean) / std``."""
    scale = (1.0 / (255.0 * np.asarray(std, dtype=np.float32))).reshape(3, 1, 1)
    shift = (np.asarray(mean, dtype=np.float32) / np.asarray(std, dtype=np.float32)).reshape(3, 1, 1)
    chw = np.ascontiguousarray(rgb.transpose(2, 0, 1), dtype=np.float32)
    chw *= scale
    chw -= shift
    return chw
