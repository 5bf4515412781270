"""Image decoding to RGB uint8 and normalisation to the network's float32 CHW input.

Handles what real photo folders hold: EXIF orientation, grayscale, palette, RGBA/LA (alpha
dropped, colour kept), CMYK, 16-bit and float images. Every decode failure becomes an :class:`~fcn_deploy.errors.ImageReadError` naming the file.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from fcn_deploy.errors import ImageReadError

# Refuse decompression bombs beyond ~40k x 40k but accept tens of megapixels.
Image.MAX_IMAGE_PIXELS = 40_000 * 40_000


def _to_rgb(img: Image.Image) -> Image.Image:
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


def load_rgb(path: str | os.PathLike) -> np.ndarray:
    """Decode ``path`` to an (H, W, 3) uint8 RGB array in its displayed orientation (EXIF applied)."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)
            img.load()
            rgb = _to_rgb(img)
            return np.asarray(rgb, dtype=np.uint8).copy()
    except FileNotFoundError:
        raise ImageReadError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ImageReadError(f"{path}: is a directory, not an image") from None
    except UnidentifiedImageError:
        raise ImageReadError(f"{path}: not an image PIL can decode") from None
    except Image.DecompressionBombError as exc:
        raise ImageReadError(f"{path}: too large ({exc})") from None
    except (OSError, SyntaxError, ValueError) as exc:  # truncated / corrupt data
        raise ImageReadError(f"{path}: corrupt or truncated image ({exc})") from None


def normalize(rgb: np.ndarray, mean, std) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (3, H, W) float32 ``(x / 255 - mean) / std``."""
    scale = (1.0 / (255.0 * np.asarray(std, dtype=np.float32))).reshape(3, 1, 1)
    shift = (np.asarray(mean, dtype=np.float32) / np.asarray(std, dtype=np.float32)).reshape(3, 1, 1)
    chw = np.ascontiguousarray(rgb.transpose(2, 0, 1), dtype=np.float32)
    chw *= scale
    chw -= shift
    return chw
