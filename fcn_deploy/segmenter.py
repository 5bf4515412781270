"""Tiled segmentation of one image at a time with any runner: :class:`Segmenter` plans the tile
grid, normalises tiles into batches, runs the runner and stitches the logits (see
:mod:`fcn_deploy.tiling`). :mod:`fcn_deploy.infer` (the ``infer`` pipeline) and
:mod:`fcn_deploy.evaluate` build on it.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from fcn_deploy.errors import InputMismatchError, UsageError
from fcn_deploy.images import load_rgb, normalize
from fcn_deploy.limits import check_batch_size
from fcn_deploy.runners.base import Output, Runner
from fcn_deploy.tiling import (
    DEFAULT_OVERLAP,
    DEFAULT_PAD_MODE,
    DEFAULT_WINDOW,
    PAD_MODES,
    WINDOWS,
    Stitcher,
    TileBatch,
    TileBatcher,
    TileGrid,
    pad_tile,
    plan_tiles,
)
from fcn_deploy.voc import IMAGENET_MEAN, IMAGENET_STD, VOC_COLORMAP


class Segmenter:
    """Segments RGB images of any size with ``runner``'s fixed-size tiles.

    Use as ``with Segmenter(runner) as seg: labels = seg.predict("photo.jpg")``; the runner is
    activated on entry (or on first use) unless it already is, and deactivated on exit only if
    the segmenter activated it.

    Args:
        runner: any :class:`~fcn_deploy.runners.base.Runner` taking float32 (N, 3, th, tw).
        batch_size: tiles per ``runner.infer`` call (capped by the runner's ``max_batch``).
        overlap: minimum overlap of neighbouring tiles in pixels (< both tile sides).
        window: ``"hann"`` (weights toward tile centres) or ``"uniform"`` averaging.
        pad_mode: padding of images smaller than a tile, ``"constant"`` or ``"reflect"``.
    """

    def __init__(
        self,
        runner: Runner,
        *,
        batch_size: int = 8,
        overlap: int = DEFAULT_OVERLAP,
        window: str = DEFAULT_WINDOW,
        pad_mode: str = DEFAULT_PAD_MODE,
    ) -> None:
        if batch_size < 1:
            raise UsageError(f"--batch-size must be >= 1, not {batch_size}")
        if window not in WINDOWS:
            raise UsageError(f"--window must be one of {', '.join(WINDOWS)}, not {window!r}")
        if pad_mode not in PAD_MODES:
            raise UsageError(f"pad mode must be one of {', '.join(PAD_MODES)}, not {pad_mode!r}")
        if overlap < 0:
            raise UsageError(f"--overlap must be >= 0, not {overlap}")
        self.runner = runner
        self.batch_size = batch_size
        self.overlap = overlap
        self.window = window
        self.pad_mode = pad_mode
        self._owns_activation = False
        self._ready = False
        #: Tiles sent to the runner since creation (padding of a static batch excluded).
        self.tiles_run = 0

    # -- lifecycle -----------------------------------------------------------------------
    def __enter__(self) -> "Segmenter":
        self.prepare()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def prepare(self) -> None:
        """Activate the runner if needed and read tile size, normalisation and colours."""
        if self._ready and self.runner.is_active:
            return
        if not self.runner.is_active:
            self.runner.activate()
            self._owns_activation = True
        try:
            self._read_runner()
        except BaseException:
            self.close()  # a runner we activated is not left active (a CUDA context, buffers)
            raise
        self._ready = True

    def _read_runner(self) -> None:
        spec = self.runner.input_spec
        if spec is None or len(spec.shape) != 4 or spec.shape[1] != 3 or min(spec.shape[2:]) < 1:
            got = spec.describe() if spec is not None else "no input spec"
            raise InputMismatchError(
                f"{self.runner.name}: model input is {got}, expected float32 (N,3,H,W) with fixed H and W"
            )
        self.tile_hw: tuple[int, int] = self.runner.tile_hw
        if self.overlap >= min(self.tile_hw):
            raise UsageError(
                f"--overlap {self.overlap} must be smaller than the tile sides {self.tile_hw[0]}x{self.tile_hw[1]}"
            )
        meta = self.runner.meta
        self.mean = tuple(meta.get("mean", IMAGENET_MEAN))
        self.std = tuple(meta.get("std", IMAGENET_STD))
        std = np.asarray(self.std, dtype=np.float32).reshape(3, 1, 1)
        self._scale = 1.0 / (255.0 * std)
        self._shift = np.asarray(self.mean, dtype=np.float32).reshape(3, 1, 1) / std
        self.colormap = [tuple(c) for c in meta.get("colormap", VOC_COLORMAP)]
        limit = (spec.shape[0] if spec.shape[0] > 0 else None) or self.runner.max_batch
        self.effective_batch = min(self.batch_size, limit) if limit else self.batch_size
        check_batch_size(self.effective_batch, self.tile_hw, int(meta.get("num_classes") or len(self.colormap)))

    def close(self) -> None:
        if self._owns_activation:
            self.runner.deactivate()
            self._owns_activation = False
        self._ready = False

    # -- building blocks (shared with run_inference) --------------------------------------
    def plan(self, height: int, width: int) -> TileGrid:
        """The tile grid of an image of ``height`` x ``width``."""
        self.prepare()
        return plan_tiles(height, width, self.tile_hw, self.overlap)

    def write_tile(self, rgb: np.ndarray, grid: TileGrid, index: int, out: np.ndarray) -> None:
        """Normalise tile ``index`` of the (H, W, 3) uint8 ``rgb`` into ``out`` (3, th, tw) float32."""
        y0, y1, x0, x1 = grid.box(index)
        h, w = y1 - y0, x1 - x0
        if (h, w) != self.tile_hw and self.pad_mode != "constant":
            pad_tile(normalize(rgb[y0:y1, x0:x1], self.mean, self.std), self.tile_hw, self.pad_mode, out)
            return
        # normalize()'s arithmetic, written straight into the batch: (x / 255 - mean) / std
        dst = out[:, :h, :w]
        np.multiply(rgb[y0:y1, x0:x1].transpose(2, 0, 1), self._scale, out=dst)
        dst -= self._shift
        out[:, h:, :] = 0
        out[:, :h, w:] = 0

    def run_batch(self, tiles: np.ndarray, output: Output) -> np.ndarray:
        """``runner.infer`` on (n, 3, th, tw) float32 (the runner pads a short batch of a
        fixed-batch model).

        Returns (n, C, th, tw) logits or (n, th, tw) uint8 labels; any other shape is reported
        as a model / tile size mismatch.
        """
        result = self.runner.infer(tiles, output=output)
        th, tw = self.tile_hw
        if output == "logits":
            ok, expected = result.ndim == 4 and result.shape[2:] == (th, tw), f"(N,C,{th},{tw})"
        else:
            ok, expected = result.ndim == 3 and result.shape[1:] == (th, tw), f"(N,{th},{tw})"
        if not ok:
            raise InputMismatchError(
                f"{self.runner.name}: model returned {output} {tuple(result.shape)}, expected {expected}; "
                f"is it a segmentation model for {th}x{tw} tiles?"
            )
        self.tiles_run += len(tiles)
        return result

    def iter_batches(self, jobs: Iterable[tuple[Any, np.ndarray, TileGrid]]) -> Iterator[TileBatch]:
        """Normalised tile batches over ``(key, rgb, grid)`` jobs; each tile's batch key is
        ``(key, tile_index)``. A batch may end one image and start the next."""
        self.prepare()
        batcher = TileBatcher(self.effective_batch, (3, *self.tile_hw))
        for key, rgb, grid in jobs:
            for index in range(grid.count):
                self.write_tile(rgb, grid, index, batcher.slot())
                batch = batcher.commit((key, index))
                if batch is not None:
                    yield batch
        last = batcher.flush()
        if last is not None:
            yield last

    # -- one image -------------------------------------------------------------------------
    def predict(self, image: str | os.PathLike | np.ndarray) -> np.ndarray:
        """(H, W) uint8 class ids of ``image`` (a path, or an (H, W, 3) uint8 RGB array)."""
        rgb = _as_rgb(image)
        grid = self.plan(*rgb.shape[:2])
        if grid.count == 1:
            tiles = next(self.iter_batches([(None, rgb, grid)])).tiles
            return self.run_batch(tiles, "labels")[0, : grid.height, : grid.width].copy()
        return self._stitch(rgb, grid, None).labels()

    def predict_logits(self, image: str | os.PathLike | np.ndarray, dtype=np.float32) -> np.ndarray:
        """(C, H, W) averaged logits of ``image`` in ``dtype`` (this array is as large as it says:
        use :func:`run_inference` with ``save_logits`` for huge images)."""
        rgb = _as_rgb(image)
        grid = self.plan(*rgb.shape[:2])
        holder: dict[str, np.ndarray] = {}

        def alloc(num_classes: int) -> np.ndarray:
            holder["logits"] = np.empty((num_classes, grid.height, grid.width), dtype=dtype)
            return holder["logits"]

        self._stitch(rgb, grid, alloc)
        return holder["logits"]

    def _stitch(self, rgb: np.ndarray, grid: TileGrid, alloc: Callable[[int], np.ndarray] | None) -> Stitcher:
        stitcher: Stitcher | None = None
        for batch in self.iter_batches([(None, rgb, grid)]):
            logits = self.run_batch(batch.tiles, "logits")
            if stitcher is None:
                num_classes = logits.shape[1]
                stitcher = Stitcher(grid, num_classes, self.window, alloc(num_classes) if alloc else None)
            for (_, index), tile in zip(batch.keys, logits):
                stitcher.add(index, tile)
        assert stitcher is not None  # a grid has at least one tile
        return stitcher


def _as_rgb(image: str | os.PathLike | np.ndarray) -> np.ndarray:
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8 or 0 in image.shape:
            raise InputMismatchError(
                f"image array is {image.dtype} {image.shape}, expected uint8 (H, W, 3) RGB"
            )
        return image
    return load_rgb(image)


