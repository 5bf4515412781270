"""``fcn-deploy evaluate``: whole VOC images through tiled inference, scored against their labels.

Every pixel of every image of a split is predicted (the chapter's exercise) by a
:class:`~fcn_deploy.infer.segmenter.Segmenter` over any backend; one confusion matrix over all pixels
(void 255 ignored) gives pixel accuracy, mean class accuracy, per-class IoU and mIoU. Results are
in percent.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

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
from fcn_deploy.errors import UsageError
from fcn_deploy.fileio import check_output_file, write_json_atomic
from fcn_deploy.outpaths import check_distinct_paths

#: Columns of the prediction grid PNG.
GRID_COLUMNS = 4


def evaluate_runner(
    runner,
    samples: Sequence,
    *,
    batch_size: int = 8,
    overlap: int | None = None,
    grid_columns: int = GRID_COLUMNS,
    progress: bool = False,
) -> tuple[dict[str, Any], list[tuple[np.ndarray, np.ndarray, np.ndarray]]]:
    """Score an *active* runner on VOC samples.

    Args:
        runner: an activated :class:`~fcn_deploy.runners.base.Runner` (its ``meta`` gives classes).
        samples: :class:`~fcn_deploy.voc.VOCSample` list; a label whose size differs from its
            image raises :class:`~fcn_deploy.errors.DatasetError` naming both files.
        batch_size, overlap: passed to the Segmenter (``overlap`` None: its default).
        grid_columns: keep the first this many (rgb, prediction, label) triples for the grid.

    Returns:
        (metrics dict, kept triples): ``pixel_acc``, ``class_acc``, ``miou`` (percent),
        ``iou`` {class name: percent or None when the class is absent from labels and
        predictions}, ``confusion_matrix`` (K x K, rows = label), ``images``, ``tiles``, ``pixels``,
        ``seconds``, ``images_per_s``, ``inference_seconds``.
    """
    from tqdm import tqdm

    from fcn_deploy.infer.segmenter import Segmenter
    from fcn_deploy.metrics import ConfusionMatrix

    classes = list(runner.meta["classes"])
    kwargs = {} if overlap is None else {"overlap": overlap}
    segmenter = Segmenter(runner, batch_size=batch_size, **kwargs)
    cm = ConfusionMatrix(len(classes))
    kept: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    outside = 0
    start = time.perf_counter()
    inference_before = runner.total_inference_time
    with tqdm(total=len(samples), unit="img", desc="evaluate", disable=not progress, leave=False) as bar:
        for rgb, label, pred in _predictions(segmenter, samples, len(classes)):
            cm.update(label, pred)  # label ids >= the model's classes are not counted: say how many
            outside += int(np.count_nonzero((label >= len(classes)) & (label != cm.ignore_index)))
            if len(kept) < grid_columns:
                kept.append((rgb, pred, label))
            bar.update()
    return result_from_confusion(cm, classes, images=len(samples), tiles=segmenter.tiles_run,
                                 seconds=time.perf_counter() - start,
                                 inference_seconds=runner.total_inference_time - inference_before,
                                 outside=outside), kept


def result_from_confusion(cm, classes: Sequence[str], *, images: int, tiles: int, seconds: float,
                          inference_seconds: float, outside: int) -> dict[str, Any]:
    """The result dict of :func:`evaluate_runner` from a filled
    :class:`~fcn_deploy.metrics.ConfusionMatrix` (also what ``evaluate --ray`` sums into)."""
    m = cm.compute()
    pct = lambda v: None if math.isnan(v) else 100.0 * v  # noqa: E731
    return {
        "images": images,
        "tiles": tiles,
        "pixels": int(cm.matrix.sum()),
        "pixel_acc": pct(m.pixel_acc),
        "class_acc": pct(m.class_acc),
        "miou": pct(m.miou),
        "iou": {name: pct(v) for name, v in zip(classes, m.iou)},
        "confusion_matrix": cm.matrix.tolist(),
        "seconds": seconds,
        "images_per_s": images / seconds if seconds > 0 else None,
        "inference_seconds": inference_seconds,
        "label_pixels_outside_classes": outside,
    }


def _predictions(segmenter, samples: Sequence, num_classes: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(rgb, label, prediction) per sample, in order: (H, W, 3) uint8, (H, W) uint8, (H, W) uint8.

    Tiles of consecutive images share batches and each image's logits are averaged by the
    segmenter's assembler (:meth:`~fcn_deploy.infer.segmenter.Segmenter.segment`), so only the images
    whose tiles are in flight are held in memory. ``num_classes`` is checked against the model.
    """
    from fcn_deploy.errors import InputMismatchError
    from fcn_deploy.tiling import ImageJob
    from fcn_deploy.voc import read_sample

    def jobs() -> Iterator[ImageJob]:
        for sample in samples:
            rgb, label = read_sample(sample)
            yield ImageJob(sample, rgb, segmenter.plan(*rgb.shape[:2]), data=label)

    for job in segmenter.segment(jobs(), want_logits=True):
        if int(job.labels.max(initial=0)) >= num_classes:
            raise InputMismatchError(f"model predicts class {int(job.labels.max())}, but the dataset has {num_classes}")
        yield job.rgb, job.data, job.labels


def format_results(result: dict[str, Any]) -> str:
    """Per-class IoU table and the summary lines."""
    from fcn_deploy.report import format_table

    matrix = np.asarray(result["confusion_matrix"])
    rows, unlabelled, predicted_only = [], 0, 0
    for i, (name, iou) in enumerate(result["iou"].items()):
        label_px, pred_px = int(matrix[i].sum()), int(matrix[:, i].sum())
        if label_px == 0:  # IoU undefined for the class; predicted anyway, it enters the mIoU as 0
            unlabelled += 1
            predicted_only += pred_px > 0
            cell = "n/a*"
        else:
            cell = "-" if iou is None else f"{iou:.2f}"
        rows.append([name, cell, str(label_px), str(pred_px)])
    fmt = lambda v: "-" if v is None else f"{v:.2f}%"  # noqa: E731
    summary = (f"{result['backend']} on {result['images']} {result['split']} images: "
               f"pixel acc {fmt(result['pixel_acc'])}, mean class acc {fmt(result['class_acc'])}, "
               f"mIoU {fmt(result['miou'])}, {result['images_per_s']:.2f} images/s")
    table = format_table(["class", "IoU %", "label px", "pred px"], rows)
    if unlabelled:
        table += (f"\n* n/a: no label pixel of this class ({unlabelled} classes), so its IoU is undefined; the mIoU "
                  f"averages the classes labelled or predicted, and a class predicted but never labelled "
                  f"counts as 0 ({predicted_only} here)")
    return table + "\n" + summary


def evaluate(
    voc_root: str | os.PathLike,
    *,
    split: str = "val",
    backend: str = "ort",
    model: str | os.PathLike | None = None,
    device: str = "auto",
    batch_size: int = 8,
    overlap: int | None = None,
    report: str | os.PathLike | None = None,
    grid: str | os.PathLike | None = None,
    max_images: int | None = None,
    export_dir: str | os.PathLike = "export",
    engines_dir: str | os.PathLike = "engines",
    force: bool = False,
    echo: Callable[[str], None] | None = None,
    progress: bool = False,
    ray: str | None = None,
    ray_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Evaluate ``backend`` (artifact ``model`` or the default chain) on ``split`` of ``voc_root``.

    Writes the result dict (see :func:`evaluate_runner`, plus ``voc_root``, ``split``,
    ``backend``, ``precision``, ``device``, ``fcn_deploy_version``) to ``report`` as JSON and a
    prediction grid PNG (rows photo / prediction / ground truth, first :data:`GRID_COLUMNS`
    images) to ``grid``; both atomically, refusing to overwrite without ``force``.

    ``ray`` (an address, or ``""`` for the default cluster): the images are scored on a Ray
    cluster by :func:`evaluate_ray` (``ray_options``: its ``ray_workers``,
    ``gpus_per_worker``, ...), same result; ``grid`` is not available there.
    """
    from fcn_deploy import __version__
    from fcn_deploy.report import labelled_prediction_grid, save_png
    from fcn_deploy.runners import open_runner
    from fcn_deploy.voc import list_split

    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {batch_size}")
    if max_images is not None and max_images < 1:
        raise UsageError(f"--max-images must be at least 1, got {max_images}")
    check_distinct_paths({"--report": report, "--grid": grid}, {"--model": model})
    report = None if report is None else check_output_file(report, force, "--report")
    grid = None if grid is None else check_output_file(grid, force, "--grid")
    samples = list_split(voc_root, split)[:max_images]
    if ray is not None:

        if grid is not None:
            raise UsageError("--grid is not available with --ray (run evaluate without --ray for the grid)")
        import_ray()
        result, info = evaluate_ray(samples, address=ray or None, backend=backend, model=model, device=device,
                                    batch_size=batch_size, overlap=overlap, progress=progress,
                                    export_dir=export_dir, engines_dir=engines_dir, **(ray_options or {}))
        meta, device = {"precision": info["precision"]}, info["device"]
    else:
        runner = open_runner(backend, model, device=device, export_dir=export_dir, engines_dir=engines_dir)
        with runner:
            result, kept = evaluate_runner(runner, samples, batch_size=batch_size, overlap=overlap,
                                           progress=progress)
            meta = dict(runner.meta)
            device = runner.device
    result = {"fcn_deploy_version": __version__, "voc_root": str(voc_root), "split": split,
              "backend": backend, "model": None if model is None else str(model),
              "precision": meta.get("precision"), "device": device, **result}
    if report is not None:
        write_json_atomic(report, result)
    if grid is not None:
        save_png(grid, labelled_prediction_grid(kept, meta["colormap"], meta["classes"]))
    if echo is not None:
        if result["label_pixels_outside_classes"]:
            echo(f"warning: {result['label_pixels_outside_classes']} label pixels have class ids outside the "
                 f"model's {len(result['iou'])} classes and were not counted")
        echo(format_results(result))
    return result


# -- evaluate --ray: the same scores on a Ray cluster (fcn_deploy.distributed) ----------------
class _EvaluateWorker:
    """A Ray actor for ``evaluate --ray``: rows (index, image, label) in, one confusion matrix
    (flattened K*K int64) and the counts per image out."""

    CONFIG: dict[str, Any] = {}  # set on the subclass :func:`map_workers` makes

    def __init__(self) -> None:
        from fcn_deploy.infer.segmenter import Segmenter, runner_device

        config = self.CONFIG
        runner = config["plan"].open(config["device"], **config["runner_options"])
        kwargs = {} if config["overlap"] is None else {"overlap": config["overlap"]}
        self.seg = Segmenter(runner, batch_size=config["batch_size"], **kwargs)
        self.seg.prepare()
        self.runner = runner
        self.device = runner_device(runner)
        self.classes = list(runner.meta["classes"])

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
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
        rows["worker"] = [worker_id()] * n
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

    from fcn_deploy.metrics import ConfusionMatrix

    if ray_workers < 1:
        raise UsageError(f"--ray-workers must be >= 1, not {ray_workers}")
    import_ray()
    address = check_address(address)
    gpus = _gpus(backend, device, gpus_per_worker)
    from fcn_deploy.runners import locate_runner

    plan = locate_runner(backend, model, device=None, export_dir=export_dir, engines_dir=engines_dir).absolute()
    precision = plan.precision
    config = {"plan": plan, "device": device,
              "batch_size": batch_size, "overlap": overlap, "runner_options": dict(runner_options or {})}
    ray, startup, started = connect(address, num_cpus=num_cpus)
    start = time.perf_counter()
    cm: ConfusionMatrix | None = None
    info: dict[str, Any] = {"device": None, "precision": precision, "startup_seconds": startup, "workers": set()}
    totals = {"tiles": 0, "outside": 0, "inference_seconds": 0.0, "images": 0}
    classes: list[str] = []
    try:
        check_resources(ray, ray_workers, cpus_per_worker, gpus)
        items = [{"index": i, "name": s.name, "image": str(Path(s.image_path).resolve()),
                  "label": str(Path(s.label_path).resolve())} for i, s in enumerate(samples)]
        ds = map_workers(ray, items, _EvaluateWorker, config, workers=ray_workers, cpus=cpus_per_worker,
                          gpus=gpus, images_per_batch=images_per_batch)
        seen: set[int] = set()
        with tqdm(total=len(items), unit="img", desc="evaluate", disable=not progress, leave=False) as bar, \
                contextlib.closing(stream_rows(ds)) as stream:
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
