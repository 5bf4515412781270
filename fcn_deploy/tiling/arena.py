"""The small-image arena of :class:`~fcn_deploy.tiling.assembler.TorchAssembler`: the class sums
of many small images in one device tensor, so that a batch's tiles are accumulated, and the
images it finishes reduced to labels, with a handful of device operations whatever the number
of images (a folder of 0.2-megapixel photos has 4 tiles per photo: 8 photos per batch of 32).

An image is *small* when its (C, H, W) float32 sums take at most
:data:`~fcn_deploy.tiling.assembler.WHOLE_IMAGE_BAND_BYTES` and its averaged logits are not
saved. Its sums live in ``sums[:, off: off + H*W]`` of the (C, capacity) float32 arena, image
rows after one another (flat index ``off + y * W + x``); the arena is a ring in arrival order.

Per batch: one upload of the tiles' (tile row, tile column, image offset) through pinned memory;
per grid among the batch's small images (one for a folder of same-sized photos) a gather of
the index and window maps, one product with the window, one ``index_add_`` in tile order; per
contiguous run of finished images one argmax (first maximum; NaN -> 255), one download of their
uint8 labels to pinned memory (asynchronous on CUDA) and one zeroing of their sums.

The arithmetic is the numpy :class:`~fcn_deploy.tiling.grid.Stitcher`'s: float32 products of
the logits and the window ``outer(wy, wx)``, summed in tile order (on the CPU; CUDA's
``index_add_`` adds with atomics), so the masks are the same. Padding pixels of tiles larger
than their image go to slot 0 of the arena, which no image uses.

Capacity (pixels, per class): ``B*th*tw + 3*P + 1``, where P is the largest small image
(``WHOLE_IMAGE_BAND_BYTES // (4*C)`` pixels): the images live at one time are the one a batch
carries over (<= P) and those starting in the batch (<= B*th*tw + P, every finished one no
larger than its tiles), and a ring of that size always has room for the next image. Device
memory: ``4*C*(B*th*tw + 1) + 3*WHOLE_IMAGE_BAND_BYTES`` bytes, allocated at the first small
image (:func:`arena_bytes`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from fcn_deploy.tiling.grid import TileGrid, axis_window

#: Added to the flat index of a padding pixel (row or column beyond the image): far below 0,
#: so the sum clamps to 0, the arena's unused slot.
_OUTSIDE = -(1 << 60)


def small_pixels(num_classes: int, band_bytes: int) -> int:
    """The most pixels of a small image: its (C, H, W) float32 sums fit ``band_bytes``."""
    return band_bytes // (4 * num_classes)


def arena_capacity(batch_size: int, tile_hw: tuple[int, int], num_classes: int, band_bytes: int) -> int:
    """Pixels (per class) of the arena (see the module docstring)."""
    return batch_size * tile_hw[0] * tile_hw[1] + 3 * small_pixels(num_classes, band_bytes) + 1


def arena_bytes(batch_size: int, tile_hw: tuple[int, int], num_classes: int, band_bytes: int) -> int:
    """Device bytes of the arena's float32 sums."""
    return 4 * num_classes * arena_capacity(batch_size, tile_hw, num_classes, band_bytes)


@dataclass(eq=False)
class Slot:
    """An image's place in the arena: ``offset`` of its first pixel, ``added`` tiles so far."""

    offset: int
    size: int
    added: int = 0


class _GridMaps:
    """Device maps of one grid: ``row_base`` (rows, th) int64 ``(y0 + i) * W`` (``_OUTSIDE``
    beyond the image), ``col_base`` (cols, tw) int64 ``x0 + j`` (likewise), and the separable
    window ``win_rows`` (rows, th) / ``win_cols`` (cols, tw) float32 (None when uniform)."""

    def __init__(self, arena: "SmallImageArena", grid: TileGrid) -> None:
        torch, dev = arena.torch, arena.device
        th, tw = grid.tile_hw
        h, w = min(th, grid.height), min(tw, grid.width)
        rows = (np.asarray(grid.ys)[:, None] + np.arange(th)[None, :]) * grid.width
        rows[:, h:] = _OUTSIDE
        cols = np.asarray(grid.xs)[:, None] + np.arange(tw)[None, :]
        cols[:, w:] = _OUTSIDE
        self.row_base = torch.from_numpy(rows.astype(np.int64)).to(dev)  # pragma: no mutate
        self.col_base = torch.from_numpy(cols.astype(np.int64)).to(dev)  # pragma: no mutate
        self.win_rows = self.win_cols = None
        if arena.window != "uniform":
            last_r, last_c = grid.rows - 1, grid.cols - 1
            wy = [axis_window(th, arena.window, arena.floor, r == 0, r == last_r) for r in range(grid.rows)]
            wx = [axis_window(tw, arena.window, arena.floor, c == 0, c == last_c) for c in range(grid.cols)]
            self.win_rows = torch.from_numpy(np.stack(wy)).to(dev)  # pragma: no mutate
            self.win_cols = torch.from_numpy(np.stack(wx)).to(dev)  # pragma: no mutate


class SmallImageArena:
    """Class sums of small images in one (C, capacity) float32 device tensor (module docstring).

    Args:
        torch: the torch module; device: where the sums live ("cpu", "cuda:N").
        num_classes: C (1..255); batch_size, tile_hw: the assembler's B and (th, tw).
        window, floor: the averaging window (as the assembler's); band_bytes: the small-image
            limit (:data:`~fcn_deploy.tiling.assembler.WHOLE_IMAGE_BAND_BYTES`).
    """

    def __init__(self, torch, device, num_classes: int, batch_size: int, tile_hw: tuple[int, int], *,
                 window: str, floor: float, band_bytes: int) -> None:
        if not 1 <= num_classes <= 255:
            raise ValueError(f"num_classes must be in [1, 255] for uint8 labels, got {num_classes}")
        self.torch, self.device = torch, device
        self.num_classes, self.tile_hw, self.window, self.floor = num_classes, tile_hw, window, floor
        self.capacity = arena_capacity(batch_size, tile_hw, num_classes, band_bytes)
        self.sums = torch.zeros((num_classes, self.capacity), dtype=torch.float32, device=device)  # pragma: no mutate
        self._cuda = torch.device(device).type == "cuda"  # pragma: no mutate
        self._live: list[Slot] = []  # images with sums in the arena, in arrival order
        self._head = 1  # next free pixel (slot 0 takes the padding pixels)
        self._maps: dict[TileGrid, _GridMaps] = {}

    def _allocate(self, size: int) -> Slot:
        start = self._head
        if start + size > self.capacity:
            start = 1  # wrap: the module docstring's capacity guarantees room before the oldest
        tail = self._live[0].offset if self._live else None
        if tail is not None and start <= tail < start + size:  # the capacity rules it out
            raise AssertionError(f"arena of {self.capacity} pixels: no room for {size} before {tail}")
        slot = Slot(start, size)
        self._live.append(slot)
        self._head = start + size
        return slot

    def maps(self, grid: TileGrid) -> _GridMaps:
        found = self._maps.get(grid)
        if found is None:
            if len(self._maps) >= 16:
                self._maps.pop(next(iter(self._maps)))
            found = self._maps[grid] = _GridMaps(self, grid)
        return found

    def add(self, groups: Sequence[tuple[Any, int, int, int]], result) -> list[tuple[int, Any]]:
        """Accumulate the tiles of small images of one batch and finish the images they complete.

        ``groups``: (job, first tile index, batch position of that tile, tile count) for runs
        of consecutive tiles of one image, in batch order; ``result`` (n, C, th, tw) float32 or
        float16 logits on the device. Each job's ``_acc`` holds its :class:`Slot`. Returns
        (batch position of the image's last tile, job) for every image finished, with
        ``job._pending`` set (see :class:`~fcn_deploy.tiling.assembler.ImageJob`).
        """
        th, tw = self.tile_hw
        if tuple(result.shape[1:]) != (self.num_classes, th, tw):
            raise ValueError(f"tile logits have shape {tuple(result.shape[1:])}, expected "
                             f"{(self.num_classes, th, tw)}")
        by_grid: dict[TileGrid, list[tuple[int, int, int, int]]] = {}
        finished: list[tuple[int, Any]] = []
        for job, first, pos, k in groups:
            slot = job._acc
            if slot is None:
                slot = job._acc = self._allocate(job.grid.height * job.grid.width)
            if first != slot.added:
                raise ValueError(f"tile {first} arrived after {slot.added} of the image's tiles")
            if first + k > job.grid.count:
                raise IndexError(f"tiles [{first}, {first + k}) out of range [0, {job.grid.count})")
            by_grid.setdefault(job.grid, []).append((first, pos, k, slot.offset))
            slot.added += k
            if slot.added == job.grid.count:
                finished.append((pos + k - 1, job))
        for grid, runs in by_grid.items():
            self._accumulate(grid, runs, result)
        self._finish([job for _, job in finished])
        return finished

    def _accumulate(self, grid: TileGrid, runs: list[tuple[int, int, int, int]], result) -> None:
        """One index_add_ of the window-weighted logits of ``runs`` (first tile, batch position,
        count, image offset) of images of ``grid``."""
        torch = self.torch
        n = sum(k for _, _, k, _ in runs)
        host = np.empty((4, n), dtype=np.int64)  # tile row, tile column, offset, batch position
        i = 0
        for first, pos, k, offset in runs:
            tiles = np.arange(first, first + k)
            host[0, i: i + k] = tiles // grid.cols
            host[1, i: i + k] = tiles % grid.cols
            host[2, i: i + k] = offset
            host[3, i: i + k] = np.arange(pos, pos + k)
            i += k
        table = torch.from_numpy(host)
        if self._cuda:
            table = table.pin_memory().to(self.device, non_blocking=True)  # pragma: no mutate
        rows, cols, offsets, positions = table
        maps = self.maps(grid)
        index = maps.row_base.index_select(0, rows)[:, :, None] + maps.col_base.index_select(0, cols)[:, None, :]
        index = (index + offsets[:, None, None]).clamp_(min=0)  # padding pixels -> slot 0
        first_pos, last_pos = int(host[3, 0]), int(host[3, -1])
        logits = result[first_pos: last_pos + 1] if last_pos - first_pos + 1 == n else result.index_select(0, positions)
        if maps.win_rows is None:
            weighted = logits.float()
        else:  # np.outer(wy, wx) per tile, then the product: the numpy Stitcher's float32 steps
            win = maps.win_rows.index_select(0, rows)[:, :, None] * maps.win_cols.index_select(0, cols)[:, None, :]
            weighted = logits * win[:, None]
        part = weighted.permute(1, 0, 2, 3).reshape(self.num_classes, -1)  # (C, n*th*tw), tile order
        self.sums.index_add_(1, index.reshape(-1), part)

    def _finish(self, jobs: list[Any]) -> None:
        """Argmax and download of the finished ``jobs`` (the oldest live images, in order),
        one per contiguous run of the ring; their sums are zeroed and their slots freed."""
        if not jobs:
            return
        torch = self.torch
        slots = [job._acc for job in jobs]
        if slots != self._live[: len(slots)]:
            raise AssertionError("arena images finish in arrival order")
        del self._live[: len(slots)]
        runs: list[tuple[int, int, list[tuple[Slot, Any]]]] = []  # (start, stop, its slots and jobs)
        for slot, job in zip(slots, jobs):
            if runs and runs[-1][1] == slot.offset:
                runs[-1] = (runs[-1][0], slot.offset + slot.size, runs[-1][2] + [(slot, job)])
            else:
                runs.append((slot.offset, slot.offset + slot.size, [(slot, job)]))
        pieces = []
        for start, stop, _ in runs:
            best, index = torch.max(self.sums[:, start:stop], dim=0)
            labels = index.to(torch.uint8).masked_fill_(torch.isnan(best), 255)
            self.sums[:, start:stop].zero_()
            if self._cuda:
                # pragma: no mutate block (CUDA only, run by the gpu tests: docs/testing.md)
                pinned = torch.empty(labels.shape, dtype=torch.uint8, pin_memory=True)
                pinned.copy_(labels, non_blocking=True)
                pieces.append(pinned.numpy())
            else:
                pieces.append(labels.numpy())
        wait = _event_wait(torch) if self._cuda else None  # pragma: no mutate
        for (start, _, members), flat in zip(runs, pieces):
            for slot, job in members:
                job._acc = None
                offset = slot.offset - start
                job._pending = _labels_of(flat, offset, job.grid, wait)  # pragma: no mutate (wait: CUDA only)

    def memory_bytes(self) -> int:
        return self.sums.nbytes


def _event_wait(torch) -> Callable[[], None]:
    """(CUDA) A function waiting for the work queued so far on the current stream."""
    event = torch.cuda.Event()  # pragma: no mutate
    event.record()  # pragma: no mutate
    return event.synchronize  # pragma: no mutate


def _labels_of(flat: np.ndarray, start: int, grid: TileGrid, wait: Callable[[], None] | None) -> Callable[[], np.ndarray]:
    """The (H, W) uint8 labels of one image from its run's flat labels (after ``wait``)."""

    def labels() -> np.ndarray:
        if wait is not None:
            wait()
        return flat[start: start + grid.height * grid.width].reshape(grid.height, grid.width).copy()

    return labels
