"""Tiled inference of images of any size with any runner: a :class:`Segmenter` for one image
at a time, and :func:`run_inference`, the pipeline behind ``fcn-deploy infer``.

The pipeline keeps the runner busy: images are decoded in a thread pool, a producer thread
normalises tiles into batches (tiles of several images share a batch), the calling thread only
runs the runner, one stitcher thread averages the logits (see :mod:`fcn_deploy.tiling`) and
the thread pool writes the outputs (:mod:`fcn_deploy.outputs`). Queues between the stages are
bounded, so memory stays bounded however many and however large the images are.
"""

from __future__ import annotations

import contextlib
import os
import queue
import tempfile
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from fcn_deploy.errors import FcnDeployError, ImageReadError, InputMismatchError, UsageError
from fcn_deploy.images import load_rgb, normalize
from fcn_deploy.outputs import (
    LOGITS_SUFFIX,
    MASK_SUFFIX,
    OVERLAY_SUFFIX,
    logits_memmap,
    output_path,
    palette,
    write_mask,
    write_overlay,
)
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


# -- inputs ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class InputImage:
    """One image to segment and where its outputs go (``rel_stem`` + suffix under the output folder)."""

    path: Path
    rel_stem: Path


def _is_image_candidate(path: Path) -> bool:
    """True when PIL recognises the content, or the name has an image extension (a broken
    ``photo.jpg`` is then reported, not ignored); files like ``notes.txt`` are False."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path):
            return True
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return path.suffix.lower() in Image.registered_extensions()


def collect_inputs(
    paths: Sequence[str | os.PathLike], exclude: str | os.PathLike | None = None
) -> tuple[list[InputImage], list[tuple[str, str]]]:
    """Expand files and folders (recursively, hidden entries and ``exclude`` skipped) into images.

    Inside folders, files are kept when :func:`_is_image_candidate`; a file named explicitly is
    always kept (a non-image then fails to decode, by name). Output stems mirror the tree below
    each folder argument (a file argument: its name); two inputs whose stems collide keep their
    extension in the output name. Returns (images, failures) where failures are (path, message)
    for missing paths and outputs that would still collide.
    """
    excluded = Path(exclude).resolve() if exclude is not None else None
    found: list[tuple[Path, Path]] = []  # (path, relative path incl. extension)
    failed: list[tuple[str, str]] = []
    seen: set[Path] = set()

    def add(path: Path, rel: Path) -> None:
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            found.append((path, rel))

    for arg in map(Path, paths):
        if arg.is_dir():
            for root, dirs, files in os.walk(arg):
                root_path = Path(root)
                dirs[:] = sorted(
                    d for d in dirs if not d.startswith(".") and (root_path / d).resolve() != excluded
                )
                for name in sorted(files):
                    path = root_path / name
                    if not name.startswith(".") and path.is_file() and _is_image_candidate(path):
                        add(path, path.relative_to(arg))
        elif arg.exists():
            add(arg, Path(arg.name))
        else:
            failed.append((str(arg), f"{arg}: no such file or folder"))

    stems: dict[str, int] = {}
    for _, rel in found:
        key = str(rel.with_suffix("")).casefold()
        stems[key] = stems.get(key, 0) + 1
    images: list[InputImage] = []
    owners: dict[str, Path] = {}
    for path, rel in found:
        stem = rel.with_suffix("") if stems[str(rel.with_suffix("")).casefold()] == 1 else rel
        key = str(stem).casefold()
        if key in owners:
            failed.append((str(path), f"{path}: output name {stem}{MASK_SUFFIX} is already used by {owners[key]}"))
            continue
        owners[key] = path
        images.append(InputImage(path, stem))
    return images, failed


def find_images(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """The image files under ``paths`` (files and folders), as :func:`collect_inputs` finds
    them; paths that do not exist are left out."""
    return [item.path for item in collect_inputs(paths)[0]]


def check_output_dir(output_dir: str | os.PathLike) -> Path:
    """Create ``output_dir`` if needed and prove it writable, else raise a one-line error."""
    out = Path(output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as exc:
        raise FcnDeployError(f"output folder {out} is not writable: {exc.strerror or exc}") from None
    return out


# -- the pipeline ----------------------------------------------------------------------------
@dataclass
class InferSummary:
    """Outcome of :func:`run_inference`."""

    images: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    skipped: int = 0
    tiles: int = 0
    seconds: float = 0.0

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    @property
    def tiles_per_s(self) -> float:
        return self.tiles / self.seconds if self.seconds > 0 else 0.0

    def format(self) -> str:
        return (
            f"{self.images} images segmented, {len(self.failed)} failed, {self.skipped} skipped; "
            f"{self.tiles} tiles in {self.seconds:.2f} s ({self.images_per_s:.2f} images/s, "
            f"{self.tiles_per_s:.2f} tiles/s)"
        )


@dataclass
class _Job:
    """One image in flight."""

    item: InputImage
    rgb: np.ndarray | None
    grid: TileGrid
    stitcher: Stitcher | None = None
    labels: np.ndarray | None = None
    logits_ctx: contextlib.ExitStack | None = None


_DONE = object()


def _background(produce: Callable[[], Iterator[Any]], depth: int, stop: threading.Event) -> Iterator[Any]:
    """Run the generator ``produce()`` in a thread; yield its items via a queue of ``depth``.

    An exception in the thread is re-raised here; setting ``stop`` makes the thread give up.
    """
    q: queue.Queue = queue.Queue(depth)

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run() -> None:
        try:
            for item in produce():
                if not put(item):
                    return
            put(_DONE)
        except BaseException as exc:  # handed to the consumer
            put(exc)

    thread = threading.Thread(target=run, name="fcn-deploy-tiles", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


def run_inference(
    paths: Sequence[str | os.PathLike],
    output_dir: str | os.PathLike,
    *,
    runner: Runner,
    batch_size: int = 8,
    overlap: int = DEFAULT_OVERLAP,
    window: str = DEFAULT_WINDOW,
    overlay: bool = False,
    save_logits: bool = False,
    skip_existing: bool = False,
    workers: int | None = None,
    progress: bool = True,
) -> InferSummary:
    """Segment every image under ``paths`` into ``output_dir`` (see the module docstring).

    Per image ``<stem>.png`` (palette PNG of class ids) and, if asked, ``<stem>.overlay.jpg``
    and ``<stem>.logits.npy`` (float16 (C, H, W)); the mask is written last, so with
    ``skip_existing`` an image whose mask exists is complete and skipped. Unreadable images
    are recorded in ``summary.failed`` and the run goes on; errors of the runner or the output
    folder stop it with a :class:`~fcn_deploy.errors.FcnDeployError`.
    """
    start = time.perf_counter()
    if workers is not None and workers < 1:
        raise UsageError(f"--workers must be >= 1, not {workers}")
    workers = workers or min(4, os.cpu_count() or 1)
    items, failed = collect_inputs(paths, exclude=output_dir)
    out = check_output_dir(output_dir)
    summary = InferSummary(failed=failed)
    if skip_existing:
        todo = [i for i in items if not output_path(out, i.rel_stem, MASK_SUFFIX).exists()]
        summary.skipped = len(items) - len(todo)
        items = todo
    seg = Segmenter(runner, batch_size=batch_size, overlap=overlap, window=window)
    with seg:
        _Pipeline(seg, out, summary, overlay, save_logits, workers, progress).run(items)
    summary.tiles = seg.tiles_run
    summary.seconds = time.perf_counter() - start
    return summary


class _Pipeline:
    """The threads of :func:`run_inference` around one active :class:`Segmenter`."""

    def __init__(self, seg: Segmenter, out: Path, summary: InferSummary, overlay: bool,
                 save_logits: bool, workers: int, progress: bool) -> None:
        self.seg, self.out, self.summary = seg, out, summary
        self.overlay, self.save_logits, self.workers = overlay, save_logits, workers
        self.progress = progress
        self.palette = palette(seg.colormap)
        self.lock = threading.Lock()
        self.open_jobs: list[_Job] = []

    def run(self, items: list[InputImage]) -> None:
        from tqdm import tqdm

        stop = threading.Event()
        self.bar = tqdm(total=len(items), unit="img", disable=not self.progress, dynamic_ncols=True)
        pool = ThreadPoolExecutor(self.workers, "fcn-deploy-io")
        stitch = ThreadPoolExecutor(1, "fcn-deploy-stitch")  # one thread: stitching in batch order
        self.pool, self.writes = pool, deque()
        pending: deque[Future] = deque()
        batches = _background(lambda: self._produce(items, pool), 2, stop)
        try:
            for batch in batches:
                single = all(job.grid.count == 1 for job, _ in batch.keys)
                output: Output = "labels" if single and not self.save_logits else "logits"
                result = self.seg.run_batch(batch.tiles, output)
                pending.append(stitch.submit(self._stitch, batch, result, output))
                while len(pending) > 2:
                    pending.popleft().result()
            while pending:
                pending.popleft().result()
            while self.writes:
                self.writes.popleft().result()
        finally:
            stop.set()
            batches.close()  # joins the producer thread
            stitch.shutdown(wait=True, cancel_futures=True)
            pool.shutdown(wait=True, cancel_futures=True)
            for job in list(self.open_jobs):  # an aborted run leaves no partial logits file
                self._close_logits(job, failed=True)
            self.bar.close()

    def _record_failure(self, path: Path, message: str) -> None:
        with self.lock:
            self.summary.failed.append((str(path), message))
            self.bar.update(1)

    def _produce(self, items: list[InputImage], pool: ThreadPoolExecutor) -> Iterator[TileBatch]:
        """(thread) Decode ahead in the pool, then normalise tiles into batches, in order."""
        decoded: deque[tuple[InputImage, Future]] = deque()
        todo = iter(items)
        lookahead = 2 * self.workers

        def jobs() -> Iterator[tuple[_Job, np.ndarray, TileGrid]]:
            while True:
                while len(decoded) < lookahead:
                    item = next(todo, None)
                    if item is None:
                        break
                    decoded.append((item, pool.submit(load_rgb, item.path)))
                if not decoded:
                    return
                item, future = decoded.popleft()
                try:
                    rgb = future.result()
                except ImageReadError as exc:
                    self._record_failure(item.path, str(exc))
                    continue
                grid = self.seg.plan(*rgb.shape[:2])
                job = _Job(item, rgb, grid)
                yield job, rgb, grid
                if not self.overlay:
                    job.rgb = None  # all tiles are in batches: free the image

        return self.seg.iter_batches(jobs())

    def _stitch(self, batch: TileBatch, result: np.ndarray, output: Output) -> None:
        """(stitch thread) Hand each tile's result to its image; write finished images."""
        for (job, index), tile in zip(batch.keys, result):
            grid = job.grid
            if output == "labels":
                job.labels = tile[: grid.height, : grid.width].copy()
            else:
                if job.stitcher is None:
                    job.stitcher = Stitcher(grid, tile.shape[0], self.seg.window, self._open_logits(job, tile.shape[0]))
                job.stitcher.add(index, tile)
                if job.stitcher.done:
                    job.labels = job.stitcher.labels()
                    job.stitcher = None
            if job.labels is not None:
                self.writes.append(self.pool.submit(self._write, job))
                while len(self.writes) > 2 * self.workers:
                    self.writes.popleft().result()

    def _open_logits(self, job: _Job, num_classes: int) -> np.memmap | None:
        if not self.save_logits:
            return None
        stack = contextlib.ExitStack()
        path = output_path(self.out, job.item.rel_stem, LOGITS_SUFFIX)
        memmap = stack.enter_context(logits_memmap(path, (num_classes, job.grid.height, job.grid.width)))
        job.logits_ctx = stack
        with self.lock:
            self.open_jobs.append(job)
        return memmap

    def _close_logits(self, job: _Job, failed: bool) -> None:
        stack, job.logits_ctx = job.logits_ctx, None
        if stack is None:
            return
        with self.lock:
            self.open_jobs.remove(job)
        if failed:
            stack.__exit__(FcnDeployError, FcnDeployError("aborted"), None)
        else:
            stack.close()

    def _write(self, job: _Job) -> None:
        """(pool) Write the logits, overlay and finally the mask of one finished image."""
        item = job.item
        try:
            self._close_logits(job, failed=False)
            if self.overlay:
                write_overlay(output_path(self.out, item.rel_stem, OVERLAY_SUFFIX), job.rgb, job.labels, self.seg.colormap)
            write_mask(output_path(self.out, item.rel_stem, MASK_SUFFIX), job.labels, self.palette)
        except (OSError, FcnDeployError) as exc:
            self._close_logits(job, failed=True)
            detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            self._record_failure(item.path, f"{item.path}: cannot write its outputs: {detail}")
            return
        finally:
            job.rgb = job.labels = None
        with self.lock:
            self.summary.images += 1
            self.bar.update(1)
