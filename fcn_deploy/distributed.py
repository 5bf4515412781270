"""``infer --ray`` and ``evaluate --ray``: the same per-image work fanned out over a Ray cluster.

The driver (this process) lists the work with the single-process rules and sends **paths, not
pixels**: a Ray Data dataset of rows (input path, output stem) is mapped by a pool of stateful
actors (``map_batches(_InferWorker, compute=ActorPoolStrategy(size=N), num_gpus=F)``). Each actor holds ONE activated
runner and :class:`~fcn_deploy.segmenter.Segmenter` built from the artifact the driver resolved
(and checked for staleness) — read by every worker from the same path, so artifacts and photos
must be on a filesystem every node sees under identical paths — and runs
:func:`fcn_deploy.infer.segment_items`, the code of single-process ``infer`` (atomic writes
included). It returns one manifest row per image; the driver streams them into a progress bar,
prints the usual summary and writes ``manifest.jsonl`` beside the outputs.

Faults: a per-image error (a corrupt file) is a returned row with
status ``failed``, never an exception, so it is not retried. A worker process that dies (killed,
out of memory) is restarted by Ray (``max_restarts``) and the batch it held is run again
(``max_task_retries``); its images' masks are then written again to the same paths, each
atomically (temporary file + rename), so an image never has two masks nor a half-written one,
and only the retried batch's rows reach the driver. A driver that dies leaves finished masks;
``--skip-existing`` resumes with the rest.

Ray is an optional extra (``pip install 'fcn-deploy[ray]'``), imported only here, only by
``--ray``.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from fcn_deploy.errors import FcnDeployError, UsageError, first_line

#: What to install for ``--ray``.
RAY_EXTRA = "pip install 'fcn-deploy[ray]'"
#: Restarts of a dead worker and retries of the batch it held (Ray's actor fault tolerance).
MAX_RESTARTS = 3
#: Images per batch sent to a worker (a killed worker redoes at most this many).
IMAGES_PER_BATCH = 4
#: Manifest written beside the outputs of ``infer --ray``.
MANIFEST_NAME = "manifest.jsonl"
#: Manifest columns, in order.
MANIFEST_FIELDS = ("input", "output", "status", "error", "tiles", "seconds", "worker", "device")


def import_ray():
    """The ``ray`` module (with Ray Data), or a one-line :class:`UsageError` naming the extra."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise UsageError(f"--ray needs Ray Data, which is not installed: {RAY_EXTRA}") from None
    return ray


def check_address(address: str | None) -> str | None:
    """``--ray [ADDRESS]`` as given (``""``: no address) -> None, ``local``, ``auto`` or an address
    with a port; anything else (e.g. a photo folder after a bare ``--ray``) is a one-line error."""
    if not address:
        return None
    if address in ("local", "auto") or "://" in address or address.rpartition(":")[2].isdigit():
        return address
    raise UsageError(f"--ray {address}: not a Ray address (local, auto, host:port or ray://host:port); "
                     f"put a bare --ray after the paths, or write --ray=ADDRESS")


def connect(address: str | None = None, *, num_cpus: int | None = None) -> tuple[Any, float, bool]:
    """Join or start the Ray cluster; returns (ray, start-up seconds, whether we started it).

    ``address``: None (``RAY_ADDRESS`` if set, else a running local cluster, else a new one),
    ``local`` (always a new local cluster), ``auto`` or ``ray://host:port`` (an existing one).
    ``num_cpus`` only applies to a new local cluster. Already connected: nothing happens.
    """
    import logging

    ray = import_ray()
    address = check_address(address)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the driver shows its own bar over the rows
    ctx.print_on_execution_start = False
    if ray.is_initialized():
        return ray, 0.0, False
    start = time.perf_counter()
    kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING,
                              "log_to_driver": False}
    if address in (None, "local") and num_cpus is not None:
        kwargs["num_cpus"] = num_cpus
    try:
        ray.init(address=address, **kwargs)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        raise FcnDeployError(f"--ray {address or ''}: cannot join the Ray cluster: {first_line(exc)}") from None
    return ray, time.perf_counter() - start, True


def _ray_failure(exc: BaseException) -> FcnDeployError:
    """Our own error inside a Ray error chain (a runner failure in a worker), else one line."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, FcnDeployError):
            return e
        todo += [e.__cause__, e.__context__, getattr(e, "cause", None)]
    return FcnDeployError(f"the Ray run failed: {first_line(exc)}")


def _gpus_per_worker(backend: str, device: str, gpus: float | None) -> float:
    """``--ray-gpus-per-worker``: given, else 1 when ``device`` resolves to CUDA here, else 0."""
    if gpus is not None:
        if gpus < 0:
            raise UsageError(f"--ray-gpus-per-worker must be >= 0, not {gpus}")
        return gpus
    if device.startswith("cuda"):
        return 1.0
    from fcn_deploy.runners.device import resolve_device

    return 1.0 if resolve_device(backend, device, echo=None).startswith("cuda") else 0.0


def _resolve_artifact(backend: str, model, precision: str | None, export_dir: str | os.PathLike = "export",
                      engines_dir: str | os.PathLike = "engines") -> tuple[str, str | None]:
    """(absolute artifact path, precision) as the chain resolves them; stale: refused here."""
    from fcn_deploy.chain import resolve
    from fcn_deploy.runners.registry import get_backend

    spec = get_backend(backend)
    resolved = resolve(backend, model, export_dir=export_dir, engines_dir=engines_dir, precision=precision)
    path = resolved.require_fresh()
    return str(Path(path).resolve()), resolved.precision if spec.artifact == "checkpoint" else precision


def _map_workers(ray, rows: list[dict[str, Any]], worker: type, config: dict[str, Any], *, workers: int,
                 cpus: float, gpus: float, images_per_batch: int):
    """The dataset of ``rows`` mapped by a pool of ``workers`` actors of ``worker`` (its CONFIG set).

    The config travels inside the class, not as constructor arguments in the object store, so a
    restarted actor never needs an object that may be gone. Dead actors are restarted and their
    batch retried up to :data:`MAX_RESTARTS` times (passed as Ray remote args, which Ray 2.60
    deprecates in favour of its own default: unlimited).
    """
    import warnings

    cls = type(f"{worker.__name__}Configured", (worker,), {"CONFIG": config})  # pickled by value
    ds = ray.data.from_items(rows, override_num_blocks=max(1, -(-len(rows) // images_per_batch)))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
        return ds.map_batches(cls, batch_size=images_per_batch, batch_format="numpy",
                              compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=cpus, num_gpus=gpus,
                              max_restarts=MAX_RESTARTS, max_task_retries=MAX_RESTARTS)


def _check_resources(ray, workers: int, cpus: float, gpus: float) -> None:
    """A pool the cluster can never hold is a one-line error, not a run that waits forever."""
    total = ray.cluster_resources()
    for name, need, option in (("CPU", cpus, "--ray-cpus-per-worker"), ("GPU", gpus, "--ray-gpus-per-worker")):
        have = float(total.get(name, 0.0))
        if need > have:
            raise UsageError(f"{option} {need:g}: the Ray cluster has {have:g} {name}s in all"
                             + (" (pass --ray-gpus-per-worker 0 or --device cpu for a CPU run)" if name == "GPU" else ""))
    if workers * gpus > float(total.get("GPU", 0.0)) or workers * cpus > float(total.get("CPU", 0.0)):
        import warnings

        warnings.warn(f"--ray-workers {workers}: the cluster holds fewer at once; the rest wait", stacklevel=3)


def _stream_rows(ds) -> Iterator[dict[str, Any]]:
    """The rows of ``ds`` as they are produced; a failure of the run (not of the caller's loop
    body) becomes our one-line error (:func:`_ray_failure`)."""
    rows = iter(ds.iter_rows())
    try:
        while True:
            try:
                row = next(rows)
            except StopIteration:
                return
            except FcnDeployError:
                raise
            except Exception as exc:
                raise _ray_failure(exc) from None
            yield row
    finally:
        close = getattr(rows, "close", None)
        if close is not None:
            close()  # the driver stops (an error, Ctrl-C): the execution and its actors stop too


def _worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class _InferWorker:
    """A Ray actor: one activated runner + Segmenter; ``__call__`` segments a batch of rows.

    Rows in: ``input`` (absolute path), ``stem`` (output stem). Rows out: :data:`MANIFEST_FIELDS`
    plus ``pid`` and ``ready`` (epoch seconds when its model was loaded), seen by ``on_row`` only.
    """

    CONFIG: dict[str, Any] = {}  # set on the subclass :func:`_map_workers` makes

    def __init__(self) -> None:
        from fcn_deploy.images import set_max_pixels
        from fcn_deploy.runners import create_runner
        from fcn_deploy.segmenter import Segmenter, runner_device

        self.config = config = self.CONFIG
        set_max_pixels(config["max_pixels"])
        runner = create_runner(config["backend"], config["model"], device=config["device"],
                               precision=config["precision"], **config["runner_options"])
        self.seg = Segmenter(runner, batch_size=config["batch_size"], overlap=config["overlap"],
                             window=config["window"], assembler=config["assembler"])
        self.seg.prepare()
        self.device = runner_device(runner)
        self.ready = time.time()  # model loaded: the pool's start-up ends (benchmarks/ray_cpu.py)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        from fcn_deploy.infer import InferSummary, segment_items
        from fcn_deploy.inputs import InputImage

        cfg = self.config
        items = [InputImage(Path(p), Path(s)) for p, s in zip(batch["input"], batch["stem"])]
        if cfg["slow_s"]:
            time.sleep(cfg["slow_s"] * len(items))  # tests only: a run long enough to kill a worker
        records = segment_items(self.seg, items, Path(cfg["output"]), InferSummary(), overlay=cfg["overlay"],
                                save_logits=cfg["save_logits"], workers=cfg["workers"], progress=False)
        rows = {name: [getattr(r, name) for r in records] for name in MANIFEST_FIELDS[:6]}
        rows["error"] = [e or "" for e in rows["error"]]  # one column type for Arrow
        rows["worker"] = [_worker_id()] * len(records)
        rows["device"] = [self.device] * len(records)
        rows["pid"] = [os.getpid()] * len(records)
        rows["ready"] = [self.ready] * len(records)
        return rows


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
    and encode threads; ``runner_options`` go to :func:`~fcn_deploy.runners.create_runner`
    (e.g. ``tile_hw``, ``threads``); ``max_pixels`` is the workers' image size limit
    (:func:`~fcn_deploy.images.set_max_pixels`). ``num_cpus`` sizes a local cluster this call
    starts. ``on_row`` is called with each row as it arrives and ``slow_s`` delays each image in
    the workers (both for tests and benchmarks).
    A cluster this call started is shut down at the end.
    """
    from tqdm import tqdm

    from fcn_deploy.fileio import write_bytes_atomic
    from fcn_deploy.infer import plan_inputs
    from fcn_deploy.outputs import MASK_SUFFIX, output_path
    from fcn_deploy.tiling import DEFAULT_OVERLAP, DEFAULT_WINDOW

    if ray_workers < 1:
        raise UsageError(f"--ray-workers must be >= 1, not {ray_workers}")
    if cpus_per_worker <= 0:
        raise UsageError(f"--ray-cpus-per-worker must be > 0, not {cpus_per_worker}")
    if workers is not None and workers < 1:
        raise UsageError(f"--workers must be >= 1, not {workers}")
    import_ray()  # before any work: a missing extra is the first thing said
    address = check_address(address)
    gpus = _gpus_per_worker(backend, device, gpus_per_worker)
    model_path, precision = _resolve_artifact(backend, model, precision)
    out = Path(os.path.abspath(output_dir))
    items, out, summary, skipped = plan_inputs([os.path.abspath(p) for p in paths], out, overlay=overlay,
                                               save_logits=save_logits, skip_existing=skip_existing)
    config = {"backend": backend, "model": model_path, "device": device, "precision": precision,
              "batch_size": batch_size, "overlap": DEFAULT_OVERLAP if overlap is None else overlap,
              "window": window or DEFAULT_WINDOW, "assembler": assembler, "output": str(out),
              "overlay": overlay, "save_logits": save_logits, "workers": workers or max(1, int(cpus_per_worker)),
              "slow_s": slow_s, "runner_options": dict(runner_options or {}), "max_pixels": max_pixels}
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
        _check_resources(ray, ray_workers, cpus_per_worker, gpus)
        if items:
            out.mkdir(parents=True, exist_ok=True)
            ds = _map_workers(ray, [{"input": str(i.path), "stem": str(i.rel_stem)} for i in items], _InferWorker,
                              config, workers=ray_workers, cpus=cpus_per_worker, gpus=gpus,
                              images_per_batch=images_per_batch)
            with tqdm(total=len(items), unit="img", disable=not progress, dynamic_ncols=True) as bar, \
                    contextlib.closing(_stream_rows(ds)) as stream:
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
        raise FcnDeployError(f"--ray: {len(missing)} images came back without a result, e.g. {missing[0]}")
    manifest = out / MANIFEST_NAME
    if ordered:
        out.mkdir(parents=True, exist_ok=True)
        text = "".join(json.dumps({k: r[k] for k in MANIFEST_FIELDS}, ensure_ascii=False) + "\n" for r in ordered)
        write_bytes_atomic(manifest, text.encode())
    return RayInferResult(summary, manifest, ordered, startup, ray_workers, gpus, sorted(workers_seen))


class _EvaluateWorker:
    """A Ray actor for ``evaluate --ray``: rows (index, image, label) in, one confusion matrix
    (flattened K*K int64) and the counts per image out."""

    CONFIG: dict[str, Any] = {}  # set on the subclass :func:`_map_workers` makes

    def __init__(self) -> None:
        from fcn_deploy.runners import create_runner
        from fcn_deploy.segmenter import Segmenter, runner_device

        config = self.CONFIG
        runner = create_runner(config["backend"], config["model"], device=config["device"],
                               precision=config["precision"], **config["runner_options"])
        kwargs = {} if config["overlap"] is None else {"overlap": config["overlap"]}
        self.seg = Segmenter(runner, batch_size=config["batch_size"], **kwargs)
        self.seg.prepare()
        self.runner = runner
        self.device = runner_device(runner)
        self.classes = list(runner.meta["classes"])

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        from fcn_deploy.evaluate import _predictions
        from fcn_deploy.metrics import ConfusionMatrix
        from fcn_deploy.voc import VOCSample

        samples = [VOCSample(str(n), Path(i), Path(lab))
                   for n, i, lab in zip(batch["name"], batch["image"], batch["label"])]
        k = len(self.classes)
        rows: dict[str, list] = {"index": [], "confusion": [], "pixels": [], "outside": [], "tiles": [],
                                 "inference_seconds": [], "worker": [], "device": [], "classes": [], "precision": []}
        tiles, infer_s = self.seg.tiles_run, self.runner.total_inference_time
        for (rgb, label, pred), index in zip(_predictions(self.seg, samples, k), batch["index"]):
            cm = ConfusionMatrix(k)
            cm.update(label, pred)
            rows["index"].append(int(index))
            rows["confusion"].append(cm.matrix.reshape(-1).astype(np.int64))
            rows["pixels"].append(int(cm.matrix.sum()))
            rows["outside"].append(int(np.count_nonzero((label >= k) & (label != cm.ignore_index))))
        n = len(rows["index"])
        # tiles and engine seconds of the batch, on its first row (tiles of images share batches)
        rows["tiles"] = [self.seg.tiles_run - tiles] + [0] * (n - 1)
        rows["inference_seconds"] = [self.runner.total_inference_time - infer_s] + [0.0] * (n - 1)
        rows["worker"] = [_worker_id()] * n
        rows["device"] = [self.device] * n
        rows["classes"] = [json.dumps(self.classes)] * n
        rows["precision"] = [str(self.runner.meta.get("precision") or "")] * n
        return rows


def evaluate_ray(
    samples: Sequence,
    *,
    address: str | None = None,
    ray_workers: int = 1,
    gpus_per_worker: float | None = None,
    cpus_per_worker: float = 1.0,
    backend: str = "ort",
    model: str | os.PathLike | None = None,
    device: str = "auto",
    batch_size: int = 8,
    overlap: int | None = None,
    images_per_batch: int = IMAGES_PER_BATCH,
    progress: bool = False,
    num_cpus: int | None = None,
    export_dir: str | os.PathLike = "export",
    engines_dir: str | os.PathLike = "engines",
    runner_options: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``evaluate --ray``: score VOC ``samples`` on a Ray cluster; the workers' confusion matrices
    are summed. Returns (the dict of :func:`fcn_deploy.evaluate.evaluate_runner`, info: ``device``,
    ``precision``, ``startup_seconds``, ``workers``)."""
    from tqdm import tqdm

    from fcn_deploy.evaluate import result_from_confusion
    from fcn_deploy.metrics import ConfusionMatrix

    if ray_workers < 1:
        raise UsageError(f"--ray-workers must be >= 1, not {ray_workers}")
    import_ray()
    address = check_address(address)
    gpus = _gpus_per_worker(backend, device, gpus_per_worker)
    model_path, precision = _resolve_artifact(backend, model, None, export_dir, engines_dir)
    config = {"backend": backend, "model": model_path, "device": device, "precision": precision,
              "batch_size": batch_size, "overlap": overlap, "runner_options": dict(runner_options or {})}
    ray, startup, started = connect(address, num_cpus=num_cpus)
    start = time.perf_counter()
    cm: ConfusionMatrix | None = None
    info: dict[str, Any] = {"device": None, "precision": precision, "startup_seconds": startup, "workers": set()}
    totals = {"tiles": 0, "outside": 0, "inference_seconds": 0.0, "images": 0}
    classes: list[str] = []
    try:
        _check_resources(ray, ray_workers, cpus_per_worker, gpus)
        items = [{"index": i, "name": s.name, "image": str(Path(s.image_path).resolve()),
                  "label": str(Path(s.label_path).resolve())} for i, s in enumerate(samples)]
        ds = _map_workers(ray, items, _EvaluateWorker, config, workers=ray_workers, cpus=cpus_per_worker,
                          gpus=gpus, images_per_batch=images_per_batch)
        seen: set[int] = set()
        with tqdm(total=len(items), unit="img", desc="evaluate", disable=not progress, leave=False) as bar, \
                contextlib.closing(_stream_rows(ds)) as stream:
            for row in stream:
                if cm is None:
                    classes = json.loads(row["classes"])
                    cm = ConfusionMatrix(len(classes))
                    info["device"] = row["device"]
                    info["precision"] = row["precision"] or None
                if int(row["index"]) in seen:
                    continue
                seen.add(int(row["index"]))
                cm.matrix += np.asarray(row["confusion"], dtype=cm.matrix.dtype).reshape(cm.matrix.shape)
                totals["tiles"] += int(row["tiles"])
                totals["outside"] += int(row["outside"])
                totals["inference_seconds"] += float(row["inference_seconds"])
                totals["images"] += 1
                info["workers"].add(row["worker"])
                bar.update()
    finally:
        if started:
            ray.shutdown()
    if cm is None:
        raise UsageError("evaluate --ray: the split has no images")
    info["workers"] = sorted(info["workers"])
    result = result_from_confusion(cm, classes, images=totals["images"], tiles=totals["tiles"],
                                   seconds=time.perf_counter() - start,
                                   inference_seconds=totals["inference_seconds"], outside=totals["outside"])
    return result, info
