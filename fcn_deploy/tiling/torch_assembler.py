"""The torch tile assembler (the default on CUDA; the interface and the numpy one:
:mod:`fcn_deploy.tiling.assembler`).

:class:`TorchAssembler` (torch tensors on the runner's device, ``"cpu"`` or ``"cuda:N"``):
each image is uploaded once as uint8 (through pinned staging memory, ``non_blocking``, on
CUDA); its tiles are cut and normalised on the device into the batch tensor; the
window-weighted logits are accumulated on the device in a ring buffer of one band of tile
rows; the argmax runs on the device; only the uint8 labels (and, if asked, the averaged
logits as float16) cross to the host, one band at a time. The default on CUDA. Small
images (class sums of at most :data:`WHOLE_IMAGE_BAND_BYTES`, logits not saved) share the
:class:`~fcn_deploy.tiling.arena.SmallImageArena` instead: one accumulation and one argmax
per batch however many photos it holds.

Memory of one image in flight, with C classes, an H x W image, tiles th x tw, a batch of B:

* TorchAssembler, on its device (:func:`torch_memory_bound` computes it): ``3*H*W`` (uint8
  image, released once its tiles are cut) ``+ (C + 1) * R * W * 4`` (band and, only when the
  logits are saved, weights; R = H when ``C*H*W*4`` <= :data:`WHOLE_IMAGE_BAND_BYTES`, else
  ``min(th, H)``) ``+ 14 * R * W`` (argmax temporaries: maximum float32, index int64, NaN
  mask, uint8 labels) ``+ 6 * C * R * W`` (saved logits: their float32 mean and float16 copy)
  ``+ 2*B*C*th*tw*4 + 7*B*th*tw`` (one group's weighted logits and their
  reordered copy, its windows and gathered uint8 pixels) ``+ 40 * (count + rows*th +
  cols*tw)`` (the grid's index tensors), plus, for the pipeline around it, ``6 * B*3*th*tw*4``
  (tile batches queued, on the device and awaiting stitching) and ``3 * B*C*th*tw*4`` (runner
  results not yet stitched: the Segmenter lets at most
  :data:`~fcn_deploy.infer.segmenter.DEVICE_BATCHES_IN_FLIGHT` batches run ahead on the device).
  On the host: the (H, W) uint8 label map (pinned on CUDA). Never (C, H, W) beyond the 32 MiB
  above. For a small image the arena comes on top (:func:`~fcn_deploy.tiling.arena.arena_bytes`,
  its argmax temporaries ``14 * (B*th*tw + P)`` and index maps ``12 * (rows*th + cols*tw)``),
  allocated once for all small images. ``tests/test_assembler.py`` traces this for 8000x8000
  on the CPU, ``tests/test_arena.py`` for small photos, the GPU session on CUDA.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator

import numpy as np

from fcn_deploy.tiling.arena import SmallImageArena, Slot, arena_bytes
from fcn_deploy.tiling.assembler import Assembler, Batch, ImageJob, Output
from fcn_deploy.tiling.grid import TileGrid, axis_window, ring_pieces


#: A TorchStitcher keeps the whole image's (C, H, W) float32 sums (no ring buffer, one argmax
#: and one download per image) when they take at most this many bytes: 32 MiB holds 21 classes
#: of a 0.4-megapixel photo, where per-band work would cost more launches than the image's tiles.
WHOLE_IMAGE_BAND_BYTES = 32 << 20


def whole_image_fits(grid: TileGrid, num_classes: int) -> bool:
    """True when the (C, H, W) float32 class sums of an image of ``grid`` fit in
    :data:`WHOLE_IMAGE_BAND_BYTES`: a :class:`TorchStitcher` then keeps the whole image as its
    band and, when its averaged logits are not saved, it goes to the small-image arena."""
    return num_classes * grid.height * grid.width * 4 <= WHOLE_IMAGE_BAND_BYTES


class TorchAssembler(Assembler):
    """:class:`Assembler` on torch tensors on ``device`` (see the module docstring).

    Work is vectorised per *group* (the tiles of one image that share a batch and a tile row),
    not per tile: one gather cuts and one multiply-subtract normalises a group's tiles, one
    ``index_add_`` accumulates its window-weighted logits into the band. On CUDA, label maps go
    to the host through pinned memory without blocking the calling thread (see
    :class:`ImageJob`).
    """

    kind = "torch"

    def __init__(self, *args, device: str = "cpu", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        import torch

        self.torch = torch
        self.device = torch.device(device)
        self._cuda = self.device.type == "cuda"  # pragma: no mutate (CPU tests cannot tell)
        self._scale = torch.from_numpy(self.scale).to(self.device)  # pragma: no mutate (device: CUDA only)
        self._shift = torch.from_numpy(self.shift).to(self.device)  # pragma: no mutate (device: CUDA only)
        self._indexes: dict[tuple[int, int], GridIndex] = {}
        #: The small-image arena (:mod:`fcn_deploy.tiling.arena`), made at the first small image.
        self.arena: SmallImageArena | None = None
        #: The last, short batch keeps the batch size (zero tiles after the real ones): on CUDA
        #: a new batch shape would cost the engine a new cuDNN algorithm search (onnxruntime's
        #: default is exhaustive) or a new autotuning; on the CPU the zero tiles would cost more.
        self.keep_batch_shape = self._cuda

    def upload(self, rgb):
        """(H, W, 3) uint8 numpy -> the same as a uint8 tensor on the device (on CUDA through
        pinned staging memory, asynchronously; on the CPU without a copy). A tensor (e.g.
        decoded on the device, :mod:`fcn_deploy.infer.gpu_decode`) is moved there if it is not."""
        torch = self.torch
        if isinstance(rgb, torch.Tensor):
            return rgb.to(self.device)
        src = torch.from_numpy(np.ascontiguousarray(rgb))
        if not self._cuda:
            return src.to(self.device)
        with self.clock("upload"):  # pragma: no mutate
            # pragma: no mutate block (CUDA only, run by the gpu tests: docs/testing.md)
            staged = torch.empty(src.shape, dtype=torch.uint8, pin_memory=True)
            staged.copy_(src)
            return staged.to(self.device, non_blocking=True)

    def index(self, grid: TileGrid) -> "GridIndex":
        """The device index tensors of ``grid`` (cached for the last 16 image sizes)."""
        key = (grid.height, grid.width)
        found = self._indexes.get(key)
        if found is None or found.grid != grid:
            if len(self._indexes) >= 16:
                self._indexes.pop(next(iter(self._indexes)))
            found = self._indexes[key] = GridIndex(self, grid)
        return found

    def cut(self, image, grid: TileGrid, first: int, stop: int, out) -> None:
        """Normalise tiles [first, stop) of the (H, W, 3) uint8 device ``image`` into ``out``
        (stop - first, 3, th, tw) float32 on the device: one gather, one multiply, one subtract
        (the arithmetic of :meth:`NumpyAssembler.write_tile`; padding by index maps)."""
        ix = self.index(grid)
        rows, cols = ix.tile_row[first:stop], ix.tile_col[first:stop]
        ys, xs = ix.row_pixels.index_select(0, rows), ix.col_pixels.index_select(0, cols)
        tiles = image[ys[:, :, None], xs[:, None, :]]  # (k, th, tw, 3) uint8
        self.torch.mul(tiles.permute(0, 3, 1, 2), self._scale, out=out)
        out.sub_(self._shift)
        if ix.pad_mask is not None:  # constant padding: zeros after normalisation, as pad_tile
            out.masked_fill_(~ix.pad_mask, 0.0)

    def batches(self, jobs: Iterable[ImageJob]) -> Iterator[Batch]:
        torch = self.torch
        size = self.batch_size
        buf, keys = None, []
        for job in jobs:
            image = self.upload(job.rgb)
            count, first = job.grid.count, 0
            while first < count:
                if buf is None:  # a fresh tensor per batch: the runner may still read the last one
                    buf = torch.empty((size, 3, *self.tile_hw), dtype=torch.float32, device=self.device)
                stop = min(count, first + size - len(keys))
                self.cut(image, job.grid, first, stop, buf[len(keys): len(keys) + stop - first])
                keys.extend((job, i) for i in range(first, stop))
                first = stop
                if len(keys) == size:
                    yield Batch(buf, keys)
                    buf, keys = None, []
            del image
        if keys:
            if self.keep_batch_shape:  # zeros after the tiles
                buf[len(keys):].zero_()
                yield Batch(buf, keys)
            else:
                yield Batch(buf[: len(keys)], keys)

    def add(self, batch: Batch, result: Any, output: Output) -> list[ImageJob]:
        keys, finished = batch.keys, []
        if output == "labels":
            if any(job.grid.count != 1 for job, _ in keys):
                raise ValueError("labels output for an image of several tiles: logits are needed")
            host, ready = self._to_host(result)
            for i, (job, _) in enumerate(keys):
                h, w = job.grid.height, job.grid.width
                job._pending = lambda i=i, h=h, w=w: (ready(), np.array(host[i, :h, :w], dtype=np.uint8))[1]
                finished.append(job)
            return finished
        num_classes = int(result.shape[1])
        small: list[tuple[ImageJob, int, int, int]] = []  # arena runs: (job, first tile, position, count)
        done: list[tuple[int, ImageJob]] = []  # (position of the last tile, job)
        i = 0
        while i < len(keys):  # groups: consecutive tiles of one image (and, banded, one tile row)
            job, first = keys[i]
            if self._in_arena(job, num_classes):
                j = i + 1
                while j < len(keys) and keys[j][0] is job and keys[j][1] == first + j - i:
                    j += 1
                small.append((job, first, i, j - i))
                i = j
                continue
            cols = job.grid.cols
            j = i + 1
            while j < len(keys) and keys[j][0] is job and keys[j][1] == first + j - i and keys[j][1] // cols == first // cols:
                j += 1
            if job._acc is None:
                out = job.logits_out(num_classes) if job.logits_out is not None else None
                job._acc = TorchStitcher(self, job.grid, num_classes, out)
            job._acc.add_group(first, result[i:j])
            if job._acc.done:
                job._pending, job._acc = job._acc.labels_later(), None
                done.append((j - 1, job))
            i = j
        if small:
            done += self.arena.add(small, result)
            done.sort(key=lambda pair: pair[0])
        return [job for _, job in done]

    def _in_arena(self, job: ImageJob, num_classes: int) -> bool:
        """True when ``job``'s sums live in the small-image arena (made here at the first one):
        a small image whose averaged logits are not saved."""
        if job._acc is not None:
            return isinstance(job._acc, Slot)
        if job.logits_out is not None or not whole_image_fits(job.grid, num_classes):
            return False
        if self.arena is None:
            self.arena = SmallImageArena(self.torch, self.device, num_classes, self.batch_size, self.tile_hw,
                                         window=self.window, floor=self.floor, band_bytes=WHOLE_IMAGE_BAND_BYTES)
        return True

    def _to_host(self, labels) -> tuple[np.ndarray, Callable[[], None]]:
        """(n, th, tw) device labels -> (host array, wait()): on CUDA an asynchronous copy to
        pinned memory and an event to wait for; on the CPU the tensor's own memory."""
        torch = self.torch
        labels = labels.to(torch.uint8)
        if not self._cuda:
            return labels.numpy(), lambda: None
        # pragma: no mutate block (CUDA only, run by the gpu tests: docs/testing.md)
        pinned = torch.empty(labels.shape, dtype=torch.uint8, pin_memory=True)
        pinned.copy_(labels, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return pinned.numpy(), event.synchronize


class GridIndex:
    """Index tensors (on the assembler's device) that cut and place the tiles of one grid.

    ``tile_row`` / ``tile_col`` (count,) int64: each tile's row and column; ``row_pixels``
    (rows, th) / ``col_pixels`` (cols, tw) int64: the image rows / columns each tile row /
    column reads (padding: reflected, or clamped and masked by ``pad_mask`` (1, 1, th, tw)
    for constant padding); ``col_targets`` (cols, w) int64: the image columns a tile column's
    logits land on; ``win_rows`` (rows, th) / ``win_cols`` (cols, tw) float32: the separable
    averaging window of :func:`~fcn_deploy.tiling.grid.tile_window` (None when uniform).
    """

    def __init__(self, asm: TorchAssembler, grid: TileGrid) -> None:
        torch, dev = asm.torch, asm.device
        th, tw = grid.tile_hw
        self.grid = grid
        h, w = min(th, grid.height), min(tw, grid.width)  # < the tile side only for a 1-tile axis

        def pixels(origins, n, size):
            base = np.arange(size)
            if n < size:
                base = np.pad(np.arange(n), (0, size - n), mode="reflect") if asm.pad_mode == "reflect" \
                    else np.minimum(base, n - 1)
            return torch.from_numpy(np.asarray(origins)[:, None] + base[None, :]).to(dev)

        t = torch.arange(grid.count)
        self.tile_row = (t // grid.cols).to(dev)
        self.tile_col = (t % grid.cols).to(dev)
        self.row_pixels = pixels(grid.ys, h, th)
        self.col_pixels = pixels(grid.xs, w, tw)
        self.pad_mask = None
        if asm.pad_mode == "constant" and (h < th or w < tw):
            mask = np.zeros((th, tw), dtype=bool)
            mask[:h, :w] = True
            self.pad_mask = torch.from_numpy(mask).to(dev)[None, None]
        self.col_targets = torch.from_numpy(np.asarray(grid.xs)[:, None] + np.arange(w)[None, :]).to(dev)
        self.win_rows = self.win_cols = None
        if asm.window != "uniform":
            last_r, last_c = grid.rows - 1, grid.cols - 1
            wy = [axis_window(th, asm.window, asm.floor, r == 0, r == last_r) for r in range(grid.rows)]
            wx = [axis_window(tw, asm.window, asm.floor, c == 0, c == last_c) for c in range(grid.cols)]
            self.win_rows = torch.from_numpy(np.stack(wy)).to(dev)
            self.win_cols = torch.from_numpy(np.stack(wx)).to(dev)


class TorchStitcher:
    """:class:`~fcn_deploy.tiling.grid.Stitcher` on device tensors (same rules, same arithmetic,
    same order of the sums), taking a group of tiles of one tile row at a time.

    Memory on the device: ``band`` (C, min(th, H), W) float32 (a ring buffer: image row y in
    band row y % min(th, H)), or (C, H, W) when that takes at most
    :data:`WHOLE_IMAGE_BAND_BYTES`; ``weight`` (band rows, W) float32 only when the averaged
    logits are saved (the argmax does not need them: the weights are the same for every class).
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
        self.index = asm.index(grid)
        #: Whole image in the band (see WHOLE_IMAGE_BAND_BYTES): finalised once, at the end.
        self.whole = whole_image_fits(grid, num_classes)
        band_h = grid.height if self.whole else min(grid.tile_hw[0], grid.height)
        dev = asm.device
        self.band = torch.zeros((num_classes, band_h, grid.width), dtype=torch.float32, device=dev)
        self.weight = (
            None if logits_out is None else torch.zeros((band_h, grid.width), dtype=torch.float32, device=dev)
        )
        self._labels = np.empty((grid.height, grid.width), dtype=np.uint8)
        self._downloads: list[tuple[slice, Any]] = []  # pragma: no mutate (CUDA: image rows, pinned labels in flight)
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
        """Device bytes of band and weights (the grid's index tensors are shared)."""
        return self.band.nbytes + (0 if self.weight is None else self.weight.nbytes)

    def add(self, index: int, logits) -> None:
        """Accumulate tile ``index``'s (C, th, tw) float32/float16 device logits."""
        self.add_group(index, logits[None])

    def add_group(self, first: int, logits) -> None:
        """Accumulate tiles [first, first + k) of one tile row: (k, C, th, tw) float32/float16
        device logits."""
        grid, torch, ix = self.grid, self.torch, self.index
        k = int(logits.shape[0])
        expected = (self.num_classes, *grid.tile_hw)
        if tuple(logits.shape[1:]) != expected:
            raise ValueError(f"tile logits have shape {tuple(logits.shape[1:])}, expected {expected}")
        if not (0 <= first and first + k <= grid.count):
            raise IndexError(f"tiles [{first}, {first + k}) out of range [0, {grid.count})")
        if self._added[first: first + k].any():
            raise ValueError(f"tile {first + int(np.argmax(self._added[first: first + k]))} was added twice")
        row = first // grid.cols
        if (first + k - 1) // grid.cols != row:
            raise ValueError(f"tiles [{first}, {first + k}) span more than one tile row")
        if row < self._row:
            raise ValueError(f"tile {first} belongs to tile row {row}, already finalised")
        if row > self._row:
            missing = np.flatnonzero(~self._added[: row * grid.cols])
            if missing.size:
                raise ValueError(f"tile {first} of row {row} arrived before tile {missing[0]}")
            if not self.whole:
                self._finalise(grid.ys[row])
            self._row = row
        y0, y1, _, _ = grid.box(first)
        h, w = y1 - y0, ix.col_targets.shape[1]
        col0 = first - row * grid.cols
        src = logits[:, :, :h, :w]
        if ix.win_rows is None:
            weighted, win = src.float(), None
        else:  # np.outer(wy, wx) per tile, then the product: the numpy Stitcher's float32 steps
            win = ix.win_rows[row, :h][None, :, None] * ix.win_cols[col0: col0 + k, None, :w]
            weighted = src * win[:, None]
        targets = ix.col_targets[col0: col0 + k].reshape(-1)
        for ring_row, offset, n in self._ring(y0, y1):
            part = weighted[:, :, offset: offset + n].permute(1, 2, 0, 3).reshape(self.num_classes, n, k * w)
            self.band[:, ring_row: ring_row + n].index_add_(2, targets, part)  # in tile order
            if self.weight is not None:
                wpart = (torch.ones((k, n, w), dtype=torch.float32, device=self.band.device) if win is None
                         else win[:, offset: offset + n]).permute(1, 0, 2).reshape(n, k * w)
                self.weight[ring_row: ring_row + n].index_add_(1, targets, wpart)
        self._added[first: first + k] = True
        if self._added.all():
            self._finalise(grid.height)

    def labels(self) -> np.ndarray:
        """(H, W) uint8 class ids on the host (waits for their download); every tile must have
        been added."""
        if not self.done:
            missing = int((~self._added).sum())
            raise ValueError(f"{missing} of {self.grid.count} tiles not added yet")
        return self.labels_later()()

    def labels_later(self) -> Callable[[], np.ndarray]:
        """A function returning the (H, W) uint8 labels; on CUDA it waits for their download,
        which was queued without blocking (call it from the thread that needs the labels)."""
        downloads, self._downloads = self._downloads, []
        if not downloads:
            return lambda: self._labels
        # pragma: no mutate block (CUDA only, run by the gpu tests: docs/testing.md)
        event = self.torch.cuda.Event()
        event.record()

        def wait() -> np.ndarray:
            event.synchronize()
            for rows, pinned in downloads:
                self._labels[rows] = pinned.numpy()
            return self._labels

        return wait

    def _ring(self, start: int, stop: int) -> Iterator[tuple[int, int, int]]:
        return ring_pieces(start, stop, self.band.shape[1])

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
            if self.asm._cuda:  # queued, not waited for: labels_later() waits
                # pragma: no mutate block (CUDA only, run by the gpu tests: docs/testing.md)
                pinned = torch.empty(labels.shape, dtype=torch.uint8, pin_memory=True)
                pinned.copy_(labels, non_blocking=True)
                self._downloads.append((rows, pinned))
            else:
                self._labels[rows] = labels.numpy()
            if self.logits_out is not None:
                mean = (acc / self.weight[ring_row: ring_row + n]).to(self._out_dtype)
                with self.asm.clock("download"):
                    mean = mean.cpu().numpy()
                self.logits_out[:, rows] = mean
            if stop < self.grid.height:
                acc.zero_()
                if self.weight is not None:
                    self.weight[ring_row: ring_row + n].zero_()
        self.rows_done = stop


def torch_memory_bound(grid: TileGrid, num_classes: int, batch_size: int) -> int:
    """Bytes a :class:`TorchAssembler` may hold on its device for one image of ``grid`` (the
    formula of the module docstring)."""
    H, W, C, B = grid.height, grid.width, num_classes, batch_size
    th, tw = grid.tile_hw
    small = whole_image_fits(grid, C)
    R = H if small else min(th, H)
    bound = (3 * H * W + (C + 1) * R * W * 4 + 14 * R * W + 6 * C * R * W + 2 * B * C * th * tw * 4 + 7 * B * th * tw
             + 40 * (grid.count + grid.rows * th + grid.cols * tw) + 6 * B * 3 * th * tw * 4 + 3 * B * C * th * tw * 4)
    if small:  # or in the arena (saved logits take the band): its sums, argmax temporaries, maps
        bound += (arena_bytes(B, (th, tw), C, WHOLE_IMAGE_BAND_BYTES)
                  + 14 * (B * th * tw + WHOLE_IMAGE_BAND_BYTES // (4 * C)) + 12 * (grid.rows * th + grid.cols * tw))
    return bound
