"""The tile assembler: cut images into normalised tile batches, take each batch's results back,
hand out finished (H, W) uint8 label maps. :class:`~fcn_deploy.segmenter.Segmenter`, the
``infer`` pipeline and ``evaluate`` all go through it.

One interface, :class:`Assembler`, two implementations chosen per device by
:func:`make_assembler`:

* :class:`NumpyAssembler` (host memory): tiles cut with numpy into float32 batches, logits
  averaged by :class:`~fcn_deploy.tiling.grid.Stitcher`. The default on the CPU, where it is
  the faster of the two (``benchmarks/assembler_cpu.py``).
* :class:`TorchAssembler` (torch tensors on the runner's device, ``"cpu"`` or ``"cuda:N"``):
  each image is uploaded once as uint8 (through pinned staging memory, ``non_blocking``, on
  CUDA); its tiles are cut and normalised on the device into the batch tensor; the
  window-weighted logits are accumulated on the device in a ring buffer of one band of tile
  rows; the argmax runs on the device; only the uint8 labels (and, if asked, the averaged
  logits as float16) cross to the host, one band at a time. The default on CUDA.

Both do the same float32 arithmetic in the same order (normalisation ``x * (1 / (255 * std))
- mean / std``; padding of :func:`~fcn_deploy.tiling.grid.pad_tile`; windows of
:func:`~fcn_deploy.tiling.grid.tile_window`; products then sums in tile order), so they give the
same masks; ties of the argmax go to the first class on both.

Memory of one image in flight, with C classes, an H x W image, tiles th x tw, a batch of B:

* TorchAssembler, on its device: ``3*H*W`` (uint8 image, released once its tiles are cut)
  ``+ (C + 1) * min(th, H) * W * 4`` (band and weights) ``+ C*th*tw*4`` (product scratch)
  ``+ 9*th*tw*4`` (windows: at most 9 border cases, shared by all images)
  ``+ 20 * min(th, H) * W`` (argmax temporaries of one band: maximum float32, index int64,
  NaN mask and uint8 labels; averaged logits float32 and float16 when saved) per image, plus
  ``B*3*th*tw*4`` per tile batch in flight and the runner's ``B*C*th*tw*4`` output. On the
  host: the (H, W) uint8 label map. Never (C, H, W). (On CPU tensors the image and the windows
  share the numpy arrays' memory.) ``tests/test_assembler.py`` traces this for 8000x8000.
* NumpyAssembler: the Stitcher's ``(C + 1) * min(th, H) * W * 4 + H*W`` plus the batches.

The pipeline bounds how many images and batches are in flight (bounded queues).
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Literal

import numpy as np

from fcn_deploy.tiling.grid import (
    DEFAULT_PAD_MODE,
    DEFAULT_WINDOW,
    HANN_FLOOR,
    PAD_MODES,
    WINDOWS,
    Stitcher,
    TileBatcher,
    TileGrid,
    pad_tile,
    tile_window,
)

Output = Literal["logits", "labels"]
AssemblerKind = Literal["auto", "numpy", "torch"]
ASSEMBLER_KINDS: tuple[str, ...] = ("auto", "numpy", "torch")


class StageClock:
    """Seconds per pipeline stage, summed over calls and threads (``time.perf_counter``).

    Stages: ``decode``, ``tiles`` (cut and normalise, upload included), ``upload``, ``engine``,
    ``stitch`` (accumulate and argmax, download included), ``download``, ``encode``. Summed
    over threads, so stages that overlap can add up to more than the wall time. On CUDA the
    host only enqueues work: ``upload`` is the pinned staging copy plus the enqueue of the
    device copy, ``engine`` what the runner's ``infer`` blocks for, and ``download`` the
    device-to-host copies of labels and logits, which wait for every kernel queued before them
    (so device time of the stitching kernels lands in ``download``).
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._lock = threading.Lock()

    def add(self, stage: str, seconds: float) -> None:
        with self._lock:
            self.seconds[stage] += seconds

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(stage, time.perf_counter() - start)


@dataclass(eq=False)
class ImageJob:
    """One image going through an assembler.

    ``rgb`` is the (H, W, 3) uint8 image, ``grid`` its tile grid; ``logits_out``, when given,
    is called once with the class count and returns a (C, H, W) array-like (e.g. a float16
    ``np.memmap``) that receives the averaged logits. ``labels`` is set, (H, W) uint8, once the
    image is finished. ``key`` and ``data`` belong to the caller.
    """

    key: Any
    rgb: np.ndarray | None
    grid: TileGrid
    logits_out: Callable[[int], Any] | None = None
    data: Any = None
    labels: np.ndarray | None = None
    _acc: Any = field(default=None, repr=False)


@dataclass
class Batch:
    """Up to B tiles, (n, 3, th, tw) float32 (numpy or a torch tensor on the assembler's
    device), and for each tile its (job, tile index)."""

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
            if job.labels is not None:
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


class TorchAssembler(Assembler):
    """:class:`Assembler` on torch tensors on ``device`` (see the module docstring)."""

    kind = "torch"

    def __init__(self, *args, device: str = "cpu", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        import torch

        self.torch = torch
        self.device = torch.device(device)
        self._scale = torch.from_numpy(self.scale).to(self.device)
        self._shift = torch.from_numpy(self.shift).to(self.device)
        self._pinned = self.device.type == "cuda"
        self._reflect: dict[tuple[int, int], Any] = {}
        self._windows: dict[tuple[bool, bool, bool, bool], Any] = {}

    def upload(self, rgb: np.ndarray):
        """(H, W, 3) uint8 numpy -> the same as a uint8 tensor on the device (on CUDA through
        pinned staging memory, asynchronously; on the CPU without a copy)."""
        torch = self.torch
        src = torch.from_numpy(np.ascontiguousarray(rgb))
        if not self._pinned:
            return src.to(self.device)
        with self.clock("upload"):
            staged = torch.empty(src.shape, dtype=torch.uint8, pin_memory=True)
            staged.copy_(src)
            return staged.to(self.device, non_blocking=True)

    def _reflect_index(self, n: int, size: int):
        """Indices of np.pad(..., mode="reflect") of an axis of ``n`` to ``size`` (on the device)."""
        key = (n, size)
        if key not in self._reflect:
            idx = np.pad(np.arange(n), (0, size - n), mode="reflect")
            self._reflect[key] = self.torch.from_numpy(idx).to(self.device)
        return self._reflect[key]

    def write_tile(self, image, grid: TileGrid, index: int, out) -> None:
        """Normalise tile ``index`` of the (H, W, 3) uint8 device ``image`` into ``out``
        (3, th, tw) float32 on the device (the arithmetic of :meth:`NumpyAssembler.write_tile`)."""
        torch = self.torch
        y0, y1, x0, x1 = grid.box(index)
        h, w = y1 - y0, x1 - x0
        crop = image[y0:y1, x0:x1].permute(2, 0, 1)
        th, tw = self.tile_hw
        if (h, w) != self.tile_hw and self.pad_mode != "constant":
            crop = crop.index_select(1, self._reflect_index(h, th)).index_select(2, self._reflect_index(w, tw))
            torch.mul(crop, self._scale, out=out)
            out.sub_(self._shift)
            return
        dst = out[:, :h, :w]
        torch.mul(crop, self._scale, out=dst)
        dst.sub_(self._shift)
        if h < th:
            out[:, h:, :] = 0
        if w < tw:
            out[:, :h, w:] = 0

    def batches(self, jobs: Iterable[ImageJob]) -> Iterator[Batch]:
        torch = self.torch
        buf, keys = None, []
        for job in jobs:
            image = self.upload(job.rgb)
            for index in range(job.grid.count):
                if buf is None:  # a fresh tensor per batch: the runner may still read the last one
                    buf = torch.empty((self.batch_size, 3, *self.tile_hw), dtype=torch.float32, device=self.device)
                self.write_tile(image, job.grid, index, buf[len(keys)])
                keys.append((job, index))
                if len(keys) == self.batch_size:
                    yield Batch(buf, keys)
                    buf, keys = None, []
            del image
        if keys:
            yield Batch(buf[: len(keys)], keys)

    def _to_host_labels(self, tile) -> np.ndarray:
        return np.array(tile.to(dtype=self.torch.uint8).cpu().numpy(), dtype=np.uint8)

    def window_tensor(self, grid: TileGrid, index: int):
        """(th, tw) float32 device weights of tile ``index`` (flat towards the image borders)."""
        row, col = divmod(index, grid.cols)
        borders = (row == 0, row == grid.rows - 1, col == 0, col == grid.cols - 1)
        if borders not in self._windows:
            win = tile_window(grid.tile_hw, self.window, self.floor, borders)
            self._windows[borders] = self.torch.from_numpy(win).to(self.device)
        return self._windows[borders]

    def _stitcher(self, grid: TileGrid, num_classes: int, logits_out: Any) -> "TorchStitcher":
        return TorchStitcher(self, grid, num_classes, logits_out)


class TorchStitcher:
    """:class:`~fcn_deploy.tiling.grid.Stitcher` on device tensors (same rules, same arithmetic).

    Memory on the device: ``band`` (C, min(th, H), W) float32, ``weight`` (min(th, H), W)
    float32 (ring buffers: image row y in band row y % min(th, H)), a (C, th, tw) float32
    product scratch (hann only); per finalised band, its argmax temporaries. On the host: the
    (H, W) uint8 labels.
    """

    def __init__(self, asm: TorchAssembler, grid: TileGrid, num_classes: int, logits_out: Any = None) -> None:
        if not 1 <= num_classes <= 255:
            raise ValueError(f"num_classes must be in [1, 255] for uint8 labels, got {num_classes}")
        if logits_out is not None and tuple(logits_out.shape) != (num_classes, grid.height, grid.width):
            raise ValueError(
                f"logits_out has shape {tuple(logits_out.shape)}, expected {(num_classes, grid.height, grid.width)}"
            )
        torch = asm.torch
        self.asm, self.grid, self.num_classes, self.logits_out = asm, grid, num_classes, logits_out
        self.torch = torch
        band_h = min(grid.tile_hw[0], grid.height)
        dev = asm.device
        self.band = torch.zeros((num_classes, band_h, grid.width), dtype=torch.float32, device=dev)
        self.weight = torch.zeros((band_h, grid.width), dtype=torch.float32, device=dev)
        self._scratch = (
            None if asm.window == "uniform"
            else torch.empty((num_classes, *grid.tile_hw), dtype=torch.float32, device=dev)
        )
        self._labels = np.empty((grid.height, grid.width), dtype=np.uint8)
        self._added = np.zeros(grid.count, dtype=bool)
        self._row = 0
        self.rows_done = 0
        self._out_dtype = (
            torch.float16 if logits_out is not None and np.dtype(logits_out.dtype) == np.float16 else torch.float32
        )

    @property
    def done(self) -> bool:
        return self.rows_done == self.grid.height

    @property
    def buffer_bytes(self) -> int:
        """Device bytes of band, weights and scratch (windows are shared by the assembler)."""
        scratch = 0 if self._scratch is None else self._scratch.nbytes
        return self.band.nbytes + self.weight.nbytes + scratch

    def add(self, index: int, logits) -> None:
        """Accumulate tile ``index``'s (C, th, tw) float32/float16 device logits."""
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
        win = None if self._scratch is None else self.asm.window_tensor(grid, index)
        for ring_row, offset, n in self._ring(y0, y1):
            src = logits[:, offset: offset + n, :w]
            dst = self.band[:, ring_row: ring_row + n, x0:x1]
            weight = self.weight[ring_row: ring_row + n, x0:x1]
            if win is None:
                dst += src
                weight += 1.0
            else:
                tmp = self._scratch[:, :n, :w]
                self.torch.mul(src, win[offset: offset + n, :w], out=tmp)
                dst += tmp
                weight += win[offset: offset + n, :w]
        self._added[index] = True
        if self._added.all():
            self._finalise(grid.height)

    def labels(self) -> np.ndarray:
        """(H, W) uint8 class ids on the host; every tile must have been added."""
        if not self.done:
            missing = int((~self._added).sum())
            raise ValueError(f"{missing} of {self.grid.count} tiles not added yet")
        return self._labels

    def _ring(self, start: int, stop: int) -> Iterator[tuple[int, int, int]]:
        band_h = self.band.shape[1]
        first_row = start % band_h
        first = min(stop - start, band_h - first_row)
        yield first_row, 0, first
        if first < stop - start:
            yield 0, first, stop - start - first

    def _finalise(self, stop: int) -> None:
        """Argmax (first maximum; NaN -> 255) of image rows [rows_done, stop) on the device;
        labels (and averaged logits) to the host; free their band rows."""
        torch = self.torch
        start = self.rows_done
        for ring_row, offset, n in self._ring(start, stop) if stop > start else ():
            acc = self.band[:, ring_row: ring_row + n]
            rows = slice(start + offset, start + offset + n)
            best, index = torch.max(acc, dim=0)
            labels = index.to(torch.uint8).masked_fill_(torch.isnan(best), 255)
            with self.asm.clock("download"):
                self._labels[rows] = labels.cpu().numpy()
            if self.logits_out is not None:
                mean = (acc / self.weight[ring_row: ring_row + n]).to(self._out_dtype)
                with self.asm.clock("download"):
                    mean = mean.cpu().numpy()
                self.logits_out[:, rows] = mean
            if stop < self.grid.height:
                acc.zero_()
                self.weight[ring_row: ring_row + n].zero_()
        self.rows_done = stop


def make_assembler(
    kind: AssemblerKind = "auto",
    *,
    device: str = "cpu",
    tile_hw: tuple[int, int],
    batch_size: int,
    mean,
    std,
    window: str = DEFAULT_WINDOW,
    pad_mode: str = DEFAULT_PAD_MODE,
    floor: float = HANN_FLOOR,
) -> Assembler:
    """The assembler for a runner on ``device``: ``"auto"`` picks numpy on the CPU (faster
    there, ``benchmarks/assembler_cpu.py``) and torch on CUDA; ``"torch"`` / ``"numpy"`` force
    one (``"numpy"`` only for a CPU runner)."""
    if kind not in ASSEMBLER_KINDS:
        raise ValueError(f"assembler must be one of {ASSEMBLER_KINDS}, not {kind!r}")
    on_cpu = str(device).split(":")[0] == "cpu"
    if kind == "numpy" and not on_cpu:
        raise ValueError(f"the numpy assembler needs a CPU runner, not one on {device}")
    args = (tile_hw, batch_size, mean, std)
    kwargs = dict(window=window, pad_mode=pad_mode, floor=floor)
    if kind == "numpy" or (kind == "auto" and on_cpu):
        return NumpyAssembler(*args, **kwargs)
    return TorchAssembler(*args, device=device, **kwargs)
