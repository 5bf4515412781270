"""What one model replica of ``fcn-deploy serve`` does, without Ray: :class:`SegmentCore` holds
one activated runner and one :class:`~fcn_deploy.infer.segmenter.Segmenter`, runs engine batches of
tiles from any requests (:meth:`SegmentCore.run_batch`, called by Ray Serve's ``@serve.batch``
in :mod:`fcn_deploy.serve.app`), and segments one request (:meth:`SegmentCore.segment`): decode,
plan the tile grid, cut and normalise tiles, hand each to the batcher, stitch the results, encode.

The masks are the ones ``infer`` writes for the same image: the same decode
(:func:`~fcn_deploy.serve.api.decode_image`), grid (``Segmenter.plan``), tile cutting and
normalisation (``NumpyAssembler.write_tile``), stitching (``NumpyAssembler.add``: the averaged
logits of overlapping tiles, window-weighted, then the first maximum) and PNG encoder. As in
``infer``, an engine batch whose tiles are all whole images (one tile each) asks the runner for
labels, any other batch for logits; which tiles share a batch depends on the requests that arrive
together (``docs/serving.md`` states what follows for byte equality).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

import numpy as np

from fcn_deploy.serve import api
from fcn_deploy.serve.api import ServeSettings


@dataclass
class TileItem:
    """One tile handed to the batcher: (3, th, tw) float32, normalised; ``whole``: the tile is a
    whole image (labels suffice); ``want_logits``: its request asked for the logits."""

    tile: np.ndarray
    whole: bool
    want_logits: bool


@dataclass
class TileResult:
    """One tile's result: ``output`` ``labels`` ((th, tw) uint8) or ``logits`` ((C, th, tw));
    ``batch`` the engine batch's number, ``engine_s`` its engine seconds, ``size`` its tiles."""

    output: str
    value: np.ndarray
    batch: int
    engine_s: float
    size: int


@dataclass
class Reply:
    """A segmented request: ``body`` of ``media_type``, ``tiles`` run for it, ``stages``
    seconds (decode, tiles: from the first tile handed to the batcher to the last result, engine:
    the engine seconds of the batches its tiles rode in, stitch, encode), the image size."""

    body: bytes
    media_type: str
    tiles: int
    width: int
    height: int
    stages: dict[str, float] = field(default_factory=dict)
    batches: list[int] = field(default_factory=list)


class ReplicaStats:
    """Counts one replica reports to the ingress (``/metrics``): tiles per engine batch (each
    batch once), tiles waiting for or in an engine batch, requests cancelled (client gone or
    timed out) and engine seconds. Thread-safe; :meth:`snapshot` is a plain dict."""

    #: Bucket upper bounds of the tiles-per-batch histogram (tiles are integers).
    BUCKETS = (1, 2, 4, 8, 16, 32, 64)

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.batch_buckets = [0] * (len(self.BUCKETS) + 1)
        self.batch_count = 0
        self.batch_tiles = 0
        self.engine_seconds = 0.0
        self.tiles_queued = 0
        self.cancelled = 0

    def batch(self, tiles: int, seconds: float) -> None:
        with self._lock:
            index = next((i for i, b in enumerate(self.BUCKETS) if tiles <= b), len(self.BUCKETS))
            self.batch_buckets[index] += 1
            self.batch_count += 1
            self.batch_tiles += tiles
            self.engine_seconds += seconds

    def queued(self, delta: int) -> None:
        with self._lock:
            self.tiles_queued += delta

    def cancel(self) -> None:
        with self._lock:
            self.cancelled += 1

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {"batch_buckets": list(self.batch_buckets), "batch_count": self.batch_count,
                    "batch_tiles": self.batch_tiles, "engine_seconds": self.engine_seconds,
                    "tiles_queued": self.tiles_queued, "cancelled": self.cancelled}


def _cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class SegmentCore:
    """One activated runner and Segmenter, warmed up (one full engine batch) before use.

    ``runner``: an inactive runner to use (tests); default: the one ``settings`` name, made by
    :func:`fcn_deploy.runners.open_runner` (the chain's artifact, refused when stale).
    """

    def __init__(self, settings: ServeSettings, runner: Any = None) -> None:
        from fcn_deploy.images import set_max_pixels
        from fcn_deploy.infer.outputs import palette
        from fcn_deploy.infer.segmenter import Segmenter, runner_device
        from fcn_deploy.tiling import make_assembler

        self.settings = settings
        set_max_pixels(settings.max_pixels)  # PIL's decompression-bomb limit follows ours
        if runner is None:
            from fcn_deploy.runners import open_runner

            runner = open_runner(settings.backend, settings.model, device=settings.device,
                                   precision=settings.precision, **settings.runner_options)
        self.seg = Segmenter(runner, batch_size=settings.batch_size, overlap=settings.overlap, window=settings.window)
        self.seg.prepare()
        seg = self.seg
        self.device = runner_device(runner)
        #: CUDA: every engine batch has the warmed batch shape (zero tiles after the real ones), as
        #: ``infer``'s torch assembler keeps it (a new shape costs an algorithm search / autotuning).
        self.fixed_batch = not self.device.startswith("cpu")
        #: The host assembler: tile cutting, normalisation and stitching of ``infer`` on the CPU.
        self.asm = make_assembler("numpy", tile_hw=seg.tile_hw, batch_size=seg.effective_batch, mean=seg.mean,
                                  std=seg.std, window=seg.window, pad_mode=seg.pad_mode)
        self.palette = palette(seg.colormap)
        meta = runner.meta
        self.classes = [str(c) for c in meta.get("classes") or [f"class {i}" for i in range(seg.num_classes)]]
        self.stats = ReplicaStats()
        self._batches = itertools.count()
        self.pool = ThreadPoolExecutor(_cores(), "fcn-serve-io")  # decode, cut, stitch, encode
        from fcn_deploy.fileio import sha256_file

        path = getattr(runner, "path", None) or settings.model
        self.artifact = str(path) if path else None
        self.sha256 = sha256_file(path) if path and os.path.isfile(path) else None
        self.warmup_s = self._warm_up()

    # -- the engine -----------------------------------------------------------------------------
    def _warm_up(self) -> float:
        start = time.perf_counter()
        th, tw = self.seg.tile_hw
        zeros = np.zeros((3, th, tw), np.float32)
        self.run_batch([TileItem(zeros, False, False)] * self.seg.effective_batch)
        self.seg.tiles_run = 0
        self.stats = ReplicaStats()
        return time.perf_counter() - start

    def run_batch(self, items: list[TileItem]) -> list[TileResult]:
        """(engine thread) One engine batch of ``items`` from any requests: labels when every
        tile is a whole image and none wants logits, else logits (the rule of ``infer``)."""
        n = len(items)
        size = max(n, self.seg.effective_batch) if self.fixed_batch else n
        th, tw = self.seg.tile_hw
        tiles = np.zeros((size, 3, th, tw), np.float32) if size > n else np.empty((n, 3, th, tw), np.float32)
        for i, item in enumerate(items):
            tiles[i] = item.tile
        output = "labels" if all(it.whole and not it.want_logits for it in items) else "logits"
        start = time.perf_counter()
        result = self.seg.run_batch(tiles, output, n)
        seconds = time.perf_counter() - start
        number = next(self._batches)
        self.stats.batch(n, seconds)
        return [TileResult(output, result[i], number, seconds, n) for i in range(n)]

    # -- one request --------------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        """The ``GET /v1/model`` answer."""
        meta = self.seg.runner.meta
        th, tw = self.seg.tile_hw
        return {
            "api": api.API_VERSION,
            "backend": self.settings.backend,
            "artifact": os.path.basename(self.artifact) if self.artifact else None,
            "sha256": self.sha256,
            "precision": meta.get("precision") or self.settings.precision,
            "device": self.device,
            "tile": {"height": th, "width": tw},
            "classes": self.classes,
            "colormap": [list(map(int, c)) for c in self.seg.colormap],
            "num_classes": self.seg.num_classes,
            "batch_size": self.seg.effective_batch,
            "overlap": self.seg.overlap,
            "window": self.seg.window,
            "outputs": list(api.OUTPUTS),
            "limits": {"max_body_bytes": self.settings.max_body_bytes, "max_pixels": self.settings.max_pixels,
                       "max_logits_bytes": self.settings.max_logits_bytes, "timeout_s": self.settings.timeout_s},
        }

    async def _run(self, fn: Callable, *args) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    async def segment(self, data: bytes, output: str, submit: Callable[[TileItem], Awaitable[TileResult]]) -> Reply:
        """Segment the image file ``data`` into the ``output`` answer, its tiles batched by
        ``submit`` (the ``@serve.batch`` method; any coroutine function returning the item's
        :class:`TileResult`). At most one engine batch of this request's tiles is cut ahead of the
        results, so a large image holds bounded memory and shares the engine with small ones.
        Cancelling the coroutine (client gone, timeout) cancels its tiles still waiting.

        Raises the :class:`~fcn_deploy.errors.RequestError` of a bad image (400, 413).
        """
        from fcn_deploy.tiling import Batch, ImageJob

        settings = self.settings
        stages: dict[str, float] = {}
        start = time.perf_counter()
        rgb = await self._run(api.decode_image, data, settings.max_pixels)
        height, width = rgb.shape[:2]
        if output == "logits":
            api.check_logits(self.seg.num_classes, width, height, settings.max_logits_bytes)
        stages["decode"] = time.perf_counter() - start
        grid = self.seg.plan(height, width)
        api.check_tiles(width, height, grid.count, self.seg.tile_hw, settings.max_pixels)
        holder: dict[str, np.ndarray] = {}

        def alloc(num_classes: int) -> np.ndarray:
            holder["logits"] = np.empty((num_classes, height, width), dtype=np.float16)
            return holder["logits"]

        job = ImageJob(None, rgb, grid, logits_out=alloc if output == "logits" else None)
        whole, want = grid.count == 1, output == "logits"
        th, tw = self.seg.tile_hw

        def cut(index: int) -> np.ndarray:
            tile = np.empty((3, th, tw), np.float32)
            self.asm.write_tile(rgb, grid, index, tile)
            return tile

        async def one(index: int) -> TileResult:
            item = TileItem(await self._run(cut, index), whole, want)
            self.stats.queued(1)
            try:
                return await submit(item)
            finally:
                self.stats.queued(-1)

        def add(index: int, result: TileResult) -> None:
            self.asm.add(Batch(None, [(job, index)]), [result.value], result.output)

        ahead = self.seg.effective_batch
        tasks: list[asyncio.Task] = []
        engine: dict[int, float] = {}
        stitch = 0.0
        tiles_start = time.perf_counter()
        try:
            for index in range(grid.count):
                while len(tasks) < grid.count and len(tasks) - index < ahead:
                    tasks.append(asyncio.ensure_future(one(len(tasks))))
                result = await tasks[index]
                tasks[index] = None  # its tile and result are freed once stitched
                engine[result.batch] = result.engine_s
                t = time.perf_counter()
                await self._run(add, index, result)
                stitch += time.perf_counter() - t
        except asyncio.CancelledError:
            self.stats.cancel()
            raise
        finally:
            for task in tasks:
                if task is not None and not task.done():
                    task.cancel()
        stages["tiles"] = time.perf_counter() - tiles_start - stitch
        stages["engine"] = sum(engine.values())
        stages["stitch"] = stitch
        labels = job.labels
        t = time.perf_counter()
        if output == "mask":
            body = await self._run(api.encode_png, labels, self.palette)
        elif output == "overlay":
            body = await self._run(api.encode_overlay, rgb, labels, self.seg.colormap)
        elif output == "logits":
            body = await self._run(api.encode_logits, holder["logits"])
        else:
            import json

            body = (json.dumps({**api.class_counts(labels, self.classes), "tiles": grid.count},
                               separators=(",", ":")) + "\n").encode()
        stages["encode"] = time.perf_counter() - t
        stages["total"] = time.perf_counter() - start
        return Reply(body, api.OUTPUTS[output], grid.count, width, height, stages, sorted(engine))

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.seg.close()
