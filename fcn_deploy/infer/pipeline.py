"""The pipeline behind ``fcn-deploy infer``: :func:`run_inference` segments many images of any
size with one :class:`~fcn_deploy.infer.segmenter.Segmenter` (inputs found by :mod:`fcn_deploy.infer.inputs`).

The pipeline keeps the runner busy: images are decoded in a thread pool sized to the cores, a
producer thread has the segmenter's assembler cut and normalise tiles into batches (tiles of
several images share a batch; on a CUDA runner the image is uploaded once as uint8 and the tiles
are cut on the device), the calling thread only runs the runner, one stitcher thread hands the
results to the assembler (window-weighted averaging and argmax, on the runner's device; see
:mod:`fcn_deploy.tiling.assembler`) and the thread pool encodes and writes the outputs
(:mod:`fcn_deploy.infer.outputs`). Queues between the stages are bounded, so memory stays bounded
however many and however large the images are: decoding runs ahead of the tiler by at most
``workers + 2`` images and :data:`~fcn_deploy.infer.limits.DECODE_AHEAD_BYTES` of decoded pixels
(from the headers; one image is always admitted), pending writes by ``2 * workers`` and as many
bytes. The headers also give each image's tile count before it is decoded: an image needing more
than ``max_tiles`` (:mod:`fcn_deploy.infer.limits`) fails by name. The progress bar moves by tiles
(an image of many tiles advances it as its tiles run). Each stage's seconds are summed
(:class:`~fcn_deploy.tiling.StageClock`) into :attr:`InferSummary.stages`.
"""

from __future__ import annotations

import contextlib
import gc
import os
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from fcn_deploy.errors import (
    DiskFullError,
    FcnDeployError,
    ImageReadError,
    OutputWriteError,
    UsageError,
)
from fcn_deploy.fileio import remove_stale_temps
from fcn_deploy.infer.gpu_decode import (
    DECODE_THREADS,
    Encoded,
    as_host,
    batch_ends,
    check_decode,
    decode_batch,
    read_encoded,
)
from fcn_deploy.images import load_rgb, max_pixels, read_size
from fcn_deploy.infer.inputs import (
    InputImage,
    check_output_dir,
    check_output_folder,
    list_inputs,
    output_ignores_case,
    refuse_overwriting_inputs,
    write_marker,
)
from fcn_deploy.infer.limits import DECODE_AHEAD_BYTES, check_max_tiles, check_tiles, default_max_tiles
from fcn_deploy.infer.outputs import (
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
from fcn_deploy.infer.segmenter import Segmenter
from fcn_deploy.tiling import (
    DEFAULT_OVERLAP,
    DEFAULT_WINDOW,
    Batch,
    ImageJob,
)


@dataclass
class InferSummary:
    """Outcome of :func:`run_inference`."""

    images: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    skipped: int = 0
    tiles: int = 0
    seconds: float = 0.0
    #: Seconds per stage summed over threads: decode, tiles (cut + normalise, upload
    #: included), upload, engine, stitch (download included), download, encode.
    stages: dict[str, float] = field(default_factory=dict)
    #: Seconds from the start of the run until the first batch reached the runner (listing the
    #: inputs, loading, the first reads and decodes), and from the last batch leaving the runner
    #: to the end (its stitching and the last writes): what a run costs besides its steady state.
    first_batch_s: float = 0.0
    drain_s: float = 0.0

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
class ImageRecord:
    """The outcome of one image (a row of the ``--ray`` manifest, see :mod:`fcn_deploy.distributed`).

    ``status`` is ``ok``, ``failed`` (``error`` says why, naming the file) or ``skipped``;
    ``output`` is the mask path; ``tiles`` the tiles run for it; ``seconds`` from its decode
    to its mask written (images overlap in the pipeline, so these do not add up to the run).
    """

    input: str
    output: str
    status: str
    error: str | None = None
    tiles: int = 0
    seconds: float = 0.0


_DONE = object()

#: ``--decode gpu``: images of the first device decode at most; each next decode may take twice
#: as many, up to :data:`~fcn_deploy.infer.gpu_decode.MAX_BATCH_IMAGES`. The first tiles then reach
#: the engine once a few files are read, not after three full decode batches (96 files).
FIRST_DECODE_IMAGES = 4


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
    runner: Runner | Callable[[], Runner],
    batch_size: int = 8,
    overlap: int = DEFAULT_OVERLAP,
    window: str = DEFAULT_WINDOW,
    overlay: bool = False,
    save_logits: bool = False,
    skip_existing: bool = False,
    workers: int | None = None,
    progress: bool = True,
    assembler: str = "auto",
    decode: str = "cpu",
    keep_extension: bool = False,
    max_tiles: int | None = None,
) -> InferSummary:
    """Segment every image under ``paths`` into ``output_dir`` (see the module docstring).

    Per image ``<stem>.png`` (palette PNG of class ids) and, if asked, ``<stem>.overlay.jpg``
    and ``<stem>.logits.npy`` (float16 (C, H, W)); ``<stem>`` is the image's path below its
    input root less its extension (``keep_extension``: with it; :mod:`fcn_deploy.infer.inputs`).
    With ``skip_existing`` an image is skipped when it is complete: every requested output
    exists (the mask is written last). ``max_tiles``: the work limit per image (default
    :func:`~fcn_deploy.infer.limits.default_max_tiles`). ``runner`` may be a function making
    it, called once the inputs and the output folder have passed their checks (the CLI: a bad
    ``-o`` is said before a model loads). Unreadable images
    are recorded in ``summary.failed`` and the run goes on; errors of the runner or the output
    folder stop it with a :class:`~fcn_deploy.errors.FcnDeployError`. ``workers`` (decode and
    encode threads) defaults to the cores this process may use; ``assembler`` picks the tile
    assembler (:func:`~fcn_deploy.tiling.make_assembler`: numpy on the CPU, torch on CUDA);
    ``decode="gpu"`` decodes JPEGs on the runner's CUDA device (:mod:`fcn_deploy.infer.gpu_decode`).
    """
    start = time.perf_counter()
    if workers is not None and workers < 1:
        raise UsageError(f"--workers must be >= 1, not {workers}")
    check_max_tiles(max_tiles)
    items, out, summary, _ = plan_inputs(paths, output_dir, overlay=overlay, save_logits=save_logits,
                                         skip_existing=skip_existing, keep_extension=keep_extension)
    if not isinstance(runner, Runner) and not hasattr(runner, "infer"):  # a function making it (duck-typed runners stay)
        runner = runner()
    seg = Segmenter(runner, batch_size=batch_size, overlap=overlap, window=window, assembler=assembler)
    with seg:
        segment_items(seg, items, out, summary, overlay=overlay, save_logits=save_logits, workers=workers,
                      progress=progress, decode=decode, started=start, max_tiles=max_tiles)
    summary.tiles = seg.tiles_run
    summary.stages = {k: round(v, 4) for k, v in seg.clock.seconds.items()}
    summary.seconds = time.perf_counter() - start
    return summary


def plan_inputs(
    paths: Sequence[str | os.PathLike],
    output_dir: str | os.PathLike,
    *,
    overlay: bool = False,
    save_logits: bool = False,
    skip_existing: bool = False,
    keep_extension: bool = False,
) -> tuple[list[InputImage], Path, InferSummary, list[InputImage]]:
    """The images :func:`run_inference` segments, before any model loads.

    Inputs are listed by :func:`~fcn_deploy.infer.inputs.list_inputs` (the output folder's
    subtree left out), the output folder is checked against them
    (:func:`~fcn_deploy.infer.inputs.check_output_folder`: a one-line error), images whose
    outputs cannot be written or would replace an input fail
    (:func:`~fcn_deploy.infer.inputs.refuse_overwriting_inputs`), and with ``skip_existing`` the
    complete images (every requested output exists) are left out (stale temporaries of a killed
    run are removed first; a concurrent run's are kept). Returns (images to do, the output
    folder (not created yet), a summary holding the failures and the skipped count, the
    skipped images).
    """
    out = check_output_dir(output_dir, create=False)  # created once the runner is ready
    suffixes = [MASK_SUFFIX] + [OVERLAY_SUFFIX] * overlay + [LOGITS_SUFFIX] * save_logits
    listing = list_inputs(paths, exclude=out, keep_extension=keep_extension, case_insensitive=output_ignores_case(out),
                          suffixes=suffixes)
    check_output_folder(out, paths, listing.roots)
    items, clashes = refuse_overwriting_inputs(listing.images, out, suffixes, listing.roots)
    summary = InferSummary(failed=listing.failed + clashes)
    skipped: list[InputImage] = []
    if skip_existing:
        if out.is_dir():
            remove_stale_temps(out, (MASK_SUFFIX, OVERLAY_SUFFIX, LOGITS_SUFFIX))
        done = [all(output_path(out, i.rel_stem, s).exists() for s in suffixes) for i in items]
        skipped = [i for i, d in zip(items, done) if d]
        items = [i for i, d in zip(items, done) if not d]
        summary.skipped = len(skipped)
    return items, out, summary, skipped


def segment_items(
    seg: Segmenter,
    items: list[InputImage],
    out: Path,
    summary: InferSummary,
    *,
    overlay: bool = False,
    save_logits: bool = False,
    workers: int | None = None,
    progress: bool = False,
    decode: str = "cpu",
    started: float | None = None,
    max_tiles: int | None = None,
) -> list[ImageRecord]:
    """Segment ``items`` with the active ``seg`` and write their outputs under ``out`` (created).

    The per-image path of :func:`run_inference` (also run by each ``--ray`` worker): counts go
    into ``summary`` (``images``, ``failed``); returns one :class:`ImageRecord` per image, in
    the order the images finished. Unreadable images and unwritable outputs are records with
    status ``failed``; a runner error or a full disk raises. ``decode``: ``"cpu"`` (PIL, in the
    thread pool) or ``"gpu"`` (JPEGs decoded on the runner's CUDA device in batches,
    :mod:`fcn_deploy.infer.gpu_decode`). ``started``: the ``time.perf_counter()`` the run began
    (``summary.first_batch_s`` counts from it; default: now). ``max_tiles``: the work limit
    (default :func:`~fcn_deploy.infer.limits.default_max_tiles` of the runner's tile size).
    Nothing is created when ``items`` is empty; else the folder gets its marker
    (:data:`~fcn_deploy.infer.inputs.MARKER_NAME`).
    """
    started = time.perf_counter() if started is None else started
    if workers is not None and workers < 1:
        raise UsageError(f"--workers must be >= 1, not {workers}")
    check_max_tiles(max_tiles)
    seg.prepare()
    check_decode(decode, seg.assembler)
    if not items:
        return []
    check_output_dir(out)
    write_marker(out)
    limit = default_max_tiles(seg.tile_hw) if max_tiles is None else max_tiles
    pipeline = _Pipeline(seg, out, summary, overlay, save_logits, workers or _cores(), progress, decode, limit)
    with frozen_heap():
        pipeline.run(items, started)
    return pipeline.records


@contextlib.contextmanager
def frozen_heap() -> Iterator[None]:
    """Leave the objects alive now out of the garbage collector's passes until the block ends
    (``gc.freeze()``, then ``gc.unfreeze()``); nothing is done if some are frozen already (the
    caller's choice stays). Why: a process holding torch tracks ~300,000 objects (its modules,
    the model), and each full collection scans them all with the GIL held, stalling every thread
    of the pipeline: 0.2 s per full collection on the project's CPU machine (one in five runs of
    256 small photos), about the engine time of those 256 photos on a GPU. Objects made during
    the block are collected as usual."""
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def progress_bar(total: int, show: bool, unit: str = "img"):
    """A tqdm bar on stderr of ``total`` items that may advance by fractions (an image by its
    tiles) and shows whole items done; shown only when ``show`` and stderr is a terminal (no
    carriage-return lines in a log file)."""
    import math

    from tqdm import tqdm

    class _Bar(tqdm):
        @property
        def format_dict(self):
            values = super().format_dict
            values["done"] = math.floor(values["n"] + 1e-6)
            return values

    return _Bar(total=total, unit=unit, disable=None if show else True, dynamic_ncols=True,
                bar_format="{l_bar}{bar}| {done}/{total_fmt} " + unit + " [{elapsed}<{remaining}{postfix}]")


def _cores() -> int:
    """CPU cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class _Pipeline:
    """The threads of :func:`run_inference` around one active :class:`Segmenter`."""

    def __init__(self, seg: Segmenter, out: Path, summary: InferSummary, overlay: bool,
                 save_logits: bool, workers: int, progress: bool, decode: str = "cpu",
                 max_tiles: int | None = None) -> None:
        self.seg, self.out, self.summary = seg, out, summary
        self.overlay, self.save_logits, self.workers = overlay, save_logits, workers
        self.progress = progress
        self.decode = decode
        self.palette = palette(seg.colormap)
        self.lock = threading.Lock()
        self.open_jobs: list[ImageJob] = []
        self.clock = seg.clock
        self.full_disk: DiskFullError | None = None  # set at the first full-disk error: the run stops
        self.records: list[ImageRecord] = []
        self.started: dict[Path, float] = {}  # input path -> when its decode was queued
        self.max_tiles = default_max_tiles(seg.tile_hw) if max_tiles is None else max_tiles
        self.ahead_bytes = DECODE_AHEAD_BYTES  # decoded pixels ahead of the tiler, and pending writes
        self.credited: dict[Path, float] = {}  # input path -> the part of it the bar shows done
        self.write_bytes = 0

    def run(self, items: list[InputImage], started: float) -> None:
        stop = threading.Event()
        self.bar = progress_bar(len(items), self.progress)
        pool = ThreadPoolExecutor(self.workers, "fcn-deploy-io")
        stitch = ThreadPoolExecutor(1, "fcn-deploy-stitch")  # one thread: stitching in batch order
        self.pool, self.writes = pool, deque()
        pending: deque[Future] = deque()
        batches = _background(lambda: self._produce(items, pool), 2, stop)
        last = None  # when the last batch left the runner
        try:
            for batch in batches:
                if last is None:
                    self.summary.first_batch_s = time.perf_counter() - started
                output: Output = "labels" if batch.single_tiles and not self.save_logits else "logits"
                result = self.seg.run_batch(batch.tiles, output, len(batch.keys))
                last = time.perf_counter()
                self._advance(batch)
                pending.append(stitch.submit(self._stitch, batch, result, output))
                while len(pending) > 2:
                    pending.popleft().result()
            while pending:
                pending.popleft().result()
            while self.writes:
                self.writes.popleft()[0].result()
            if last is not None:
                self.summary.drain_s = time.perf_counter() - last
        finally:
            stop.set()
            batches.close()  # joins the producer thread
            stitch.shutdown(wait=True, cancel_futures=True)
            pool.shutdown(wait=True, cancel_futures=True)
            for job in list(self.open_jobs):  # an aborted run leaves no partial logits file
                self._close_logits(job, failed=True)
            self.bar.close()

    def _record(self, item: InputImage, error: str | None, tiles: int = 0, mask: Path | None = None) -> None:
        """(lock held) One :class:`ImageRecord`: ``error`` None means its outputs (``mask``) are written."""
        seconds = time.perf_counter() - self.started.pop(item.path, time.perf_counter())
        mask = mask or output_path(self.out, item.rel_stem, MASK_SUFFIX)
        self.records.append(ImageRecord(str(item.path), str(mask), "ok" if error is None else "failed", error, tiles,
                                        round(seconds, 4)))

    def _advance(self, batch: Batch) -> None:
        """Move the bar by the tiles of ``batch``: each tile is 1/(its image's tiles) of an image."""
        step = 0.0
        with self.lock:
            for job, _ in batch.keys:
                part = 1.0 / job.grid.count
                path = job.key.path
                self.credited[path] = self.credited.get(path, 0.0) + part
                step += part
            self.bar.update(step)

    def _finish_bar(self, item: InputImage) -> None:
        """(lock held) The bar's remaining part of ``item``: it is done, written or failed."""
        self.bar.update(max(0.0, 1.0 - self.credited.pop(item.path, 0.0)))

    def _record_failure(self, item: InputImage, message: str) -> None:
        with self.lock:
            self.summary.failed.append((str(item.path), message))
            self._record(item, message)
            self._finish_bar(item)

    def _decode(self, path: Path) -> np.ndarray:
        with self.clock("decode"):
            return load_rgb(path)

    def _read(self, path: Path) -> Encoded:
        with self.clock("read"):
            return read_encoded(path)

    def _decode_batch(self, encoded: list[Encoded]) -> list[Any]:
        with self.clock("decode"):
            return decode_batch(encoded, str(self.seg.assembler.device))

    def _decoded(self, items: list[InputImage], pool: ThreadPoolExecutor,
                 waited: list[float]) -> Iterator[tuple[InputImage, Any]]:
        """(item, (H, W, 3) uint8 image: numpy, or a tensor on the device with ``--decode gpu``)
        in input order, decoded ahead in the pool; failures are recorded and left out. Seconds
        spent waiting for decodes go to ``waited[0]``."""
        todo = iter(items)
        lookahead = self.workers + 2
        reads: deque[tuple[InputImage, Future, int]] = deque()
        work = self._read if self.decode == "gpu" else self._decode
        waiting: list[tuple[InputImage, int]] = []  # the next item, its header read, not admitted yet
        held = [0]  # decoded bytes of the items in ``reads``

        def admit() -> None:
            """Submit reads in order while fewer than ``lookahead`` are out and their decoded
            bytes fit :attr:`ahead_bytes` (always at least one); an image over the work limit
            fails here, from its header, before it is decoded."""
            while len(reads) < lookahead:
                if not waiting:
                    item = next(todo, None)
                    if item is None:
                        return
                    with self.clock("decode"):  # PIL parses the header: part of decoding
                        size = read_size(item.path)
                    nbytes = 0
                    if size is not None:
                        h, w = size
                        nbytes = h * w * 3
                        if h * w <= max_pixels():  # else decoding refuses it by its pixels, in one line
                            try:
                                check_tiles(item.path, h, w, self.seg.plan(h, w).count, self.seg.tile_hw,
                                            self.max_tiles)
                            except ImageReadError as exc:
                                self.started[item.path] = time.perf_counter()
                                self._record_failure(item, str(exc))
                                continue
                    waiting.append((item, nbytes))
                item, nbytes = waiting[0]
                if reads and held[0] + nbytes > self.ahead_bytes:
                    return
                waiting.pop()
                held[0] += nbytes
                self.started[item.path] = time.perf_counter()
                reads.append((item, pool.submit(work, item.path), nbytes))

        def ready() -> tuple[InputImage, Any] | None:
            """The next read (or, on the CPU path, decoded) item in order; None when none is left."""
            while True:
                admit()
                if not reads:
                    return None
                item, future, nbytes = reads.popleft()
                start = time.perf_counter()
                try:
                    return item, future.result()
                except ImageReadError as exc:
                    self._record_failure(item, str(exc))
                finally:
                    held[0] -= nbytes
                    waited[0] += time.perf_counter() - start

        if self.decode != "gpu":
            while (got := ready()) is not None:
                yield got
            return
        # --decode gpu: batches of read files, decoded by DECODE_THREADS threads, one batch more ahead
        # while the oldest is decoding; the first batches are small (FIRST_DECODE_IMAGES, doubling)
        decoder = ThreadPoolExecutor(DECODE_THREADS, "fcn-deploy-decode")
        chunks: deque[tuple[list[InputImage], Future]] = deque()
        built = 0
        try:
            while True:
                while len(chunks) <= DECODE_THREADS and not (chunks and chunks[0][1].done()):
                    cap = FIRST_DECODE_IMAGES << min(built, 16)
                    chunk: list[tuple[InputImage, Encoded]] = []
                    while len(chunk) < cap and not batch_ends([e for _, e in chunk]) and (got := ready()) is not None:
                        chunk.append(got)
                    if not chunk:
                        break
                    chunks.append(([i for i, _ in chunk], decoder.submit(self._decode_batch, [e for _, e in chunk])))
                    built += 1
                if not chunks:
                    return
                chunk_items, future = chunks.popleft()
                start = time.perf_counter()
                results = future.result()
                waited[0] += time.perf_counter() - start
                for item, rgb in zip(chunk_items, results):
                    if isinstance(rgb, ImageReadError):
                        self._record_failure(item, str(rgb))
                    else:
                        yield item, rgb
        finally:
            decoder.shutdown(wait=True, cancel_futures=True)

    def _produce(self, items: list[InputImage], pool: ThreadPoolExecutor) -> Iterator[Batch]:
        """(thread) Decode ahead in the pool, then cut tiles into batches, in order."""
        waited = [0.0]  # seconds spent waiting for decodes, not cutting tiles

        def jobs() -> Iterator[ImageJob]:
            for item, rgb in self._decoded(items, pool, waited):
                job = ImageJob(item, rgb, self.seg.plan(*rgb.shape[:2]))
                if self.save_logits:
                    try:  # allocated for real before its tiles run: a full disk surfaces here
                        logits = self._open_logits(job, self.seg.num_classes)
                    except OutputWriteError as exc:
                        if isinstance(exc, DiskFullError):
                            raise  # nothing more fits: stop the run at the first full-disk error
                        self._record_failure(item, f"{item.path}: {exc}")  # e.g. a file-size limit
                        continue
                    job.logits_out = lambda num_classes, logits=logits: logits
                yield job
                if not self.overlay:
                    job.rgb = None  # all its tiles are in batches: free the image

        batches = self.seg.iter_batches(jobs())
        while True:
            start, waited[0] = time.perf_counter(), 0.0
            batch = next(batches, None)
            self.clock.add("tiles", time.perf_counter() - start - waited[0])
            if batch is None:
                return
            yield batch

    def _stitch(self, batch: Batch, result: Any, output: Output) -> None:
        """(stitch thread) Hand the batch's results to the assembler; write finished images."""
        if self.full_disk is not None:
            raise self.full_disk
        for job in self.seg.add_results(batch, result, output):
            nbytes = job.grid.height * job.grid.width * (4 if self.overlay else 1)  # labels (+ the photo)
            self.writes.append((self.pool.submit(self._write, job), nbytes))
            self.write_bytes += nbytes
            while len(self.writes) > 2 * self.workers or (len(self.writes) > 1 and self.write_bytes > self.ahead_bytes):
                future, done = self.writes.popleft()
                future.result()
                self.write_bytes -= done

    def _open_logits(self, job: ImageJob, num_classes: int) -> np.memmap:
        stack = contextlib.ExitStack()
        path = output_path(self.out, job.key.rel_stem, LOGITS_SUFFIX)
        memmap = stack.enter_context(logits_memmap(path, (num_classes, job.grid.height, job.grid.width)))
        job.data = stack
        with self.lock:
            self.open_jobs.append(job)
        return memmap

    def _close_logits(self, job: ImageJob, failed: bool) -> None:
        stack, job.data = job.data, None
        if stack is None:
            return
        with self.lock:
            self.open_jobs.remove(job)
        if failed:
            stack.__exit__(FcnDeployError, FcnDeployError("aborted"), None)
        else:
            stack.close()

    def _write(self, job: ImageJob) -> None:
        """(pool) Write the logits, overlay and finally the mask of one finished image."""
        with self.clock("encode"):
            self._write_outputs(job)

    def _write_outputs(self, job: ImageJob) -> None:
        item = job.key
        mask = output_path(self.out, item.rel_stem, MASK_SUFFIX)
        try:
            self._close_logits(job, failed=False)
            if self.overlay:
                write_overlay(output_path(self.out, item.rel_stem, OVERLAY_SUFFIX), as_host(job.rgb), job.labels,
                              self.seg.colormap)
            write_mask(mask, job.labels, self.palette)
        except (OSError, FcnDeployError) as exc:
            self._close_logits(job, failed=True)
            if isinstance(exc, DiskFullError):
                self.full_disk = exc
                raise  # nothing more fits: stop the run at the first full-disk error
            detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            self._record_failure(item, f"{item.path}: cannot write its outputs: {detail}")
            return
        finally:
            job.rgb = job.labels = None
        with self.lock:
            self.summary.images += 1
            self._record(item, None, job.grid.count, mask)
            self._finish_bar(item)
