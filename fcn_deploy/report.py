"""Presentation helpers shared by ``check`` and ``evaluate``: plain-text tables, the disagreement
map and the prediction grid (all pure numpy/PIL; PNGs written atomically)."""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
from PIL import Image

from fcn_deploy.fileio import atomic_path
from fcn_deploy.defaults import IGNORE_INDEX, VOID_COLOR

#: Colour of the pixels where a backend and the reference disagree (bright magenta).
DISAGREE_COLOR = (255, 0, 255)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned first column, right-aligned others, columns padded to their widest cell."""
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) if rows else len(str(h))
              for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def save_png(path: str | os.PathLike, rgb: np.ndarray) -> None:
    """Write an (H, W, 3) uint8 array as a PNG, atomically."""
    with atomic_path(path) as tmp:
        Image.fromarray(rgb, "RGB").save(tmp, format="PNG")


def disagreement_map(rgb: np.ndarray, mask: np.ndarray, dim: float = 0.35, halo: int = 3) -> np.ndarray:
    """(H, W, 3) uint8 photo dimmed to ``dim`` of its brightness, with the pixels where ``mask``
    ((H, W) bool) is True painted :data:`DISAGREE_COLOR` and, so that a few isolated pixels
    stay visible, the pixels within ``halo`` of them half-way toward it. Returns (H, W, 3) uint8."""
    if rgb.shape[:2] != mask.shape:
        raise ValueError(f"photo {rgb.shape[:2]} and mask {mask.shape} differ in size")
    out = rgb.astype(np.float32) * dim
    if halo > 0 and mask.any():
        from PIL import ImageFilter

        grown = Image.fromarray(mask.astype(np.uint8) * 255).filter(ImageFilter.MaxFilter(2 * halo + 1))
        ring = (np.asarray(grown) > 0) & ~mask
        out[ring] = 0.5 * out[ring] + 0.5 * np.asarray(DISAGREE_COLOR, dtype=np.float32)
    out = out.astype(np.uint8)
    out[mask] = DISAGREE_COLOR
    return out


def colorize(labels: np.ndarray, colormap: Sequence[Sequence[int]]) -> np.ndarray:
    """(H, W) uint8 class ids -> (H, W, 3) uint8 colours; 255 (void) gets VOC's void colour,
    ids outside the colormap black."""
    lut = np.zeros((256, 3), dtype=np.uint8)
    cmap = np.asarray(colormap, dtype=np.uint8).reshape(-1, 3)[:255]
    lut[: len(cmap)] = cmap
    lut[IGNORE_INDEX] = VOID_COLOR
    return lut[labels]


def _resize(img: np.ndarray, height: int, nearest: bool) -> np.ndarray:
    h, w = img.shape[:2]
    width = max(1, round(w * height / h))
    resample = Image.NEAREST if nearest else Image.BILINEAR
    mode = "RGB" if img.ndim == 3 else "L"
    return np.asarray(Image.fromarray(img, mode).resize((width, height), resample))


def prediction_grid(
    samples: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
    colormap: Sequence[Sequence[int]],
    height: int = 160,
    gap: int = 4,
) -> np.ndarray:
    """The chapter's figure: one column per sample, rows photo / prediction / ground truth.

    Args:
        samples: (rgb (H, W, 3) uint8, prediction (H, W) uint8, label (H, W) uint8) per column.
        colormap: class colours; void (255) is drawn in VOC's void colour.
        height: every cell is resized to this height (aspect kept; labels nearest-neighbour).
        gap: white pixels between cells.

    Returns:
        (3 * height + 2 * gap, sum of cell widths + gaps, 3) uint8.
    """
    if not samples:
        raise ValueError("prediction_grid needs at least one sample")
    columns = []
    for rgb, pred, label in samples:
        cells = [_resize(rgb, height, nearest=False),
                 _resize(colorize(pred, colormap), height, nearest=True),
                 _resize(colorize(label, colormap), height, nearest=True)]
        w = cells[0].shape[1]
        col = np.full((3 * height + 2 * gap, w, 3), 255, dtype=np.uint8)
        for r, cell in enumerate(cells):
            col[r * (height + gap): r * (height + gap) + height, :, :] = cell[:, :w]
        columns.append(col)
    total_w = sum(c.shape[1] for c in columns) + gap * (len(columns) - 1)
    grid = np.full((3 * height + 2 * gap, total_w, 3), 255, dtype=np.uint8)
    x = 0
    for col in columns:
        grid[:, x: x + col.shape[1]] = col
        x += col.shape[1] + gap
    return grid
