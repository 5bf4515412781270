"""``infer --ray``: the per-image work of single-process ``infer`` fanned out over a Ray cluster.

The driver lists the work with the single-process rules (:func:`~fcn_deploy.infer.pipeline.plan_inputs`)
and maps rows (input path, output stem) over a pool of :class:`_InferWorker` actors
(:func:`fcn_deploy.distributed.map_workers`). Each actor holds ONE activated runner and
:class:`~fcn_deploy.infer.segmenter.Segmenter` and runs :func:`fcn_deploy.infer.pipeline.segment_items`,
the code of single-process ``infer`` (atomic writes included). It returns one manifest row per
image; the driver streams them into a progress bar, prints the usual summary and writes
``manifest.jsonl`` beside the outputs.

A batch retried after a worker died writes its images' masks again to the same paths, each
atomically (temporary file + rename), so an image never has two masks nor a half-written one. A
driver that dies leaves finished masks; ``--skip-existing`` resumes with the rest.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from fcn_deploy.distributed import (
    IMAGES_PER_BATCH,
    check_address,
    check_resources,
    connect,
    gpus_per_worker as _gpus,
    import_ray,
    map_workers,
    stream_rows,
    worker_id,
)
from fcn_deploy.errors import ClusterError, UsageError
from fcn_deploy.runners import locate_runner

#: Manifest written beside the outputs of ``infer --ray``.
MANIFEST_NAME = "manifest.jsonl"
#: Manifest columns, in order.
MANIFEST_FIELDS = ("input", "output", "status", "error", "tiles", "seconds", "worker", "device")


class _InferWorker:
    """A Ray actor: one activated runner + Segmenter; ``__call__`` segments a batch of rows.

    Rows in: ``input`` (absolute path), ``stem`` (output stem). Rows out: :data:`MANIFEST_FIELDS`
    plus ``pid`` and ``ready`` (epoch seconds when its model was loaded), seen by ``on_row`` only.
    """

    CONFIG: dict[str, Any] = {}  # set on the subclass :func:`map_workers` makes

    def __init__(self) -> None:
        from fcn_deploy.images import set_max_pixels
        from fcn_deploy.infer.segmenter import Segmenter, runner_device

        self.config = config = self.CONFIG
        set_max_pixels(config["max_pixels"])
        runner = config["plan"].open(config["device"], **config["runner_options"])
        self.seg = Segmenter(runner, batch_size=config["batch_size"], overlap=config["overlap"],
                             window=config["window"], assembler=config["assembler"])
        self.seg.prepare()
        self.device = runner_device(runner)
        self.ready = time.time()  # model loaded: the pool's start-up ends (benchmarks/ray_cpu.py)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        from fcn_deploy.infer.pipeline import InferSummary, segment_items
        from fcn_deploy.infer.inputs import InputImage

        cfg = self.config
        items = [InputImage(Path(p), Path(s)) for p, s in zip(batch["input"], batch["stem"])]
        if cfg["slow_s"]:
            time.sleep(cfg["slow_s"] * len(items))  # tests only: a run long enough to kill a worker
        records = segment_items(self.seg, items, Path(cfg["output"]), InferSummary(), overlay=cfg["overlay"],
                                save_logits=cfg["save_logits"], workers=cfg["workers"], progress=False,
                                max_tiles=cfg.get("max_tiles"))
        rows = {name: [getattr(r, name) for r in records] for name in MANIFEST_FIELDS[:6]}
        rows["error"] = [e or "" for e in rows["error"]]  # one column type for Arrow
        rows["worker"] = [worker_id()] * len(records)
        rows["device"] = [self.device] * len(records)
        rows["pid"] = [os.getpid()] * len(records)
        rows["ready"] = [self.ready] * len(records)
        return rows


def manifest_bytes(rows: list[dict[str, Any]]) -> bytes:
    """The manifest's JSON lines (:data:`MANIFEST_FIELDS`), UTF-8, for any file name: a name that
    is no valid UTF-8 (bytes kept by Python as lone surrogates, ``os.fsdecode``) is written as
    JSON ``\\udcXX`` escapes, which ``json.loads`` reads back into the same str
    (``os.fsencode`` gives the original bytes); every other character is kept as is."""
    text = "".join(json.dumps({k: r[k] for k in MANIFEST_FIELDS}, ensure_ascii=False) + "\n" for r in rows)
    return text.encode("utf-8", "backslashreplace")


@dataclass
class RayInferResult:
    """Outcome of :func:`run_inference_ray`: the usual summary, the manifest and its rows."""

    summary: Any  # fcn_deploy.infer.InferSummary
    manifest: Path
    rows: list[dict[str, Any]]
    startup_seconds: float
    workers: int
    gpus_per_worker: float
    worker_ids: list[str] = field(default_factory=list)


def run_inference_ray(
    paths: Sequence[str | os.PathLike],
    output_dir: str | os.PathLike,
    *,
    address: str | None = None,
    ray_workers: int = 1,
    gpus_per_worker: float | None = None,
    cpus_per_worker: float = 1.0,
    backend: str = "ort",
    model: str | os.PathLike | None = None,
    device: str = "auto",
    precision: str | None = None,
    batch_size: int = 8,
    overlap: int | None = None,
    window: str | None = None,
    overlay: bool = False,
    save_logits: bool = False,
    skip_existing: bool = False,
    workers: int | None = None,
    assembler: str = "auto",
    images_per_batch: int = IMAGES_PER_BATCH,
    progress: bool = True,
    num_cpus: int | None = None,
    runner_options: dict[str, Any] | None = None,
    max_pixels: int | None = None,
    keep_extension: bool = False,
    max_tiles: int | None = None,
    on_row: Callable[[dict[str, Any]], None] | None = None,
    slow_s: float = 0.0,
) -> RayInferResult:
    """``infer --ray``: segment every image under ``paths`` into ``output_dir`` on a Ray cluster.

    Same inputs, outputs and summary as :func:`fcn_deploy.infer.run_inference` (see the module
    docstring for how the work is shared and retried), plus ``<output_dir>/manifest.jsonl``: one
    JSON object per image, sorted by input, with :data:`MANIFEST_FIELDS` (status ``ok``,
    ``failed`` or ``skipped``; ``worker`` is ``host:pid``). ``ray_workers`` actors each reserve
    ``cpus_per_worker`` CPUs and ``gpus_per_worker`` GPUs (default: 1 when ``device`` resolves
    to CUDA on the driver, else 0; fractions share a GPU); ``workers`` are each actor's decode
    and encode threads; ``runner_options`` go to :func:`~fcn_deploy.runners.open_runner`
    (e.g. ``tile_hw``, ``threads``); ``max_pixels`` is the workers' image size limit
    (:func:`~fcn_deploy.images.set_max_pixels`), ``max_tiles`` their work limit and
    ``keep_extension`` the naming, as in :func:`~fcn_deploy.infer.run_inference`. ``num_cpus`` sizes a local cluster this call
    starts. ``on_row`` is called with each row as it arrives and ``slow_s`` delays each image in
    the workers (both for tests and benchmarks).
    A cluster this call started is shut down at the end.
    """
    from fcn_deploy.fileio import write_bytes_atomic
    from fcn_deploy.infer.inputs import write_marker
    from fcn_deploy.infer.limits import check_max_tiles
    from fcn_deploy.infer.pipeline import plan_inputs, progress_bar
    from fcn_deploy.infer.outputs import MASK_SUFFIX, output_path
    from fcn_deploy.tiling import DEFAULT_OVERLAP, DEFAULT_WINDOW

    if ray_workers < 1:
        raise UsageError(f"--ray-workers must be >= 1, not {ray_workers}")
    if cpus_per_worker <= 0:
        raise UsageError(f"--ray-cpus-per-worker must be > 0, not {cpus_per_worker}")
    if workers is not None and workers < 1:
        raise UsageError(f"--workers must be >= 1, not {workers}")
    check_max_tiles(max_tiles)
    import_ray()  # before any work: a missing extra is the first thing said
    address = check_address(address)
    gpus = _gpus(backend, device, gpus_per_worker)
    plan = locate_runner(backend, model, device=None, precision=precision).absolute()
    if not os.fspath(output_dir):
        raise UsageError("-o is empty: name an output folder (e.g. -o predictions)")
    out = Path(os.path.abspath(output_dir))
    items, out, summary, skipped = plan_inputs([os.path.abspath(p) for p in paths], out, overlay=overlay,
                                               save_logits=save_logits, skip_existing=skip_existing,
                                               keep_extension=keep_extension)
    config = {"plan": plan, "device": device,
              "batch_size": batch_size, "overlap": DEFAULT_OVERLAP if overlap is None else overlap,
              "window": window or DEFAULT_WINDOW, "assembler": assembler, "output": str(out),
              "overlay": overlay, "save_logits": save_logits, "workers": workers or max(1, int(cpus_per_worker)),
              "slow_s": slow_s, "runner_options": dict(runner_options or {}), "max_pixels": max_pixels,
              "max_tiles": max_tiles}
    mask = lambda item: str(output_path(out, item.rel_stem, MASK_SUFFIX))  # noqa: E731
    rows: dict[str, dict[str, Any]] = {}
    for path, message in summary.failed:
        rows[path] = {"input": path, "output": None, "status": "failed", "error": message, "tiles": 0,
                      "seconds": 0.0, "worker": None, "device": None}
    for item in skipped:
        rows[str(item.path)] = {"input": str(item.path), "output": mask(item), "status": "skipped", "error": None,
                                "tiles": 0, "seconds": 0.0, "worker": None, "device": None}
    ray, startup, started = connect(address, num_cpus=num_cpus)
    start = time.perf_counter()
    workers_seen: set[str] = set()
    try:
        check_resources(ray, ray_workers, cpus_per_worker, gpus)
        if items:
            out.mkdir(parents=True, exist_ok=True)
            write_marker(out)
            ds = map_workers(ray, [{"input": str(i.path), "stem": str(i.rel_stem)} for i in items], _InferWorker,
                              config, workers=ray_workers, cpus=cpus_per_worker, gpus=gpus,
                              images_per_batch=images_per_batch)
            with progress_bar(len(items), progress) as bar, \
                    contextlib.closing(stream_rows(ds)) as stream:
                for row in stream:
                    row = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in row.items()}
                    row["error"] = row["error"] or None
                    if on_row is not None:
                        on_row(row)
                    row.pop("pid", None), row.pop("ready", None)  # for on_row only
                    workers_seen.add(row["worker"])
                    if row["input"] not in rows:
                        bar.update(1)
                    rows[row["input"]] = row  # a retried batch's rows replace nothing twice
                    if row["status"] == "ok":
                        summary.tiles += row["tiles"]
    finally:
        if started:
            ray.shutdown()
    summary.seconds = time.perf_counter() - start
    ordered = [rows[k] for k in sorted(rows)]
    done = [r for r in ordered if r["worker"] is not None]
    summary.images = sum(r["status"] == "ok" for r in done)
    summary.failed = summary.failed + [(r["input"], r["error"]) for r in done if r["status"] == "failed"]
    missing = [str(i.path) for i in items if str(i.path) not in rows]
    if missing:  # every batch either returned or raised; this guards the bookkeeping
        raise ClusterError(f"--ray: {len(missing)} images came back without a result, e.g. {missing[0]}")
    manifest = out / MANIFEST_NAME
    if ordered and out.is_dir():  # a run that found nothing to do (a missing input) creates no folder
        write_bytes_atomic(manifest, manifest_bytes(ordered))
    return RayInferResult(summary, manifest, ordered, startup, ray_workers, gpus, sorted(workers_seen))
