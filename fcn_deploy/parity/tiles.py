"""The tiles every backend sees in ``check``: where they come from and how they are drawn."""

from __future__ import annotations

import contextlib
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from fcn_deploy.errors import ImageReadError, UsageError
from fcn_deploy.defaults import IGNORE_INDEX

#: Tiles drawn by default (about 0.3 s each per backend on 2 CPU cores).
DEFAULT_MAX_TILES = 32
#: Synthetic images generated when no tile source is given.
DEFAULT_SYNTHETIC = 8


Echo = Callable[[str], None]


# -- the tiles every backend sees ------------------------------------------------------------
@dataclass
class TileSet:
    """The check's tiles, kept as uint8 so that many fit in memory.

    Attributes:
        rgb: (N, 3, th, tw) uint8 photo tiles (images smaller than a tile reflect-padded).
        valid: (N, th, tw) bool, False on padding.
        labels: (N, th, tw) uint8 ground truth (255 on void and padding), or None.
        names: ``image@y,x`` per tile.
        images: how many images the tiles come from.
    """

    rgb: np.ndarray
    valid: np.ndarray
    labels: np.ndarray | None
    names: list[str]
    images: int

    def __len__(self) -> int:
        return len(self.names)


def draw_tiles(samples: list[tuple[str, Any]], load, tile_hw: tuple[int, int], max_tiles: int) -> TileSet:
    """Cut up to ``max_tiles`` tiles from ``samples``, spread over the images.

    Args:
        samples: (name, handle) per image; ``load(handle)`` returns ((H, W, 3) uint8 RGB,
            (H, W) uint8 label or None), or None to skip an unreadable image.
        tile_hw: (th, tw) of the backends.
        max_tiles: at most this many tiles; each image gives at most
            ``ceil(max_tiles / len(samples))`` of its non-overlapping grid tiles, evenly chosen.
    """
    from fcn_deploy.tiling import extract_tile, plan_tiles

    if max_tiles < 1:
        raise UsageError(f"--max-tiles must be at least 1, got {max_tiles}")
    per_image = max(1, math.ceil(max_tiles / max(1, len(samples))))
    rgbs, valids, labels, names = [], [], [], []
    images = 0
    for name, handle in samples:
        if len(names) >= max_tiles:
            break
        loaded = load(handle)
        if loaded is None:  # an unreadable photo, already reported by ``load``
            continue
        rgb, label = loaded
        grid = plan_tiles(rgb.shape[0], rgb.shape[1], tile_hw, min_overlap=0)
        chw = rgb.transpose(2, 0, 1)
        picks = sorted({int(round(v)) for v in np.linspace(0, grid.count - 1, min(per_image, grid.count))})
        images += 1
        for index in picks[: max_tiles - len(names)]:
            y0, y1, x0, x1 = grid.box(index)
            valid = np.zeros(tile_hw, dtype=bool)
            valid[: y1 - y0, : x1 - x0] = True
            rgbs.append(extract_tile(chw, grid, index, pad_mode="reflect"))
            valids.append(valid)
            if label is not None:
                lab = extract_tile(label[None], grid, index, pad_mode="constant")[0]
                lab[~valid] = IGNORE_INDEX
                labels.append(lab)
            names.append(f"{name}@{y0},{x0}")
    if not names:
        raise UsageError("no tiles to check: no readable image in the tile source")
    return TileSet(np.stack(rgbs), np.stack(valids),
                   np.stack(labels) if len(labels) == len(names) else None, names, images)



def tile_source(images, voc_root, synthetic, stack: contextlib.ExitStack, echo: Echo):
    """(samples, load, description) for :func:`draw_tiles` from exactly one source."""
    from fcn_deploy.voc import list_split, read_sample, write_synthetic_voc

    given = [n for n, v in (("--images", images), ("--voc-root", voc_root), ("--synthetic", synthetic)) if v is not None]
    if len(given) > 1:
        raise UsageError(f"give one tile source, not {' and '.join(given)}")
    if images is not None:
        from fcn_deploy.images import load_rgb
        from fcn_deploy.infer.inputs import find_images

        if not Path(images).is_dir():
            raise UsageError(f"--images {images}: no such folder")
        paths = find_images([images])
        if not paths:
            raise UsageError(f"--images {images}: no images found in it")

        def load_photo(path):
            try:
                return load_rgb(path), None
            except ImageReadError as exc:
                echo(f"warning: skipping {exc}")
                return None

        return [(p.relative_to(images).as_posix(), p) for p in paths], load_photo, {"kind": "images", "path": str(images)}
    if voc_root is not None:
        samples = list_split(voc_root, "val")
        return [(s.name, s) for s in samples], read_sample, {"kind": "voc", "path": str(voc_root), "split": "val"}
    count = DEFAULT_SYNTHETIC if synthetic is None else int(synthetic)
    if count < 2:
        raise UsageError(f"--synthetic must be at least 2 images, got {count}")
    tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="fcn-check-"))
    voc = write_synthetic_voc(tmp, num_images=count, seed=0)
    samples = list_split(voc, "trainval")
    return [(s.name, s) for s in samples], read_sample, {"kind": "synthetic", "images": count, "seed": 0}


