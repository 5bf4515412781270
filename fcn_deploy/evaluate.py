"""``fcn-deploy evaluate``: whole VOC images through tiled inference, scored against their labels.

Every pixel of every image of a split is predicted (the chapter's exercise) by a
:class:`~fcn_deploy.segmenter.Segmenter` over any backend; one confusion matrix over all pixels
(void 255 ignored) gives pixel accuracy, mean class accuracy, per-class IoU and mIoU. Results are
in percent.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from fcn_deploy.errors import UsageError
from fcn_deploy.fileio import check_output_file, write_json_atomic

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

    from fcn_deploy.segmenter import Segmenter
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
    segmenter's assembler (:meth:`~fcn_deploy.segmenter.Segmenter.segment`), so only the images
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
    rows = [[name, "-" if iou is None else f"{iou:.2f}", str(int(matrix[i].sum()))]
            for i, (name, iou) in enumerate(result["iou"].items())]
    fmt = lambda v: "-" if v is None else f"{v:.2f}%"  # noqa: E731
    summary = (f"{result['backend']} on {result['images']} {result['split']} images: "
               f"pixel acc {fmt(result['pixel_acc'])}, mean class acc {fmt(result['class_acc'])}, "
               f"mIoU {fmt(result['miou'])}, {result['images_per_s']:.2f} images/s")
    return format_table(["class", "IoU %", "label px"], rows) + "\n" + summary


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
    cluster by :func:`fcn_deploy.distributed.evaluate_ray` (``ray_options``: its ``ray_workers``,
    ``gpus_per_worker``, ...), same result; ``grid`` is not available there.
    """
    from fcn_deploy import __version__
    from fcn_deploy.report import prediction_grid, save_png
    from fcn_deploy.runners import create_runner
    from fcn_deploy.voc import list_split

    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {batch_size}")
    if max_images is not None and max_images < 1:
        raise UsageError(f"--max-images must be at least 1, got {max_images}")
    report = None if report is None else check_output_file(report, force, "--report")
    grid = None if grid is None else check_output_file(grid, force, "--grid")
    samples = list_split(voc_root, split)[:max_images]
    if ray is not None:
        from fcn_deploy.distributed import evaluate_ray, import_ray

        if grid is not None:
            raise UsageError("--grid is not available with --ray (run evaluate without --ray for the grid)")
        import_ray()
        result, info = evaluate_ray(samples, address=ray or None, backend=backend, model=model, device=device,
                                    batch_size=batch_size, overlap=overlap, progress=progress,
                                    export_dir=export_dir, engines_dir=engines_dir, **(ray_options or {}))
        meta, device = {"precision": info["precision"]}, info["device"]
    else:
        runner = create_runner(backend, model, device=device, export_dir=export_dir, engines_dir=engines_dir)
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
        save_png(grid, prediction_grid(kept, meta["colormap"]))
    if echo is not None:
        if result["label_pixels_outside_classes"]:
            echo(f"warning: {result['label_pixels_outside_classes']} label pixels have class ids outside the "
                 f"model's {len(result['iou'])} classes and were not counted")
        echo(format_results(result))
    return result
