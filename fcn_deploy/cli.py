"""The ``fcn-deploy`` command line: a click group; each command is a thin wrapper over one
library function. Errors of type :class:`~fcn_deploy.errors.FcnDeployError` become one line
``error: ...`` on stderr and a non-zero exit code, never a traceback."""

from __future__ import annotations

import signal
import sys
import threading
import warnings

import click

from fcn_deploy import __version__
from fcn_deploy.errors import FcnDeployError, UsageError
from fcn_deploy.runners.registry import BACKENDS, CHECK_BACKENDS


def _show_progress() -> bool:
    """Progress bars only on a terminal: in a log file tqdm's carriage returns are noise."""
    return sys.stderr.isatty()


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """Our own warnings (e.g. an image PIL decoded with a corrupt EXIF block) as one line; others
    as Python shows them."""
    if getattr(category, "__module__", "").startswith("fcn_deploy"):
        return f"warning: {message}\n"
    return _default_formatwarning(message, category, filename, lineno, line)


_default_formatwarning = warnings.formatwarning


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C's KeyboardInterrupt, so that the same
    clean-up runs (temporary files removed, runners deactivated)."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


class _Group(click.Group):
    """Click group that turns our typed errors into clean one-line messages.

    Ctrl-C prints ``interrupted`` and exits 130; SIGTERM is handled the same way (the
    clean-up of KeyboardInterrupt runs) and prints ``terminated`` and exits 143 (128 + 15).
    """

    def invoke(self, ctx: click.Context):
        previous = None
        if threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGTERM, _raise_terminated)
        from fcn_deploy.runners.device import announce_devices

        try:
            with announce_devices():  # "device: ..." on stderr in a command; library calls stay silent
                return super().invoke(ctx)
        except FcnDeployError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except Terminated:
            click.echo("terminated (SIGTERM)", err=True)
            sys.exit(143)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="fcn-deploy")
def cli() -> None:
    """Train, export, compile, run and verify the d2l FCN segmentation network.

    \b
    fcn-deploy synth-voc data/          write a small synthetic VOC-format dataset
    fcn-deploy train --voc-root data/VOCdevkit/VOC2012 -o model.pt
    fcn-deploy export model.pt          -> export/fcn.onnx (+ fcn.json)
    fcn-deploy build-engine --fp16      -> engines/*.engine (+ .json)
    fcn-deploy infer photos/ -o out/    tiled inference of any image size
    fcn-deploy check                    parity of every backend against PyTorch
    """


# --- data and training (fcn_deploy.voc, fcn_deploy.train) -------------------------------
# [cli:train]
@cli.command("synth-voc")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--num-images", type=click.IntRange(min=2), default=24, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--force", is_flag=True, help="Overwrite a dataset already there.")
def synth_voc_cmd(directory, num_images, seed, force) -> None:
    """Write a synthetic VOC-format dataset to DIRECTORY/VOCdevkit/VOC2012."""
    from fcn_deploy.voc import list_split, write_synthetic_voc

    voc = write_synthetic_voc(directory, num_images=num_images, seed=seed, force=force)
    n_train, n_val = len(list_split(voc, "train")), len(list_split(voc, "val"))
    click.echo(f"wrote {num_images} images ({n_train} train, {n_val} val) to {voc}")


@cli.command("train")
@click.option("--voc-root", required=True, type=click.Path(), help="VOCdevkit/VOC2012 folder (or a folder holding VOCdevkit/).")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Checkpoint to write (history: <stem>.history.json beside it).")
@click.option("--epochs", type=click.IntRange(min=1), default=5, show_default=True, help="Total epochs (with --resume: including those done).")
@click.option("--lr", type=float, default=0.001, show_default=True)
@click.option("--weight-decay", type=float, default=1e-3, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--crop", default="320x480", show_default=True, help="Training crop HxW, multiples of 32.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--resume", is_flag=True, help="Continue from the checkpoint's last epoch.")
@click.option("--backbone-weights", type=click.Path(dir_okay=False), help="torchvision ResNet-18 ImageNet weights file.")
@click.option("--pretrained", is_flag=True, help="ResNet-18 ImageNet weights from torchvision's local cache.")
@click.option("--num-workers", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--max-train-images", type=click.IntRange(min=1), help="Use only the first N usable training images.")
@click.option("--force", is_flag=True, help="Overwrite an existing checkpoint.")
def train_cmd(voc_root, output, epochs, lr, weight_decay, batch_size, crop, device, resume, backbone_weights, pretrained, num_workers, seed, max_train_images, force) -> None:
    """Train the FCN on a VOC-format dataset (the chapter's defaults)."""
    from fcn_deploy.train import history_path, parse_hw, train

    history = train(voc_root, output, epochs=epochs, lr=lr, weight_decay=weight_decay, batch_size=batch_size,
                    crop_hw=parse_hw(crop, "--crop"), device=device, resume=resume, backbone_weights=backbone_weights,
                    pretrained=pretrained, num_workers=num_workers, seed=seed, force=force, max_train_images=max_train_images,
                    progress=_show_progress())
    last = history[-1] if history else {}
    scores = ", ".join(f"{name} {100 * last[k]:.2f}%" for k, name in (("val_miou", "val mIoU"), ("val_pixel_acc", "val pixel acc"))
                       if last.get(k) is not None)
    if not history.trained:
        click.echo(f"{output} has {len(history)} epochs already ({scores}), --epochs {epochs}: nothing to do, "
                   f"nothing written; pass a larger --epochs to train more")
        return
    click.echo(f"{len(history)} epochs ({scores}); wrote {output} and {history_path(output)}")

# --- export (fcn_deploy.export) -----------------------------------------------------------
# [cli:export]
@cli.command("export")
@click.argument("checkpoint", default="model.pt", type=click.Path(dir_okay=False))
@click.option("-o", "--output", default="export/fcn.onnx", show_default=True, type=click.Path(dir_okay=False), help="ONNX to write; its metadata sidecar is <stem>.json.")
@click.option("--height", type=int, default=320, show_default=True, help="Tile height, a multiple of 32.")
@click.option("--width", type=int, default=480, show_default=True, help="Tile width, a multiple of 32.")
@click.option("--batch", type=int, help="Fix the batch size (default: a dynamic 'batch' dimension).")
@click.option("--opset", type=int, help="ONNX opset (default: fcn_deploy.export.torch_export.DEFAULT_OPSET, 18).")
@click.option("--fp16", is_flag=True, help="Also write the strongly typed FP16 ONNX <stem>.fp16.onnx (+ .json).")
@click.option("--keep-fp32", multiple=True, help="With --fp16: op type or node name kept in float32 (repeatable).")
@click.option("--int8", is_flag=True, help="Also write the calibrated QDQ INT8 ONNX <stem>.int8.onnx (+ .json).")
@click.option("--int8-cpu", is_flag=True, help="Also write <stem>.int8-cpu.onnx: INT8 with uint8 activations, faster on onnxruntime's CPU provider, not for TensorRT.")
@click.option("--calib", multiple=True, type=click.Path(), help="With --int8/--int8-cpu: calibration image file or folder (repeatable).")
@click.option("--voc-root", type=click.Path(), help="With --int8/--int8-cpu: calibrate on this VOC2012 train split.")
@click.option("--calib-tiles", type=int, default=32, show_default=True, help="With --int8: calibration tiles drawn (at least 8).")
@click.option("--calib-method", type=click.Choice(["minmax", "entropy", "percentile"]), default="minmax", show_default=True, help="With --int8: how activation ranges are chosen.")
@click.option("--no-verify", is_flag=True, help="Skip the onnxruntime-vs-reference verification.")
@click.option("--force", is_flag=True, help="Overwrite existing outputs.")
def export_cmd(checkpoint, output, height, width, batch, opset, fp16, keep_fp32, int8, int8_cpu, calib, voc_root, calib_tiles, calib_method, no_verify, force) -> None:
    """Export CHECKPOINT (default model.pt) to ONNX, check the graph and verify it."""
    from fcn_deploy.export.torch_export import DEFAULT_OPSET, export_artifacts
    from fcn_deploy.export.int8 import check_int8_args, export_int8

    check_int8_args(output, int8=int8, int8_cpu=int8_cpu, calib=calib, voc_root=voc_root, calib_tiles=calib_tiles, force=force)
    reports = export_artifacts(
        checkpoint, output, fp16=fp16, keep_fp32=keep_fp32, height=height, width=width, batch=batch,
        opset=DEFAULT_OPSET if opset is None else opset, force=force, verify=not no_verify,
    )
    for cpu_only in [False] * int8 + [True] * int8_cpu:
        reports.append(export_int8(output, calib=calib, voc_root=voc_root, calib_tiles=calib_tiles, cpu_only=cpu_only,
                                   calib_method=calib_method, verify=not no_verify, force=force))
    for report in reports:
        click.echo(report.summary())

# --- TensorRT engines (fcn_deploy.trt.build) -------------------------------------------------
# [cli:engine]
@cli.command("build-engine")
@click.argument("onnx", default="export/fcn.onnx", type=click.Path(dir_okay=False))
@click.option("--fp16", "precision", flag_value="fp16", default=True, help="FP16 (the default): builds from <onnx stem>.fp16.onnx (made beside the ONNX if absent or stale).")
@click.option("--fp32", "precision", flag_value="fp32", help="FP32 (TF32 off): builds from the ONNX itself.")
@click.option("--int8", "precision", flag_value="int8", help="INT8: builds from the calibrated <onnx stem>.int8.onnx of `export --int8` (must exist and be fresh).")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Engine path (default: engines/<name showing precision, TensorRT, GPU or portable>).")
@click.option("--trt", "flavour", type=click.Choice(["auto", "tensorrt", "rtx"]), default="auto", show_default=True, help="auto: TensorRT if installed, else TensorRT-RTX.")
@click.option("--workspace", type=click.IntRange(min=1), help="Workspace memory limit in MiB.")
@click.option("--min-batch", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--opt-batch", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--max-batch", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--labels-output", is_flag=True, help="Also output uint8 class indices 'labels' (argmax on the GPU).")
@click.option("--timing-cache", type=click.Path(dir_okay=False), help="Timing cache file reused across builds (TensorRT only).")
@click.option("--force", is_flag=True, help="Overwrite an existing engine.")
def build_engine_cmd(onnx, precision, output, flavour, workspace, min_batch, opt_batch, max_batch, labels_output, timing_cache, force) -> None:
    """Build a TensorRT engine (+ JSON sidecar) from ONNX (default export/fcn.onnx)."""
    from fcn_deploy.trt.build import build_engine

    report = build_engine(
        onnx, output, precision=precision, flavour=flavour, workspace_mib=workspace,
        min_batch=min_batch, opt_batch=opt_batch, max_batch=max_batch, timing_cache=timing_cache,
        labels_output=labels_output, force=force,
    )
    click.echo(report.summary())


# --- inference (fcn_deploy.infer; --ray: fcn_deploy.infer.ray) ------------------------------
def _ray_options(command):
    """``--ray [ADDRESS]``, ``--ray-workers``, ``--ray-gpus-per-worker``, ``--ray-cpus-per-worker``."""
    for option in reversed([
        click.option("--ray", "ray_address", is_flag=False, flag_value="", default=None, metavar="[ADDRESS]",
                     help="Run on a Ray cluster: no ADDRESS (RAY_ADDRESS, a running local cluster or a new one), "
                          "local, auto or ray://host:port. Needs the 'ray' extra."),
        click.option("--ray-workers", type=click.IntRange(min=1), default=1, show_default=True,
                     help="With --ray: actors, each holding one model."),
        click.option("--ray-gpus-per-worker", type=click.FloatRange(min=0), help="With --ray: GPUs per actor, "
                     "fractions allowed (default: 1 when the device resolves to CUDA, else 0)."),
        click.option("--ray-cpus-per-worker", type=click.FloatRange(min=0, min_open=True), default=1.0,
                     show_default=True, help="With --ray: CPUs per actor."),
    ]):
        command = option(command)
    return command


# [cli:infer]
@cli.command("infer")
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("-o", "--output", default="predictions", show_default=True, type=click.Path(file_okay=False), help="Output folder; names mirror the input tree (<root>/<rel>/<name>.<ext> -> <out>/<rel>/<name>.png). It may lie inside an input folder (left out of the inputs) if new or an infer output folder; never an input folder itself or above one.")
@click.option("--backend", type=click.Choice(BACKENDS), default="ort", show_default=True)
@click.option("--model", type=click.Path(dir_okay=False), help="Artifact (default: the chain in export/, engines/, model.pt).")
@click.option("--device", default="auto", show_default=True, help="auto (CUDA when a GPU and the backend's GPU runtime are present, else CPU; the choice is printed), cpu, cuda or cuda:N.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True, help="Tiles per call, across images.")
@click.option("--overlap", type=click.IntRange(min=0), default=128, show_default=True, help="Minimum overlap of neighbouring tiles in pixels.")
@click.option("--window", type=click.Choice(["hann", "uniform"]), default="hann", show_default=True, help="Weighting of overlapping logits.")
@click.option("--overlay", is_flag=True, help="Also write <name>.overlay.jpg (photo blended with class colours).")
@click.option("--save-logits", is_flag=True, help="Also write <name>.logits.npy, float16 (C, H, W).")
@click.option("--skip-existing", is_flag=True, help="Skip complete images: every requested output exists (resume a run).")
@click.option("--keep-extension", is_flag=True, help="Name outputs <name>.<ext>.png (for folders holding a.jpg beside a.png, which otherwise both fail).")
@click.option("--workers", type=click.IntRange(min=1), help="Decode/encode threads (default: the CPU cores).")
@click.option("--max-pixels", type=click.IntRange(min=1), help="Refuse images of more pixels (default: fcn_deploy.images.DEFAULT_MAX_PIXELS, 2**27 = 134 MP).")
@click.option("--max-tiles", type=click.IntRange(min=1), help="Refuse images needing more tiles, from their header (default: tiles covering 16x the pixel limit, 13981 of 320x480).")
@click.option("--decode", type=click.Choice(["cpu", "gpu"]), default="cpu", show_default=True, help="gpu: decode JPEGs on the runner's CUDA device (nvJPEG, in batches; PIL for the rest).")
@_ray_options
def infer_cmd(paths, output, backend, model, device, batch_size, overlap, window, overlay, save_logits, skip_existing, keep_extension,
              workers, max_pixels, max_tiles, decode, ray_address, ray_workers, ray_gpus_per_worker, ray_cpus_per_worker) -> None:
    """Segment images of any size (files or folders, recursively) into palette PNG masks."""
    from fcn_deploy.images import set_max_pixels
    from fcn_deploy.infer.pipeline import run_inference
    from fcn_deploy.runners import open_runner

    set_max_pixels(max_pixels)
    if not output:
        raise UsageError("-o is empty: name an output folder (e.g. -o predictions)")
    if ray_address is not None:
        from fcn_deploy.infer.ray import run_inference_ray

        if decode != "cpu":
            raise click.UsageError("--decode gpu is for single-process infer, not with --ray")
        result = run_inference_ray(
            paths, output, address=ray_address, ray_workers=ray_workers, gpus_per_worker=ray_gpus_per_worker,
            cpus_per_worker=ray_cpus_per_worker, backend=backend, model=model, device=device, batch_size=batch_size,
            overlap=overlap, window=window, overlay=overlay, save_logits=save_logits, skip_existing=skip_existing,
            workers=workers, max_pixels=max_pixels, keep_extension=keep_extension, max_tiles=max_tiles,
            progress=_show_progress())
        summary = result.summary
        click.echo(f"ray: {result.workers} workers ({result.gpus_per_worker:g} GPUs each), started in "
                   f"{result.startup_seconds:.2f} s; manifest {result.manifest}", err=True)
    else:
        summary = run_inference(
            paths, output, runner=lambda: open_runner(backend, model, device=device), batch_size=batch_size, overlap=overlap,
            window=window, overlay=overlay, save_logits=save_logits, skip_existing=skip_existing, workers=workers,
            decode=decode, keep_extension=keep_extension, max_tiles=max_tiles, progress=_show_progress(),
        )
    for _, message in summary.failed:
        click.echo(f"failed: {message}", err=True)
    click.echo(summary.format())
    sys.exit(1 if summary.failed else 0)

# --- serving (fcn_deploy.serve) ---------------------------------------------------------------
# [cli:serve]
@cli.command("serve")
@click.option("--backend", type=click.Choice(BACKENDS), default="ort", show_default=True)
@click.option("--model", type=click.Path(dir_okay=False), help="Artifact (default: the chain in export/, engines/, model.pt).")
@click.option("--device", default="auto", show_default=True, help="auto (CUDA when a GPU and the backend's GPU runtime are present, else CPU; printed), cpu, cuda or cuda:N.")
@click.option("--replicas", type=click.IntRange(min=1), default=1, show_default=True, help="Model replicas, each one runner.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every interface).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--ray", "ray_address", is_flag=False, flag_value="", default=None, metavar="[ADDRESS]",
              help="Join a Ray cluster as infer --ray does: no ADDRESS (RAY_ADDRESS, a running local cluster or a new one), "
                   "local, auto or ray://host:port. Default: a private local cluster.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True, help="Tiles per engine batch, across requests.")
@click.option("--batch-wait", type=click.FloatRange(min=0), default=0.01, show_default=True, help="Seconds a batch that is not full waits for more tiles.")
@click.option("--overlap", type=click.IntRange(min=0), default=128, show_default=True, help="Minimum overlap of neighbouring tiles in pixels (as infer).")
@click.option("--window", type=click.Choice(["hann", "uniform"]), default="hann", show_default=True, help="Weighting of overlapping logits (as infer).")
@click.option("--max-ongoing", type=click.IntRange(min=1), default=16, show_default=True, help="Requests one replica works on at once.")
@click.option("--max-queued", type=click.IntRange(min=0), default=64, show_default=True, help="Requests waiting for a replica beyond those; more get 503.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=60.0, show_default=True, help="Seconds a request may take; past it: 504.")
@click.option("--retry-after", type=click.IntRange(min=0), default=1, show_default=True, help="Retry-After seconds of a 503.")
@click.option("--max-body-bytes", type=click.IntRange(min=1), default=32 << 20, show_default=True, help="Largest request body; larger: 413.")
@click.option("--max-pixels", type=click.IntRange(min=1), default=1 << 25, show_default=True, help="Largest image, from its header, before decoding; larger: 413.")
@click.option("--max-logits-bytes", type=click.IntRange(min=1), default=64 << 20, show_default=True, help="Largest output=logits answer; larger: 413.")
@click.option("--replica-cpus", type=click.FloatRange(min=0), default=1.0, show_default=True, help="CPUs Ray reserves per model replica.")
@click.option("--replica-gpus", type=click.FloatRange(min=0), help="GPUs per model replica, fractions allowed (default: 1 on CUDA, else 0).")
def serve_cmd(backend, model, device, replicas, host, port, ray_address, batch_size, batch_wait, overlap, window, max_ongoing,
              max_queued, timeout, retry_after, max_body_bytes, max_pixels, max_logits_bytes, replica_cpus, replica_gpus) -> None:
    """Serve the model over HTTP on Ray Serve: POST an image to /v1/segment, get its mask (docs/serving.md)."""
    from fcn_deploy.serve import ServeSettings, serve

    settings = ServeSettings(
        backend=backend, model=model, device=device, replicas=replicas, host=host, port=port, batch_size=batch_size,
        batch_wait_s=batch_wait, overlap=overlap, window=window, max_ongoing=max_ongoing, max_queued=max_queued,
        timeout_s=timeout, retry_after_s=retry_after, max_body_bytes=max_body_bytes, max_pixels=max_pixels,
        max_logits_bytes=max_logits_bytes, replica_cpus=replica_cpus, replica_gpus=replica_gpus)
    serve(settings, ray_address=ray_address, echo=lambda line: click.echo(line, err=True))


# --- parity, evaluation, benchmarks (fcn_deploy.parity, fcn_deploy.evaluate, fcn_deploy.bench)
# [cli:check]
@cli.command("check")
@click.option("--backend", "backends", multiple=True, default=("all",), show_default=True, help=f"{', '.join(CHECK_BACKENDS)} or all (every built one); repeatable or comma-separated.")
@click.option("--model", default="model.pt", show_default=True, type=click.Path(dir_okay=False), help="Checkpoint of the float32 PyTorch reference (CPU).")
@click.option("--export-dir", default="export", show_default=True, type=click.Path(file_okay=False))
@click.option("--engines-dir", default="engines", show_default=True, type=click.Path(file_okay=False))
@click.option("--images", type=click.Path(file_okay=False), help="Draw tiles from the photos in this folder.")
@click.option("--voc-root", type=click.Path(), help="Draw tiles from this VOC2012 val split (with labels).")
@click.option("--synthetic", type=click.IntRange(min=2), help="Draw tiles from N generated images with labels (the default, N=8).")
@click.option("--max-tiles", type=click.IntRange(min=1), default=32, show_default=True, help="Tiles drawn, spread over the images.")
@click.option("--batch-size", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--threshold", "thresholds", multiple=True, metavar="PREC.METRIC=VALUE", help="Override a limit (repeatable), e.g. fp16.agreement=99 or fp32.max_abs=off. Percentages in % (99.9, not 0.999). Metrics: agreement, max_abs, mean_abs, p99_abs, cosine_min, miou_vs_reference, miou_gt_change.")
@click.option("--report", type=click.Path(dir_okay=False), help="Write the JSON report here.")
@click.option("--disagreement-dir", type=click.Path(file_okay=False), help="Disagreement map PNGs of the worst tiles (default: <report>-disagreement/; without --report, check/ and only for a failing backend).")
@click.option("--device", default="auto", show_default=True, help="Device of the backends: auto (CUDA when a GPU and the backend's GPU runtime are present, else CPU; printed), cpu, cuda or cuda:N. The float32 reference runs on the CPU.")
@click.option("--strict", is_flag=True, help="A requested backend that cannot be checked (missing, stale) is an error.")
@click.option("--force", is_flag=True, help="Overwrite --report.")
def check_cmd(backends, model, export_dir, engines_dir, images, voc_root, synthetic, max_tiles, batch_size, thresholds, report, disagreement_dir, device, strict, force) -> None:
    """Parity of each backend against the float32 PyTorch reference, on the same tiles."""
    from fcn_deploy.parity.check import check

    check(backends, model=model, export_dir=export_dir, engines_dir=engines_dir, images=images, voc_root=voc_root,
          synthetic=synthetic, thresholds=list(thresholds), report=report, disagreement_dir=disagreement_dir,
          strict=strict, batch_size=batch_size, max_tiles=max_tiles, device=device, force=force,
          echo=click.echo, progress=_show_progress())


@cli.command("evaluate")
@click.option("--voc-root", required=True, type=click.Path(), help="VOCdevkit/VOC2012 folder (or a folder holding VOCdevkit/).")
@click.option("--split", default="val", show_default=True, help="ImageSets/Segmentation/<split>.txt")
@click.option("--backend", type=click.Choice(BACKENDS), default="ort", show_default=True)
@click.option("--model", type=click.Path(dir_okay=False), help="Artifact (default: the chain in export/, engines/, model.pt).")
@click.option("--device", default="auto", show_default=True, help="auto (CUDA when a GPU and the backend's GPU runtime are present, else CPU; the choice is printed), cpu, cuda or cuda:N.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True, help="Tiles per call.")
@click.option("--overlap", type=click.IntRange(min=0), help="Minimum tile overlap in pixels (default: the infer default).")
@click.option("--max-images", type=click.IntRange(min=1), help="Only the first N images of the split.")
@click.option("--report", type=click.Path(dir_okay=False), help="Write the results as JSON.")
@click.option("--grid", type=click.Path(dir_okay=False), help="Write a prediction grid PNG (photo / prediction / label).")
@click.option("--force", is_flag=True, help="Overwrite --report and --grid.")
@_ray_options
def evaluate_cmd(voc_root, split, backend, model, device, batch_size, overlap, max_images, report, grid, force,
                 ray_address, ray_workers, ray_gpus_per_worker, ray_cpus_per_worker) -> None:
    """Pixel accuracy, class accuracy, per-class IoU and mIoU of whole images (tiled inference)."""
    from fcn_deploy.evaluate import evaluate

    evaluate(voc_root, split=split, backend=backend, model=model, device=device, batch_size=batch_size,
             overlap=overlap, report=report, grid=grid, max_images=max_images, force=force, echo=click.echo,
             progress=_show_progress(), ray=ray_address, ray_options={"ray_workers": ray_workers, "gpus_per_worker": ray_gpus_per_worker,
                                                          "cpus_per_worker": ray_cpus_per_worker})


@cli.command("bench")
@click.option("--backend", "backends", type=click.Choice(BACKENDS), multiple=True, default=("ort",), show_default=True, help="Repeat to compare backends side by side (default artifacts, calls interleaved), e.g. --backend ort --backend ort-int8.")
@click.option("--model", type=click.Path(dir_okay=False), help="Artifact (default: the chain in export/, engines/, model.pt).")
@click.option("--batch-sizes", default="1,8,32", show_default=True, help="Comma-separated tiles per call.")
@click.option("--warmup", type=click.IntRange(min=0), default=3, show_default=True)
@click.option("--iterations", type=click.IntRange(min=1), default=20, show_default=True, help="Timed calls per batch size (fewer once --max-seconds have passed, at least 3).")
@click.option("--max-seconds", type=click.FloatRange(min=0), default=5.0, show_default=True, help="Stop a batch size's timed runs after this long.")
@click.option("--device", default="auto", show_default=True, help="auto (CUDA when a GPU and the backend's GPU runtime are present, else CPU; the choice is printed), cpu, cuda or cuda:N.")
@click.option("--precision", type=click.Choice(["fp32", "fp16"]), default=None, help="torch/trt precision (ort: the ONNX decides).")
@click.option("--images", type=click.Path(file_okay=False), help="Also time the whole infer pipeline on this folder.")
@click.option("--decode", type=click.Choice(["cpu", "gpu"]), default="cpu", show_default=True, help="With --images: as infer --decode.")
@click.option("--report", type=click.Path(dir_okay=False), help="Write the results as JSON.")
@click.option("--force", is_flag=True, help="Overwrite --report.")
def bench_cmd(backends, model, batch_sizes, warmup, iterations, max_seconds, device, precision, images, decode, report, force) -> None:
    """Latency (min/p50/p90/p99) and throughput (tiles/s) per batch size, of one backend or of
    several side by side."""
    from fcn_deploy.bench import bench, bench_compare, parse_batch_sizes

    sizes = parse_batch_sizes(batch_sizes)
    if len(set(backends)) > 1:
        for name, value in (("--model", model), ("--images", images)):
            if value is not None:
                raise click.UsageError(f"{name} applies to one --backend; compare backends on their default artifacts")
        bench_compare(backends, batch_sizes=sizes, warmup=warmup, iterations=iterations, max_seconds=max_seconds,
                      device=device, precision=precision, report=report, force=force, echo=click.echo)
        return
    bench(backends[0], model, batch_sizes=sizes, warmup=warmup, iterations=iterations,
          max_seconds=max_seconds, device=device, precision=precision, images=images, decode=decode,
          report=report, force=force, echo=click.echo)


# --- demo (fcn_deploy.demo) -----------------------------------------------------------------
# [cli:demo]
@cli.command("demo")
@click.option("--workdir", default="demo-work", show_default=True, type=click.Path(file_okay=False), help="Folder for every artifact and picture.")
@click.option("--num-images", type=click.IntRange(min=4), default=32, show_default=True, help="Synthetic images written.")
@click.option("--epochs", type=click.IntRange(min=1), default=8, show_default=True, help="Training epochs (CPU, crop 160x224).")
@click.option("--force", is_flag=True, help="Use a non-empty --workdir the demo did not write.")
def demo_cmd(workdir, num_images, epochs, force) -> None:
    """The whole pipeline offline on the CPU: data, train, export, engine, infer, check, evaluate."""
    from fcn_deploy.demo import DemoSettings, run_demo

    run_demo(workdir, DemoSettings(num_images=num_images, epochs=epochs), force=force, echo=click.echo)


def main() -> None:
    warnings.formatwarning = _one_line_warning
    cli(prog_name="fcn-deploy")


if __name__ == "__main__":
    main()
