"""``fcn-deploy demo``: the whole pipeline on the embedded default (CPU, onnxruntime), offline.

Stages, each announced and timed: synthetic VOC data -> short training -> ONNX export (+ FP16
ONNX) -> TensorRT engine (when a TensorRT flavour is installed) -> tiled inference of the
validation photos with onnxruntime -> ``check`` (parity against PyTorch) -> ``evaluate``
(mIoU, prediction grid). Everything is written under one work folder, which the demo owns: a
folder it wrote before (marked by :data:`MARKER`) is reused and its artifacts overwritten.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from fcn_deploy.errors import ArtifactExistsError, BackendUnavailableError, FcnDeployError
from fcn_deploy.fileio import write_bytes_atomic

#: File that marks a folder as the demo's own (so a second ``make demo`` may overwrite it).
MARKER = ".fcn-deploy-demo"


@dataclass
class DemoSettings:
    """Sizes of the demo run; the defaults take a few minutes on 2 CPU cores."""

    num_images: int = 32
    epochs: int = 8
    crop_hw: tuple[int, int] = (160, 224)
    batch_size: int = 8
    lr: float = 0.003
    check_tiles: int = 16


@dataclass
class DemoResult:
    """Paths the demo wrote and the numbers it measured."""

    workdir: Path
    paths: dict[str, Path] = field(default_factory=dict)
    numbers: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _prepare_workdir(workdir: Path, force: bool) -> None:
    if workdir.exists() and not workdir.is_dir():
        raise FcnDeployError(f"--workdir {workdir} is a file, expected a folder")
    if workdir.is_dir() and any(workdir.iterdir()) and not (workdir / MARKER).exists() and not force:
        raise ArtifactExistsError(
            f"--workdir {workdir} is not empty and was not written by the demo; choose another "
            "folder or pass --force"
        )
    workdir.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(workdir / MARKER, b"written by fcn-deploy demo; safe to delete\n")


def run_demo(
    workdir: str | os.PathLike = "demo-work",
    settings: DemoSettings | None = None,
    *,
    force: bool = False,
    echo: Callable[[str], None] = print,
    progress: bool = True,
) -> DemoResult:
    """Run every stage in ``workdir``; return what was written and measured.

    A failing stage raises :class:`~fcn_deploy.errors.FcnDeployError` whose message names the
    stage and the reason.
    """
    s = settings or DemoSettings()
    work = Path(workdir)
    _prepare_workdir(work, force)
    result = DemoResult(work)
    p = result.paths
    p.update(
        data=work / "data", model=work / "model.pt", onnx=work / "export" / "fcn.onnx",
        engines=work / "engines", predictions=work / "predictions",
        check_report=work / "check.json", disagreement=work / "check-disagreement",
        evaluate_report=work / "evaluate.json", grid=work / "prediction-grid.png",
    )
    stages = [
        ("data", "write a synthetic VOC-format dataset", lambda: _data(s, result)),
        ("train", "train briefly on the CPU", lambda: _train(s, result, progress)),
        ("export", "export ONNX (+ FP16 ONNX) and verify", lambda: _export(result)),
        ("engine", "build a TensorRT engine", lambda: _engine(result)),
        ("infer", "tiled inference of the photos (onnxruntime)", lambda: _infer(result, progress)),
        ("check", "parity of every backend against PyTorch", lambda: _check(s, result, echo)),
        ("evaluate", "mIoU of whole images and a prediction grid", lambda: _evaluate(result, echo)),
    ]
    for i, (name, what, run) in enumerate(stages, 1):
        echo(f"[{i}/{len(stages)}] {name}: {what}")
        start = time.perf_counter()
        try:
            line = run()
        except FcnDeployError as exc:
            err = FcnDeployError(f"demo stage '{name}' failed: {exc}")
            err.exit_code = exc.exit_code
            raise err from None
        echo(f"      {line} ({time.perf_counter() - start:.1f} s)")
    echo(_closing(result))
    return result


def _data(s: DemoSettings, r: DemoResult) -> str:
    from fcn_deploy.voc import list_split, write_synthetic_voc

    r.paths["voc"] = write_synthetic_voc(r.paths["data"], num_images=s.num_images, seed=0, force=True)
    n_train, n_val = (len(list_split(r.paths["voc"], split)) for split in ("train", "val"))
    return f"{s.num_images} images ({n_train} train, {n_val} val) in {r.paths['voc']}"


def _train(s: DemoSettings, r: DemoResult, progress: bool) -> str:
    from fcn_deploy.train import train

    history = train(r.paths["voc"], r.paths["model"], epochs=s.epochs, lr=s.lr, batch_size=s.batch_size,
                    crop_hw=s.crop_hw, device="cpu", force=True, progress=progress)
    last = history[-1]
    r.numbers["train_val_miou"] = last.get("val_miou")
    miou = last.get("val_miou")
    return (f"{len(history)} epochs, train loss {last['train_loss']:.3f}, validation mIoU "
            f"{'n/a' if miou is None else f'{100 * miou:.2f}%'} -> {r.paths['model']}")


def _export(r: DemoResult) -> str:
    from fcn_deploy.export.torch_export import export_artifacts

    reports = export_artifacts(r.paths["model"], r.paths["onnx"], fp16=True, force=True)
    r.paths["fp16_onnx"] = reports[1].path
    r.numbers["export_verification"] = reports[0].verification
    r.numbers["fp16_verification"] = reports[1].verification
    return f"{reports[0].path} and {reports[1].path} written and verified against PyTorch"


def _engine(r: DemoResult) -> str:
    from fcn_deploy.trt.build import build_engine
    from fcn_deploy.trt.flavour import resolve_flavour

    try:
        resolve_flavour("auto")
    except BackendUnavailableError as exc:
        r.notes.append(f"no TensorRT engine: {exc}")
        return f"skipped: {exc}"
    report = build_engine(r.paths["onnx"], precision="fp16", engines_dir=r.paths["engines"], force=True)
    r.paths["engine"] = report.engine
    trt = report.meta["trt"]
    return f"{report.engine.name} ({trt['label']} {trt['version']}, fp16, float32 IO)"


def _infer(r: DemoResult, progress: bool) -> str:
    from fcn_deploy.infer.pipeline import run_inference
    from fcn_deploy.runners import open_runner
    from fcn_deploy.voc import list_split

    photos = [sample.image_path for sample in list_split(r.paths["voc"], "val")]
    summary = run_inference(photos, r.paths["predictions"], runner=open_runner("ort", r.paths["onnx"], device="cpu"),
                            overlay=True, progress=progress)
    if summary.failed:
        raise FcnDeployError(f"{len(summary.failed)} images failed: {summary.failed[0][1]}")
    r.numbers["infer"] = {"images": summary.images, "tiles": summary.tiles,
                          "images_per_s": summary.images_per_s, "tiles_per_s": summary.tiles_per_s}
    return summary.format()


def _check(s: DemoSettings, r: DemoResult, echo: Callable[[str], None]) -> str:
    from fcn_deploy.parity.check import check

    report = check(("all",), model=r.paths["model"], export_dir=r.paths["onnx"].parent,
                   engines_dir=r.paths["engines"], voc_root=r.paths["voc"], max_tiles=s.check_tiles,
                   report=r.paths["check_report"], disagreement_dir=r.paths["disagreement"], force=True,
                   device="cpu", echo=echo)
    r.numbers["check"] = report.as_dict()
    names = ", ".join(b.backend for b in report.checked)
    return f"{names}: all within thresholds; report {r.paths['check_report']}"


def _evaluate(r: DemoResult, echo: Callable[[str], None]) -> str:
    from fcn_deploy.evaluate import evaluate

    result = evaluate(r.paths["voc"], backend="ort", model=r.paths["onnx"], report=r.paths["evaluate_report"],
                      grid=r.paths["grid"], device="cpu", force=True, echo=echo)
    r.numbers["evaluate"] = {k: result[k] for k in ("pixel_acc", "class_acc", "miou", "images_per_s")}
    return f"mIoU {result['miou']:.1f}%, pixel accuracy {result['pixel_acc']:.1f}% -> {r.paths['grid']}"


def _closing(r: DemoResult) -> str:
    p = r.paths
    overlays = sorted(p["predictions"].rglob("*.overlay.jpg"))[:3]
    lines = ["", "demo finished; look at:",
             f"  prediction grid    {p['grid']}",
             *[f"  overlay            {o}" for o in overlays],
             f"  masks              {p['predictions']}/ (palette PNGs, pixel value = class id)",
             f"  parity report      {p['check_report']} (disagreement maps in {p['disagreement']}/)",
             f"  evaluation         {p['evaluate_report']}",
             f"  artifacts          {p['model']}, {p['onnx']}, {p['fp16_onnx']}"]
    if "engine" in p:
        lines.append(f"  TensorRT engine    {p['engine']} (built ahead of time; run it on an NVIDIA GPU)")
    lines += [f"  note: {n}" for n in r.notes]
    return "\n".join(lines)
