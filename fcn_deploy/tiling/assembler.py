"""The tile assembler: cut images into normalised tile batches, take each batch's results back,
hand out finished (H, W) uint8 label maps. :class:`~fcn_deploy.infer.segmenter.Segmenter`, the
``infer`` pipeline and ``evaluate`` all go through it.

One interface, :class:`Assembler`, two implementations chosen per device by
:func:`fcn_deploy.tiling.make_assembler`:

* :class:`NumpyAssembler` (this module, host memory): tiles cut with numpy into float32 batches
  (:class:`TileBatcher`), logits averaged by :class:`Stitcher`. The default on the CPU, where it
  is the faster of the two (``benchmarks/assembler_cpu.py``).
* :class:`~fcn_deploy.tiling.torch_assembler.TorchAssembler` (torch tensors on the runner's
  device): the default on CUDA; its module says how it works and what memory it takes.

Both do the same float32 arithmetic in the same order (normalisation ``x * (1 / (255 * std))
- mean / std``; padding of :func:`~fcn_deploy.tiling.grid.pad_tile`; windows of
:func:`~fcn_deploy.tiling.grid.tile_window`; products then sums in tile order), so they give the
same masks; ties of the argmax go to the first class on both.

Shapes and dtypes of the numpy side: logits handed to :meth:`Stitcher.add` are (C, th, tw)
float32 or float16; :meth:`Stitcher.labels` is (H, W) uint8; the optional streamed logits
(``logits_out``) are (C, H, W), float16 by convention. The Stitcher never holds a (C, H, W)
float buffer: it accumulates one band of ``min(th, H)`` rows and finalises (argmax, and
optionally writes averaged logits) every row no later tile touches, so its memory is
``(C + 1) * min(th, H) * W * 4 + H*W`` bytes plus the batches, whatever H is. The pipeline
bounds how many images and batches are in flight (bounded queues).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Iterable, Iterator, Literal

import numpy as np

from fcn_deploy.tiling.clock import StageClock
from fcn_deploy.tiling.grid import (
    CHUNK_ROWS,
    DEFAULT_PAD_MODE,
    DEFAULT_WINDOW,
    HANN_FLOOR,
    PAD_MODES,
    WINDOWS,
    TileGrid,
    Window,
    argmax_classes,
    pad_tile,
    ring_pieces,
    tile_window,
)


Output = Literal["logits", "labels"]


@dataclass(eq=False)
class ImageJob:
    """One image going through an assembler.

    ``rgb`` is the (H, W, 3) uint8 image, ``grid`` its tile grid; ``logits_out``, when given,
    is called once with the class count and returns a (C, H, W) array-like (e.g. a float16
    ``np.memmap``) that receives the averaged logits. ``labels`` is the (H, W) uint8 label map
    once the image is finished (on CUDA its download may still be in flight when the assembler
    hands the job out: the first read of ``labels`` waits for it, in the reader's thread).
    ``key`` and ``data`` belong to the caller.
    """

    key: Any
    rgb: np.ndarray | None
    grid: TileGrid
    logits_out: Callable[[int], Any] | None = None
    data: Any = None
    _labels: np.ndarray | None = field(default=None, repr=False)
    _pending: Callable[[], np.ndarray] | None = field(default=None, repr=False)
    _acc: Any = field(default=None, repr=False)

    @property
    def labels(self) -> np.ndarray | None:
        if self._pending is not None:
            self._labels, self._pending = self._pending(), None
        return self._labels

    @labels.setter
    def labels(self, value: np.ndarray | None) -> None:
        self._labels, self._pending = value, None

    @property
    def finished(self) -> bool:
        """True once the labels are set or on their way to the host."""
        return self._labels is not None or self._pending is not None


@dataclass
class Batch:
    """Up to B tiles, (n, 3, th, tw) float32 (numpy or a torch tensor on the assembler's
    device), and for each tile its (job, tile index). ``tiles`` may hold more rows than
    ``keys`` (zeros: a CUDA batch keeps the batch size); results of those rows are ignored."""

    tiles: Any
    keys: list[tuple[ImageJob, int]]

    @property
    def single_tiles(self) -> bool:
        """True when every tile is a whole image (no overlap to average: labels suffice)."""
        return all(job.grid.count == 1 for job, _ in self.keys)


class Assembler:
    """Cuts :class:`ImageJob` images into :class:`Batch` es and assembles their results.

    Use: ``for batch in asm.batches(jobs): result = runner.infer(batch.tiles, output);
    for job in asm.add(batch, result, output): ... job.labels ...``. :meth:`batches` and
    :meth:`add` may run in different threads (one each); images finish in the order given.

    Args:
        tile_hw: (th, tw) of the runner's tiles.
        batch_size: tiles per batch (tiles of several images share a batch).
        mean, std: per-channel normalisation, ``(x / 255 - mean) / std``.
        window: ``"hann"`` or ``"uniform"`` averaging of overlapping logits.
        pad_mode: ``"constant"`` or ``"reflect"`` padding of axes shorter than a tile.
        floor: the hann window's edge weight.
    """

    #: "numpy" or "torch".
    kind = "base"

    def __init__(
        self,
        tile_hw: tuple[int, int],
        batch_size: int,
        mean,
        std,
        *,
        window: str = DEFAULT_WINDOW,
        pad_mode: str = DEFAULT_PAD_MODE,
        floor: float = HANN_FLOOR,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        if window not in WINDOWS:
            raise ValueError(f"window must be one of {WINDOWS}, not {window!r}")
        if pad_mode not in PAD_MODES:
            raise ValueError(f"pad mode must be one of {PAD_MODES}, not {pad_mode!r}")
        self.tile_hw = (int(tile_hw[0]), int(tile_hw[1]))
        self.batch_size = int(batch_size)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.window = window
        self.pad_mode = pad_mode
        self.floor = floor
        std32 = np.asarray(self.std, dtype=np.float32).reshape(3, 1, 1)
        #: (3, 1, 1) float32 ``1 / (255 * std)`` and ``mean / std``: normalize()'s arithmetic.
        self.scale = (1.0 / (255.0 * std32)).astype(np.float32)
        self.shift = (np.asarray(self.mean, dtype=np.float32).reshape(3, 1, 1) / std32).astype(np.float32)
        #: Stage timers (``upload``, ``download``); the Segmenter shares its clock here.
        self.clock = StageClock()

    def batches(self, jobs: Iterable[ImageJob]) -> Iterator[Batch]:
        """Normalised tile batches over ``jobs``, tiles in row-major order per image; a batch
        may end one image and start the next."""
        raise NotImplementedError

    def add(self, batch: Batch, result: Any, output: Output) -> list[ImageJob]:
        """Take ``batch``'s ``result``: (n, C, th, tw) logits or, for single-tile images only,
        (n, th, tw) uint8 labels (numpy for the numpy assembler, tensors on the device for the
        torch one). Returns the jobs this batch finished, in order, with ``labels`` set."""
        finished = []
        for (job, index), tile in zip(batch.keys, result):
            grid = job.grid
            if output == "labels":
                if grid.count != 1:
                    raise ValueError(f"labels output for an image of {grid.count} tiles: logits are needed")
                job.labels = self._to_host_labels(tile[: grid.height, : grid.width])
            else:
                if job._acc is None:
                    num_classes = int(tile.shape[0])
                    out = job.logits_out(num_classes) if job.logits_out is not None else None
                    job._acc = self._stitcher(grid, num_classes, out)
                job._acc.add(index, tile)
                if job._acc.done:
                    job.labels = job._acc.labels()
                    job._acc = None
            if job.finished:
                finished.append(job)
        return finished

    def _to_host_labels(self, tile: Any) -> np.ndarray:
        raise NotImplementedError

    def _stitcher(self, grid: TileGrid, num_classes: int, logits_out: Any) -> Any:
        raise NotImplementedError


class NumpyAssembler(Assembler):
    """:class:`Assembler` in host memory: numpy tiles, :class:`~fcn_deploy.tiling.grid.Stitcher`."""

    kind = "numpy"
    device = "cpu"

    def write_tile(self, rgb: np.ndarray, grid: TileGrid, index: int, out: np.ndarray) -> None:
        """Normalise tile ``index`` of the (H, W, 3) uint8 ``rgb`` into ``out`` (3, th, tw) float32."""
        y0, y1, x0, x1 = grid.box(index)
        h, w = y1 - y0, x1 - x0
        if (h, w) != self.tile_hw and self.pad_mode != "constant":
            chw = np.ascontiguousarray(rgb[y0:y1, x0:x1].transpose(2, 0, 1), dtype=np.float32)
            chw *= self.scale
            chw -= self.shift
            pad_tile(chw, self.tile_hw, self.pad_mode, out)
            return
        dst = out[:, :h, :w]
        np.multiply(rgb[y0:y1, x0:x1].transpose(2, 0, 1), self.scale, out=dst)
        dst -= self.shift
        out[:, h:, :] = 0
        out[:, :h, w:] = 0

    def batches(self, jobs: Iterable[ImageJob]) -> Iterator[Batch]:
        batcher = TileBatcher(self.batch_size, (3, *self.tile_hw))
        for job in jobs:
            for index in range(job.grid.count):
                self.write_tile(job.rgb, job.grid, index, batcher.slot())
                batch = batcher.commit((job, index))
                if batch is not None:
                    yield Batch(batch.tiles, batch.keys)
        last = batcher.flush()
        if last is not None:
            yield Batch(last.tiles, last.keys)

    def _to_host_labels(self, tile: np.ndarray) -> np.ndarray:
        return np.array(tile, dtype=np.uint8)

    def _stitcher(self, grid: TileGrid, num_classes: int, logits_out: Any) -> Stitcher:
        return Stitcher(grid, num_classes, self.window, logits_out, self.floor)


class Stitcher:
    """Weighted average of overlapping tile logits, then argmax, in a bounded row band.

    Tiles must arrive row by row: any order within a tile row, but every tile of a row before
    the first tile of the next one (:func:`~fcn_deploy.tiling.grid.plan_tiles`' row-major index order satisfies this).
    Whenever a new tile row starts at y, the rows above y are final: their class ids go to the
    (H, W) uint8 label map and, when ``logits_out`` (an array-like (C, H, W), e.g. a float16
    ``np.memmap``) is given, their averaged logits are written there.

    Memory: ``band`` (C, min(th, H), W) float32 and ``weight`` (min(th, H), W) float32, used
    as ring buffers (image row y in band row y % min(th, H)), plus the (H, W) uint8 labels;
    never (C, H, W).
    """

    def __init__(
        self,
        grid: TileGrid,
        num_classes: int,
        window: Window = DEFAULT_WINDOW,
        logits_out: Any = None,
        floor: float = HANN_FLOOR,
    ) -> None:
        if not 1 <= num_classes <= 255:
            raise ValueError(f"num_classes must be in [1, 255] for uint8 labels, got {num_classes}")
        if logits_out is not None and tuple(logits_out.shape) != (num_classes, grid.height, grid.width):
            raise ValueError(
                f"logits_out has shape {tuple(logits_out.shape)}, expected "
                f"{(num_classes, grid.height, grid.width)}"
            )
        self.grid = grid
        self.num_classes = num_classes
        self.logits_out = logits_out
        if window not in WINDOWS:
            raise ValueError(f"window must be one of {WINDOWS}, not {window!r}")
        self.window = window
        self.floor = floor
        self._windows: dict[tuple[bool, bool, bool, bool], np.ndarray] = {}
        band_h = min(grid.tile_hw[0], grid.height)
        self.band = np.zeros((num_classes, band_h, grid.width), dtype=np.float32)
        self.weight = np.zeros((band_h, grid.width), dtype=np.float32)
        self._labels = np.empty((grid.height, grid.width), dtype=np.uint8)
        self._scratch = (
            None if window == "uniform" else np.empty((num_classes, CHUNK_ROWS, grid.tile_hw[1]), np.float32)
        )
        self._added = np.zeros(grid.count, dtype=bool)
        self._row = 0  # tile row being accumulated
        #: Image rows [0, rows_done) are final.
        self.rows_done = 0

    @property
    def done(self) -> bool:
        return self.rows_done == self.grid.height

    @property
    def buffer_bytes(self) -> int:
        """Bytes held by the stitcher's arrays (band, weights, scratch, windows, labels)."""
        scratch = 0 if self._scratch is None else self._scratch.nbytes
        windows = sum(w.nbytes for w in self._windows.values())
        return self.band.nbytes + self.weight.nbytes + scratch + windows + self._labels.nbytes

    def add(self, index: int, logits: np.ndarray) -> None:
        """Accumulate tile ``index``'s (C, th, tw) float32/float16 logits."""
        grid = self.grid
        expected = (self.num_classes, *grid.tile_hw)
        if tuple(logits.shape) != expected:
            raise ValueError(f"tile logits have shape {tuple(logits.shape)}, expected {expected}")
        if not 0 <= index < grid.count:
            raise IndexError(f"tile index {index} out of range [0, {grid.count})")
        if self._added[index]:
            raise ValueError(f"tile {index} was added twice")
        row = index // grid.cols
        if row < self._row:
            raise ValueError(f"tile {index} belongs to tile row {row}, already finalised")
        if row > self._row:
            missing = np.flatnonzero(~self._added[: row * grid.cols])
            if missing.size:
                raise ValueError(f"tile {index} of row {row} arrived before tile {missing[0]}")
            self._finalise(grid.ys[row])
            self._row = row
        y0, y1, x0, x1 = grid.box(index)
        w = x1 - x0
        win = None if self.window == "uniform" else self._tile_window(index)
        for ring_row, offset, n in self._ring(y0, y1):
            for r in range(0, n, CHUNK_ROWS):  # row chunks keep the scratch in cache
                m = min(CHUNK_ROWS, n - r)
                src = logits[:, offset + r: offset + r + m, :w]
                dst = self.band[:, ring_row + r: ring_row + r + m, x0:x1]
                weight = self.weight[ring_row + r: ring_row + r + m, x0:x1]
                if win is None:
                    dst += src
                    weight += 1.0
                else:
                    tmp = self._scratch[:, :m, :w]
                    np.multiply(src, win[offset + r: offset + r + m, :w], out=tmp)
                    dst += tmp
                    weight += win[offset + r: offset + r + m, :w]
        self._added[index] = True
        if self._added.all():
            self._finalise(grid.height)

    def _tile_window(self, index: int) -> np.ndarray:
        """(th, tw) weights of tile ``index``, flat towards the image borders it lies on."""
        grid = self.grid
        row, col = divmod(index, grid.cols)
        borders = (row == 0, row == grid.rows - 1, col == 0, col == grid.cols - 1)
        if borders not in self._windows:
            self._windows[borders] = tile_window(grid.tile_hw, self.window, self.floor, borders)
        return self._windows[borders]

    def labels(self) -> np.ndarray:
        """(H, W) uint8 class ids; every tile must have been added."""
        if not self.done:
            missing = int((~self._added).sum())
            raise ValueError(f"{missing} of {self.grid.count} tiles not added yet")
        return self._labels

    def _ring(self, start: int, stop: int) -> Iterator[tuple[int, int, int]]:
        return ring_pieces(start, stop, self.band.shape[1])

    def _finalise(self, stop: int) -> None:
        """Make image rows [rows_done, stop) final and free their band rows."""
        start = self.rows_done
        for ring_row, offset, n in self._ring(start, stop) if stop > start else ():
            acc = self.band[:, ring_row: ring_row + n]
            rows = slice(start + offset, start + offset + n)
            self._labels[rows] = argmax_classes(acc)
            if self.logits_out is not None:
                self.logits_out[:, rows] = acc / self.weight[ring_row: ring_row + n]
            if stop < self.grid.height:  # the rows are reused for rows further down
                acc[...] = 0
                self.weight[ring_row: ring_row + n] = 0
        self.rows_done = stop


@dataclass
class TileBatch:
    """Up to ``batch_size`` tiles (N, C, th, tw) and one caller-chosen key per tile."""

    tiles: np.ndarray
    keys: list[Hashable]


class TileBatcher:
    """Packs tiles (from any number of images) into fresh (N, C, th, tw) batches.

    Write a tile into :meth:`slot`, then :meth:`commit` it with a key; ``commit`` returns a full
    :class:`TileBatch` every ``batch_size`` tiles, :meth:`flush` the last partial one.
    """

    def __init__(self, batch_size: int, tile_shape: tuple[int, int, int], dtype=np.float32) -> None:
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.tile_shape = tuple(tile_shape)
        self.dtype = np.dtype(dtype)
        self._new()

    def _new(self) -> None:
        self._buf = np.empty((self.batch_size, *self.tile_shape), dtype=self.dtype)
        self._keys: list[Hashable] = []

    def slot(self) -> np.ndarray:
        """The (C, th, tw) view the next tile is written into."""
        return self._buf[len(self._keys)]

    def commit(self, key: Hashable) -> TileBatch | None:
        self._keys.append(key)
        if len(self._keys) < self.batch_size:
            return None
        batch = TileBatch(self._buf, self._keys)
        self._new()
        return batch

    def flush(self) -> TileBatch | None:
        if not self._keys:
            return None
        batch = TileBatch(self._buf[: len(self._keys)], self._keys)
        self._new()
        return batch
