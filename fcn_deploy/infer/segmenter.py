"""Tiled segmentation of one image at a time with any runner: :class:`Segmenter` plans the tile
grid, and its :class:`~fcn_deploy.tiling.assembler.Assembler` (numpy on the CPU, torch tensors
on a CUDA runner's device) cuts the tiles into batches and stitches the runner's logits.
:mod:`fcn_deploy.infer.pipeline` (the ``infer`` pipeline) and :mod:`fcn_deploy.evaluate` build on it.
"""

from __future__ import annotations

import os
import time
from collections import deque
from typing import Any, Iterable, Iterator

import numpy as np

from fcn_deploy.errors import InputMismatchError, UsageError
from fcn_deploy.images import load_rgb
from fcn_deploy.infer.limits import check_batch_size
from fcn_deploy.runners.base import Output, Runner, capabilities_of
from fcn_deploy.tiling import (
    ASSEMBLER_KINDS,
    DEFAULT_OVERLAP,
    DEFAULT_PAD_MODE,
    DEFAULT_WINDOW,
    PAD_MODES,
    WINDOWS,
    Assembler,
    Batch,
    ImageJob,
    StageClock,
    TileGrid,
    make_assembler,
    plan_tiles,
)
from fcn_deploy.defaults import IMAGENET_MEAN, IMAGENET_STD, VOC_COLORMAP

#: Batches a CUDA runner may have queued on the device before :meth:`Segmenter.run_batch` waits
#: for the oldest: the host never runs further ahead, so the batches and results that the
#: device still holds stay bounded (the assembler no longer blocks on the device by itself).
DEVICE_BATCHES_IN_FLIGHT = 3


def runner_device(runner: Runner) -> str:
    """Where ``runner`` wants its input tiles: its ``device`` ("cpu", "cuda", "cuda:N") when it
    takes torch tensors (``capabilities.tensors``: every :class:`Runner`), else "cpu" (host
    numpy: an object that declares no capabilities)."""
    if not capabilities_of(runner).tensors:
        return "cpu"
    return str(getattr(runner, "device", None) or "cpu")


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
        assembler: ``"auto"`` (numpy for a CPU runner, torch tensors on a CUDA runner's
            device), ``"torch"`` or ``"numpy"`` (see :func:`~fcn_deploy.tiling.make_assembler`).
    """

    def __init__(
        self,
        runner: Runner,
        *,
        batch_size: int = 8,
        overlap: int = DEFAULT_OVERLAP,
        window: str = DEFAULT_WINDOW,
        pad_mode: str = DEFAULT_PAD_MODE,
        assembler: str = "auto",
    ) -> None:
        if batch_size < 1:
            raise UsageError(f"--batch-size must be >= 1, not {batch_size}")
        if window not in WINDOWS:
            raise UsageError(f"--window must be one of {', '.join(WINDOWS)}, not {window!r}")
        if pad_mode not in PAD_MODES:
            raise UsageError(f"pad mode must be one of {', '.join(PAD_MODES)}, not {pad_mode!r}")
        if assembler not in ASSEMBLER_KINDS:
            raise UsageError(f"assembler must be one of {', '.join(ASSEMBLER_KINDS)}, not {assembler!r}")
        if overlap < 0:
            raise UsageError(f"--overlap must be >= 0, not {overlap}")
        self.runner = runner
        self.batch_size = batch_size
        self.overlap = overlap
        self.window = window
        self.pad_mode = pad_mode
        self.assembler_kind = assembler
        self._owns_activation = False
        self._ready = False
        #: Tiles sent to the runner since creation (padding of a static batch excluded).
        self.tiles_run = 0
        #: Seconds per stage (:class:`~fcn_deploy.tiling.StageClock`): ``engine`` (runner.infer),
        #: ``stitch`` (assembler.add), the assembler's ``upload`` / ``download``, and what the
        #: caller adds (``decode``, ``tiles``, ``encode`` in the infer pipeline).
        self.clock = StageClock()
        self._in_flight: deque = deque()  # CUDA events of the batches queued on the device
        self._bridge = False  # set in prepare(): CPU tensors to a runner that takes numpy only

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
        self.colormap = [tuple(c) for c in meta.get("colormap", VOC_COLORMAP)]
        limit = (spec.shape[0] if spec.shape[0] > 0 else None) or self.runner.max_batch
        self.effective_batch = min(self.batch_size, limit) if limit else self.batch_size
        #: Classes the model scores (the artifact's metadata, else its colormap's length).
        self.num_classes = int(meta.get("num_classes") or len(self.colormap))
        check_batch_size(self.effective_batch, self.tile_hw, self.num_classes)
        kwargs = dict(tile_hw=self.tile_hw, batch_size=self.effective_batch, mean=self.mean, std=self.std,
                      window=self.window, pad_mode=self.pad_mode)
        device = runner_device(self.runner)
        try:
            #: The tile assembler (numpy or torch, see :func:`~fcn_deploy.tiling.make_assembler`).
            self.assembler: Assembler = make_assembler(self.assembler_kind, device=device, **kwargs)
        except ValueError as exc:
            raise UsageError(f"{self.runner.name}: {exc}") from None
        self.assembler.clock = self.clock
        self._host_writer = make_assembler("numpy", **kwargs)
        # a runner without tensor inputs behind the torch assembler (then on the CPU): via numpy
        self._bridge = self.assembler.kind == "torch" and not capabilities_of(self.runner).tensors

    def close(self) -> None:
        if self._owns_activation:
            self.runner.deactivate()
            self._owns_activation = False
        self._ready = False

    # -- building blocks (shared with run_inference and evaluate) ---------------------------
    def plan(self, height: int, width: int) -> TileGrid:
        """The tile grid of an image of ``height`` x ``width``."""
        self.prepare()
        return plan_tiles(height, width, self.tile_hw, self.overlap)

    def write_tile(self, rgb: np.ndarray, grid: TileGrid, index: int, out: np.ndarray) -> None:
        """Normalise tile ``index`` of the (H, W, 3) uint8 ``rgb`` into ``out`` (3, th, tw)
        float32 numpy (:meth:`~fcn_deploy.tiling.assembler.NumpyAssembler.write_tile`)."""
        self.prepare()
        self._host_writer.write_tile(rgb, grid, index, out)

    def run_batch(self, tiles: Any, output: Output, count: int | None = None) -> Any:
        """``runner.infer`` on (n, 3, th, tw) float32 (numpy, or a tensor on the runner's
        device; the runner pads a short batch of a fixed-batch model). ``count``: the tiles
        among them that belong to images (default n; the rest pad a CUDA batch).

        Returns (n, C, th, tw) logits or (n, th, tw) uint8 labels, of the input's kind; any
        other shape is reported as a model / tile size mismatch. Its seconds go to the
        ``engine`` stage timer. Prepares the segmenter first if needed (as plan and iter_batches do).
        """
        self.prepare()
        start = time.perf_counter()
        if self._bridge and not isinstance(tiles, np.ndarray):  # CPU tensors, a numpy-only runner
            import torch

            result = torch.from_numpy(np.ascontiguousarray(self.runner.infer(tiles.numpy(), output=output)))
        else:
            result = self.runner.infer(tiles, output=output)
        if getattr(result, "is_cuda", False):
            self._pace(result.device)
        self.clock.add("engine", time.perf_counter() - start)
        th, tw = self.tile_hw
        shape = tuple(result.shape)
        if output == "logits":
            ok, expected = len(shape) == 4 and shape[2:] == (th, tw), f"(N,C,{th},{tw})"
        else:
            ok, expected = len(shape) == 3 and shape[1:] == (th, tw), f"(N,{th},{tw})"
        if not ok:
            raise InputMismatchError(
                f"{self.runner.name}: model returned {output} {shape}, expected {expected}; "
                f"is it a segmentation model for {th}x{tw} tiles?"
            )
        self.tiles_run += len(tiles) if count is None else count
        return result

    def _pace(self, device) -> None:
        """Record the end of this batch's device work; wait for the batch
        :data:`DEVICE_BATCHES_IN_FLIGHT` before it."""
        import torch

        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(device))
        self._in_flight.append(event)
        if len(self._in_flight) > DEVICE_BATCHES_IN_FLIGHT:
            self._in_flight.popleft().synchronize()

    def iter_batches(self, jobs: Iterable[tuple[Any, np.ndarray, TileGrid] | ImageJob]) -> Iterator[Batch]:
        """Normalised tile batches over ``(key, rgb, grid)`` jobs or :class:`ImageJob` s; each
        tile's batch key is ``(job, tile_index)``. A batch may end one image and start the next."""
        self.prepare()

        def as_jobs() -> Iterator[ImageJob]:
            for job in jobs:
                yield job if isinstance(job, ImageJob) else ImageJob(job[0], job[1], job[2])

        return self.assembler.batches(as_jobs())

    def segment(self, jobs: Iterable[ImageJob], want_logits: bool = False) -> Iterator[ImageJob]:
        """Run ``jobs`` (tiles of consecutive images share batches) in this thread; yield each
        job, in order, once its ``labels`` are set. Single-tile images get the runner's labels
        unless ``want_logits`` (then every job's ``logits_out`` receives the averaged logits)."""
        for batch in self.iter_batches(jobs):
            output: Output = "labels" if batch.single_tiles and not want_logits else "logits"
            result = self.run_batch(batch.tiles, output, len(batch.keys))
            yield from self.add_results(batch, result, output)

    def add_results(self, batch: Batch, result: Any, output: Output) -> list[ImageJob]:
        """The assembler's :meth:`~fcn_deploy.tiling.assembler.Assembler.add`, timed as ``stitch``."""
        start = time.perf_counter()
        finished = self.assembler.add(batch, result, output)
        self.clock.add("stitch", time.perf_counter() - start)
        return finished

    # -- one image -------------------------------------------------------------------------
    def predict(self, image: str | os.PathLike | np.ndarray) -> np.ndarray:
        """(H, W) uint8 class ids of ``image`` (a path, or an (H, W, 3) uint8 RGB array)."""
        rgb = _as_rgb(image)
        job = ImageJob(None, rgb, self.plan(*rgb.shape[:2]))
        for done in self.segment([job]):
            return done.labels
        raise AssertionError("a grid has at least one tile")  # pragma: no cover

    def predict_logits(self, image: str | os.PathLike | np.ndarray, dtype=np.float32) -> np.ndarray:
        """(C, H, W) averaged logits of ``image`` in ``dtype`` (this array is as large as it says:
        use :func:`run_inference` with ``save_logits`` for huge images)."""
        rgb = _as_rgb(image)
        grid = self.plan(*rgb.shape[:2])
        holder: dict[str, np.ndarray] = {}

        def alloc(num_classes: int) -> np.ndarray:
            holder["logits"] = np.empty((num_classes, grid.height, grid.width), dtype=dtype)
            return holder["logits"]

        for _ in self.segment([ImageJob(None, rgb, grid, logits_out=alloc)], want_logits=True):
            pass
        return holder["logits"]


def _as_rgb(image: str | os.PathLike | np.ndarray) -> np.ndarray:
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8 or 0 in image.shape:
            raise InputMismatchError(
                f"image array is {image.dtype} {image.shape}, expected uint8 (H, W, 3) RGB"
            )
        return image
    return load_rgb(image)


