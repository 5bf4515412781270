"""Presentation helpers shared by ``check`` and ``evaluate``: plain-text tables, the disagreement
map and the prediction grid (all pure numpy/PIL; PNGs written atomically)."""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
from PIL import Image

from fcn_deploy.fileio import save_image
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
    """Write an (H, W, 3) uint8 array as a PNG, atomically and verified
    (:func:`fcn_deploy.fileio.save_image`: a full disk never leaves a truncated PNG)."""
    save_image(path, Image.fromarray(rgb, "RGB"), "PNG")


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


# -- pictures that explain themselves: row labels, a legend, captions (issue 24) -------------------
#: Row labels of :func:`labelled_prediction_grid`.
GRID_ROWS = ("photo", "prediction", "ground truth")
_INK = (0, 0, 0)
_WHITE = (255, 255, 255)


def _font(size: int):
    """PIL's bundled font at ``size`` pixels (Pillow >= 10.1 scales it; older: the bitmap one)."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _text_wh(draw, text: str, font) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return int(right - left), int(bottom - top)


def _legend_rows(draw, entries: Sequence[tuple[tuple[int, int, int], str]], width: int, font,
                 swatch: int, pad: int) -> list[list[tuple[tuple[int, int, int], str, int]]]:
    """``entries`` (colour, name) laid out in rows at most ``width`` wide: [(colour, name, x)]."""
    rows: list[list[tuple[tuple[int, int, int], str, int]]] = [[]]
    x = pad
    for colour, name in entries:
        w = swatch + pad // 2 + _text_wh(draw, name, font)[0]
        if rows[-1] and x + w > width - pad:
            rows.append([])
            x = pad
        rows[-1].append((colour, name, x))
        x += w + 2 * pad
    return rows


def legend_entries(label_maps: Sequence[np.ndarray], classes: Sequence[str],
                   colormap: Sequence[Sequence[int]]) -> list[tuple[tuple[int, int, int], str]]:
    """(colour, name) of every class id present in ``label_maps`` ((H, W) uint8 each), in id
    order; 255 is "void (not scored)", ids without a name "class <id>"."""
    present: set[int] = set()
    for labels in label_maps:
        present.update(int(v) for v in np.unique(labels))
    cmap = np.asarray(colormap, dtype=np.uint8).reshape(-1, 3)
    entries = []
    for cid in sorted(present):
        if cid == IGNORE_INDEX:
            entries.append((tuple(VOID_COLOR), "void (not scored)"))
        else:
            colour = tuple(int(c) for c in cmap[cid]) if cid < len(cmap) else (0, 0, 0)
            entries.append((colour, classes[cid] if cid < len(classes) else f"class {cid}"))
    return entries


def labelled_prediction_grid(
    samples: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
    colormap: Sequence[Sequence[int]],
    classes: Sequence[str],
    height: int = 160,
    gap: int = 4,
) -> np.ndarray:
    """:func:`prediction_grid` with its rows labelled (:data:`GRID_ROWS`, left) and, below, a
    legend of the classes present in the predictions and labels shown (colour swatch and name).

    Returns (H, W, 3) uint8: the grid's pixels unchanged at offset (0, label column width).
    """
    from PIL import ImageDraw

    grid = prediction_grid(samples, colormap, height=height, gap=gap)
    font = _font(max(12, height // 9))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    pad = max(6, height // 20)
    label_w = max(_text_wh(probe, t, font)[0] for t in GRID_ROWS) + 2 * pad
    width = label_w + grid.shape[1]
    entries = legend_entries([lab for _, p, lab in samples for lab in (p, lab)], classes, colormap)
    swatch = _text_wh(probe, "Hg", font)[1] + 2
    rows = _legend_rows(probe, entries, width, font, swatch, pad)
    line_h = swatch + pad
    title_h = line_h
    legend_h = title_h + line_h * len(rows) + 2 * pad
    canvas = Image.new("RGB", (width, grid.shape[0] + legend_h), _WHITE)
    canvas.paste(Image.fromarray(grid, "RGB"), (label_w, 0))
    draw = ImageDraw.Draw(canvas)
    for r, text in enumerate(GRID_ROWS):
        tw, th = _text_wh(draw, text, font)
        y = r * (height + gap) + (height - th) // 2
        draw.text((label_w - pad - tw, y), text, fill=_INK, font=font, anchor="lt")
    y = grid.shape[0] + pad
    draw.text((pad, y), "classes shown (prediction and ground truth):", fill=_INK, font=font, anchor="lt")
    for row in rows:
        y += line_h
        for colour, name, x in row:
            draw.rectangle([x, y, x + swatch - 1, y + swatch - 1], fill=colour, outline=_INK)
            draw.text((x + swatch + pad // 2, y + 1), name, fill=_INK, font=font, anchor="lt")
    return np.asarray(canvas)


def _wrap(draw, text: str, font, width: int) -> list[str]:
    """``text`` split at spaces into lines at most ``width`` pixels wide (a longer word alone)."""
    lines: list[str] = []
    for word in text.split(" "):
        if lines and _text_wh(draw, f"{lines[-1]} {word}", font)[0] <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines or [""]


def with_caption(rgb: np.ndarray, lines: Sequence[str], swatch: tuple[int, int, int] | None = None) -> np.ndarray:
    """(H, W, 3) uint8 picture with a white strip below holding ``lines`` of text (the first one
    after a ``swatch`` of that colour when given); the picture's pixels unchanged at the top."""
    from PIL import ImageDraw

    h, w = rgb.shape[:2]
    font = _font(14)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    pad = 6
    line_h = _text_wh(probe, "Hg", font)[1] + 6
    indent = (line_h - 6 + pad) if swatch is not None else 0
    lines = [part for i, text in enumerate(lines)
             for part in _wrap(probe, text, font, w - 2 * pad - (indent if i == 0 else 0))]
    canvas = Image.new("RGB", (w, h + pad + line_h * len(lines) + pad), _WHITE)
    canvas.paste(Image.fromarray(rgb, "RGB"), (0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, text in enumerate(lines):
        x, y = pad, h + pad + i * line_h
        if swatch is not None and i == 0:
            size = line_h - 6
            draw.rectangle([x, y, x + size - 1, y + size - 1], fill=swatch, outline=_INK)
            x += size + pad
        draw.text((x, y), text, fill=_INK, font=font, anchor="lt")
    return np.asarray(canvas)
