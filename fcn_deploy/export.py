"""ONNX export of the FCN, graph checks, verification against PyTorch, FP16 conversion.

* Exporter: ``torch.onnx.export(dynamo=True)`` (torch.export-based). The TorchScript exporter
  (``dynamo=False``) produces an equally valid graph here (one ConvTranspose, dynamic batch) but is
  deprecated since torch 2.9 and warns that it will be removed; the dynamo exporter writes opset 18
  natively and a graph without Identity nodes. Its default of writing weights as external data is
  avoided: the in-memory ``ModelProto`` is saved as one self-contained file.
* FP16: onnxconverter-common's ``convert_float_to_float16(keep_io_types=True)``: a strongly typed
  graph (float16 weights and activations, Cast nodes after ``image`` and before ``logits``), which
  is what TensorRT 11 / TensorRT-RTX build FP16 engines from. NVIDIA ModelOpt AutoCast would pull
  onnxruntime-gpu (clashing with the CPU onnxruntime), an older onnx and CuPy.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from fcn_deploy.artifacts import (
    checkpoint_artifact_meta,
    embed_meta,
    load_onnx,
    meta_from_model,
    onnx_io,
    parent_ref,
    read_artifact_meta,
    sidecar_path,
)
from fcn_deploy.errors import ExportError, UsageError, VerificationError, first_line
from fcn_deploy.fileio import atomic_path, check_writable, write_json_atomic

__all__ = [
    "DEFAULT_OPSET", "ExportReport", "export_artifacts", "export_onnx", "check_graph", "verify_onnx", "convert_fp16",
    "verify_fp16", "check_fp16_typing", "read_artifact_meta", "fp16_output_path",
]

#: Default opset: the torch.export-based exporter's native opset (no version conversion), parsed by
#: TensorRT 10.x/11.x (max opset 20-25), TensorRT-RTX 1.x and onnxruntime >= 1.14.
DEFAULT_OPSET = 18
#: Lowest opset the exporter's version conversion reaches for this graph (below: no adapter).
MIN_OPSET = 16
#: Name of the dynamic batch dimension in the ONNX graph.
BATCH_DIM = "batch"
INPUT_NAME, OUTPUT_NAME = "image", "logits"
#: DESIGN.md thresholds. Agreement is a fraction of pixels in [0, 1].
FP32_MIN_AGREEMENT, FP32_MAX_ABS = 0.9999, 1e-3
FP16_MIN_AGREEMENT = 0.995
#: Nodes kept in float32 by default in the FP16 model: none. Measured on the random-weight FCN, 16
#: tiles (uniform and smooth noise), agreement with the fp32 ONNX: all FP16 99.9125%; first conv,
#: final 1x1 conv, ConvTranspose, final conv + ConvTranspose, all three kept fp32: 99.9119, 99.9110,
#: 99.9126, 99.9112, 99.9106% -- noise (+-50 of 2.46M pixels). Keeping the ConvTranspose lowers the
#: mean abs diff 0.00121 -> 0.00115 only, and it is the op TensorRT gains most from in FP16.
DEFAULT_KEEP_FP32: tuple[str, ...] = ()
#: Kernel, stride and padding of the FCN's transposed convolution (DESIGN.md).
CONVT_KERNEL, CONVT_STRIDE, CONVT_PAD = 64, 32, 16


@dataclass
class ExportReport:
    """What :func:`export_onnx` wrote: paths, the embedded metadata and verification metrics
    (``max_abs``, ``mean_abs``, ``argmax_agreement`` in [0, 1], ``tiles``) or None."""

    path: Path
    sidecar_path: Path
    meta: dict[str, Any]
    verification: dict[str, float] | None

    def summary(self) -> str:
        """Two lines for the CLI: what was written, and the verification numbers."""
        io_spec = self.meta["io"]
        shapes = " -> ".join(
            f"{t['name']} {t['dtype']} ({','.join('N' if d < 0 else str(d) for d in t['shape'])})"
            for t in io_spec["inputs"] + io_spec["outputs"]
        )
        size = self.path.stat().st_size / 2**20
        lines = [
            f"wrote {self.path} ({size:.1f} MiB, {self.meta['precision']}, opset {self.meta['opset']}, "
            f"{shapes}) and {self.sidecar_path.name}"
        ]
        v = self.verification
        if v is None:
            lines.append("  not verified (--no-verify)")
        else:
            reference = "PyTorch fp32" if self.meta["precision"] == "fp32" else "ONNX fp32"
            lines.append(
                f"  verified against {reference} on {v['tiles']} tiles (onnxruntime CPU): max abs "
                f"{v['max_abs']:.3g}, mean abs {v['mean_abs']:.3g}, argmax agreement {v['argmax_agreement']:.4%}"
            )
        return "\n".join(lines)


# -- export -----------------------------------------------------------------------------------
def export_artifacts(
    checkpoint: str | os.PathLike,
    output: str | os.PathLike = "export/fcn.onnx",
    *,
    height: int = 320,
    width: int = 480,
    batch: int | None = None,
    opset: int = DEFAULT_OPSET,
    fp16: bool = False,
    keep_fp32: Sequence[str] | None = None,
    force: bool = False,
    verify: bool = True,
) -> list[ExportReport]:
    """``fcn-deploy export``: :func:`export_onnx`, then with ``fp16`` :func:`convert_fp16` beside
    it (reports in that order). Every output is checked for ``force`` before anything is exported."""
    if keep_fp32 and not fp16:
        raise UsageError("--keep-fp32 only applies with --fp16")
    check_outputs(output, force)
    if fp16:
        check_outputs(fp16_output_path(output), force)
    reports = [
        export_onnx(checkpoint, output, height=height, width=width, batch=batch, opset=opset, force=force, verify=verify)
    ]
    if fp16:
        path = convert_fp16(reports[0].path, force=force, verify=verify, keep_fp32=keep_fp32 or None)
        meta = read_artifact_meta(path)
        reports.append(ExportReport(path, sidecar_path(path), meta, meta["verification"]))
    return reports


def export_onnx(
    checkpoint: str | os.PathLike,
    output: str | os.PathLike = "export/fcn.onnx",
    *,
    height: int = 320,
    width: int = 480,
    batch: int | None = None,
    opset: int = DEFAULT_OPSET,
    force: bool = False,
    verify: bool = True,
) -> ExportReport:
    """Export a checkpoint to ONNX: input ``image`` float32 (N, 3, height, width), output
    ``logits`` float32 (N, K, height, width), N dynamic ("batch") unless ``batch`` is given.

    Writes ``output`` and its JSON sidecar atomically, only after the graph checks and (unless
    ``verify`` is False) the verification against PyTorch passed.
    """
    import torch

    from fcn_deploy.model import load_checkpoint

    _check_export_args(height, width, batch, opset)
    output, sidecar = check_outputs(output, force)
    model, ckpt_meta = load_checkpoint(checkpoint)
    proto = _torch_export(model, height, width, batch, opset)
    weight = model.transpose_conv.weight.detach().numpy()
    check_graph(proto, height=height, width=width, num_classes=model.num_classes, transpose_weight=weight)
    meta = checkpoint_artifact_meta(ckpt_meta, tile_hw=(height, width), parent=parent_ref(checkpoint))
    meta.update(
        precision="fp32",
        io=onnx_io(proto),
        opset=opset,
        exporter=f"torch.onnx.export(dynamo=True), torch {torch.__version__}, onnxscript {_version('onnxscript')}",
        verification=None,
    )
    if verify:
        n_tiles, run_batch = _verification_plan(batch)
        tiles = verification_tiles(n_tiles, height, width, meta["mean"], meta["std"])
        meta["verification"] = verify_onnx(proto, model, tiles, batch=run_batch)
    embed_meta(proto, meta)
    _write_artifact(proto, meta, output, sidecar)
    return ExportReport(output, sidecar, meta, meta["verification"])


def _check_export_args(height: int, width: int, batch: int | None, opset: int) -> None:
    import onnx

    for name, value in (("--height", height), ("--width", width)):
        if value <= 0 or value % 32:
            raise UsageError(f"{name} {value} is not a positive multiple of 32 (the FCN's stride)")
    if batch is not None and batch < 1:
        raise UsageError(f"--batch {batch} must be at least 1 (omit it for a dynamic batch)")
    highest = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= opset <= highest:
        raise UsageError(
            f"--opset {opset} is not supported: the exporter writes opsets {MIN_OPSET}..{highest} "
            f"with the installed onnx {onnx.__version__}"
        )


def check_outputs(output: str | os.PathLike, force: bool) -> tuple[Path, Path]:
    """(ONNX path, sidecar path), refusing an existing one without ``force`` or a non-.onnx name."""
    output = Path(output)
    if output.suffix != ".onnx":
        raise UsageError(f"output {output} must end in .onnx (its sidecar is <stem>.json)")
    return check_writable(output, force), check_writable(sidecar_path(output), force)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporters' progress prints, warnings and log records."""
    names = ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript", "onnx_ir")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    sink = io.StringIO()
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _torch_export(model, height: int, width: int, batch: int | None, opset: int):
    """Run the torch.export-based exporter; return the ``onnx.ModelProto`` (weights inside)."""
    import torch

    # Example batch 2 for a dynamic batch: torch.export specialises sizes 0 and 1.
    example = torch.zeros(batch or 2, 3, height, width)
    dynamic = None if batch else ({0: torch.export.Dim(BATCH_DIM)},)
    try:
        with _quiet():
            program = torch.onnx.export(
                model, (example,), None, dynamo=True, opset_version=opset, verbose=False,
                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], dynamic_shapes=dynamic,
            )
            proto = program.model_proto
    except Exception as exc:  # the exporter raises many types; report its first line
        raise ExportError(f"torch.onnx.export failed: {first_line(exc)}") from None
    written = {o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")}
    if written != {opset}:
        raise ExportError(f"the exporter wrote opset {sorted(written)} instead of --opset {opset}")
    return proto


def _write_artifact(proto, meta: dict[str, Any], output: Path, sidecar: Path) -> None:
    """Save ``proto`` as one self-contained file (no external data) and its sidecar, atomically."""
    import onnx

    with atomic_path(output) as tmp:
        onnx.save_model(proto, tmp, save_as_external_data=False)
        write_json_atomic(sidecar, meta)


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


# -- graph checks -----------------------------------------------------------------------------
def check_graph(
    model,
    *,
    height: int,
    width: int,
    num_classes: int,
    transpose_weight: np.ndarray | None = None,
) -> None:
    """Check an exported FCN graph (an ``onnx.ModelProto``); raise :class:`ExportError` naming the
    first failed check.

    Checks: ``onnx.checker`` (full check); shape inference gives ``logits`` (N, num_classes,
    height, width) for ``image`` (N, 3, height, width); exactly one ConvTranspose (kernel 64x64,
    stride 32, pads 16, group 1, no output_padding, dilation 1) and no Resize/Upsample; its weight
    (num_classes, num_classes, 64, 64) equals ``transpose_weight`` (exactly for float32, within
    float16 rounding for float16).
    """
    import onnx

    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ExportError(f"graph check 'onnx.checker' failed: {first_line(exc)}") from None
    _check_io_shapes(model, height, width, num_classes)
    _check_transpose_conv(model, num_classes, transpose_weight)


def _check_io_shapes(model, height: int, width: int, num_classes: int) -> None:
    import onnx

    io_spec = onnx_io(model)
    names = ([t["name"] for t in io_spec["inputs"]], [t["name"] for t in io_spec["outputs"]])
    if names != ([INPUT_NAME], [OUTPUT_NAME]):
        raise ExportError(f"graph check 'io names' failed: got {names}, expected (['image'], ['logits'])")
    image = io_spec["inputs"][0]
    if image["dtype"] != "float32" or image["shape"][1:] != [3, height, width]:
        raise ExportError(
            f"graph check 'input shape' failed: image is {image['dtype']} {image['shape']}, "
            f"expected float32 [N, 3, {height}, {width}]"
        )
    stripped = copy.deepcopy(model)
    stripped.graph.output[0].type.tensor_type.ClearField("shape")
    try:
        inferred = onnx.shape_inference.infer_shapes(stripped, strict_mode=True)
    except onnx.shape_inference.InferenceError as exc:
        raise ExportError(f"graph check 'shape inference' failed: {first_line(exc)}") from None
    got = onnx_io(inferred)["outputs"][0]
    expected = [image["shape"][0], num_classes, height, width]
    declared = io_spec["outputs"][0]
    for what, spec in (("inferred", got), ("declared", declared)):
        if spec["shape"] != expected or spec["dtype"] != "float32":
            raise ExportError(
                f"graph check 'output shape' failed: {what} logits {spec['dtype']} {spec['shape']}, "
                f"expected float32 {expected}"
            )


def _check_transpose_conv(model, num_classes: int, weight_ref: np.ndarray | None) -> None:
    from onnx import helper, numpy_helper

    ops = [n.op_type for n in model.graph.node]
    resizes = [op for op in ops if op in ("Resize", "Upsample")]
    convts = [n for n in model.graph.node if n.op_type == "ConvTranspose"]
    if len(convts) != 1 or resizes:
        raise ExportError(
            f"graph check 'ConvTranspose' failed: expected exactly one ConvTranspose and no "
            f"Resize/Upsample, found {len(convts)} ConvTranspose and {len(resizes)} Resize/Upsample"
        )
    node = convts[0]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    k, s, p = CONVT_KERNEL, CONVT_STRIDE, CONVT_PAD
    wanted = {
        "kernel_shape": [k, k], "strides": [s, s], "pads": [p, p, p, p], "group": 1,
        "output_padding": [0, 0], "dilations": [1, 1], "auto_pad": b"NOTSET",
    }
    defaults = {"group": 1, "output_padding": [0, 0], "dilations": [1, 1], "auto_pad": b"NOTSET"}
    for name, value in wanted.items():
        got = attrs.get(name, defaults.get(name))
        if got != value:
            raise ExportError(f"graph check 'ConvTranspose {name}' failed: got {got}, expected {value}")
    if "output_shape" in attrs:
        raise ExportError("graph check 'ConvTranspose output_shape' failed: attribute must be absent")
    inits = {t.name: t for t in model.graph.initializer}
    if len(node.input) < 2 or node.input[1] not in inits:
        raise ExportError("graph check 'ConvTranspose weight' failed: weight is not an initializer")
    weight = numpy_helper.to_array(inits[node.input[1]])
    shape = (num_classes, num_classes, k, k)
    if weight.shape != shape:
        raise ExportError(f"graph check 'ConvTranspose weight' failed: shape {weight.shape}, expected {shape}")
    if weight_ref is not None:
        ref = np.asarray(weight_ref, dtype=np.float32)
        if weight.dtype == np.float16:
            # float16 rounding of the reference; the converter lifts |x| < FP16_TINY to FP16_TINY
            # (trained weights hold many such values after weight decay).
            same = np.allclose(weight.astype(np.float32), ref.astype(np.float16).astype(np.float32),
                               rtol=0, atol=FP16_TINY)
        else:
            same = np.array_equal(weight.astype(np.float32), ref)
        if not same:
            diff = float(np.abs(weight.astype(np.float32) - ref).max())
            raise ExportError(
                f"graph check 'ConvTranspose weight' failed: differs from the checkpoint's "
                f"(max abs {diff:.3g})"
            )


# -- verification -----------------------------------------------------------------------------
def _verification_plan(batch: int | None) -> tuple[int, int]:
    """(number of tiles, run batch): 3 tiles in batches of 2 and 1 for a dynamic batch (both
    sizes exercised), else one batch of the fixed size."""
    return (3, 2) if batch is None else (batch, batch)


def verification_tiles(
    n: int, height: int, width: int, mean: Sequence[float], std: Sequence[float], seed: int = 0
) -> np.ndarray:
    """``n`` normalised float32 tiles (n, 3, height, width): tile 0 uniform RGB noise, the others
    smooth image-like noise (random 1/16-resolution colours, bilinearly upsampled)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    rgb = np.empty((n, height, width, 3), dtype=np.float32)
    for i in range(n):
        if i == 0:
            rgb[i] = rng.random((height, width, 3), dtype=np.float32)
        else:
            small = rng.integers(0, 256, (max(height // 16, 1), max(width // 16, 1), 3), dtype=np.uint8)
            big = Image.fromarray(small).resize((width, height), Image.Resampling.BILINEAR)
            rgb[i] = np.asarray(big, dtype=np.float32) / 255.0
    tiles = (rgb - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(tiles.transpose(0, 3, 1, 2))


def compare_logits(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    """Max and mean absolute difference and argmax agreement (fraction of pixels, in [0, 1])
    between two (N, K, H, W) logit arrays."""
    ref, cand = reference.astype(np.float32), candidate.astype(np.float32)
    diff = np.abs(ref - cand)
    agreement = float(np.mean(ref.argmax(axis=1) == cand.argmax(axis=1)))
    return {
        "max_abs": float(diff.max()),
        "mean_abs": float(diff.mean()),
        "argmax_agreement": agreement,
        "tiles": int(ref.shape[0]),
    }


def check_thresholds(
    metrics: dict[str, float], *, what: str, min_agreement: float, max_abs: float | None = None
) -> None:
    """Raise :class:`VerificationError` naming every metric beyond its threshold and by how much
    (non-finite logits, NaN or float16 overflow, always fail)."""
    failures = []
    if metrics["argmax_agreement"] < min_agreement:
        short = (min_agreement - metrics["argmax_agreement"]) * 100
        failures.append(
            f"argmax agreement {metrics['argmax_agreement']:.4%} < {min_agreement:.2%} ({short:.4f} points short)"
        )
    if not np.isfinite(metrics["max_abs"]):
        failures.append(f"max abs diff is {metrics['max_abs']} (non-finite logits)")
    elif max_abs is not None and metrics["max_abs"] > max_abs:
        failures.append(
            f"max abs diff {metrics['max_abs']:.3g} > {max_abs:.3g} (by {metrics['max_abs'] - max_abs:.3g})"
        )
    if failures:
        raise VerificationError(f"{what} verification failed: " + "; ".join(failures))


def run_onnx(model, tiles: np.ndarray, batch: int) -> np.ndarray:
    """Run an ONNX model (``ModelProto``) on onnxruntime CPU in batches of ``batch``;
    returns the ``logits`` (N, K, H, W) as float32."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        out = [session.run([OUTPUT_NAME], {INPUT_NAME: tiles[i:i + batch]})[0] for i in range(0, len(tiles), batch)]
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ExportError(f"onnxruntime {ort.__version__} cannot run the model: {first_line(exc)}") from None
    return np.concatenate(out).astype(np.float32)


def verify_onnx(model, torch_model, tiles: np.ndarray, *, batch: int = 2) -> dict[str, float]:
    """onnxruntime (CPU) run of ``model`` against the float32 PyTorch ``torch_model`` on ``tiles``
    (float32 (N, 3, H, W)); raise :class:`VerificationError` beyond the FP32 thresholds."""
    import torch

    with torch.inference_mode():
        reference = np.concatenate(
            [torch_model(torch.from_numpy(tiles[i:i + batch])).numpy() for i in range(0, len(tiles), batch)]
        )
    metrics = compare_logits(reference, run_onnx(model, tiles, batch))
    check_thresholds(metrics, what="ONNX fp32 vs PyTorch fp32", min_agreement=FP32_MIN_AGREEMENT, max_abs=FP32_MAX_ABS)
    return metrics


# -- FP16 -------------------------------------------------------------------------------------
def fp16_output_path(onnx_path: str | os.PathLike) -> Path:
    """Default FP16 output beside the fp32 ONNX: ``export/fcn.onnx`` -> ``export/fcn.fp16.onnx``."""
    onnx_path = Path(onnx_path)
    return onnx_path.with_name(f"{onnx_path.stem}.fp16.onnx")


#: Smallest positive float16 (subnormal) and largest finite float16: the converter's clamping
#: bounds, so weights are only rounded, never lifted to its default 1e-7 floor or clipped at 1e4.
FP16_TINY = 2.0 ** -24
FP16_MAX = 65504.0


def convert_fp16(
    onnx_path: str | os.PathLike,
    output: str | os.PathLike | None = None,
    *,
    force: bool = False,
    verify: bool = True,
    keep_fp32: Sequence[str] | None = None,
) -> Path:
    """Write the strongly typed FP16 variant of an fp32 fcn-deploy ONNX (float32 ``image`` in,
    float32 ``logits`` out, float16 everywhere else) and its sidecar; return its path.

    ``keep_fp32``: op types (``"ConvTranspose"``) or node names to keep in float32 with float32
    weights (default :data:`DEFAULT_KEEP_FP32`). Verification: onnxruntime CPU against the fp32
    ONNX on onnxruntime CPU (itself verified against PyTorch fp32 within 1e-3 on export), FP16
    threshold of DESIGN.md.
    """
    from onnxconverter_common import float16

    output, sidecar = check_outputs(output or fp16_output_path(onnx_path), force)
    fp32 = load_onnx(onnx_path)
    meta = meta_from_model(fp32, str(onnx_path))
    if meta.get("precision") != "fp32":
        raise UsageError(f"{onnx_path} has precision {meta.get('precision')!r}; convert an fp32 ONNX")
    keep = _resolve_nodes(fp32, DEFAULT_KEEP_FP32 if keep_fp32 is None else keep_fp32)
    with _quiet():
        fp16 = float16.convert_float_to_float16(
            fp32, keep_io_types=True, node_block_list=keep,
            min_positive_val=FP16_TINY, max_finite_val=FP16_MAX,
        )
    _restore_fp32_nodes(fp16, fp32, keep)
    height, width = meta["tile_hw"]
    weight = _transpose_weight(fp32)
    check_graph(fp16, height=height, width=width, num_classes=meta["num_classes"], transpose_weight=weight)
    check_fp16_typing(fp16, keep)
    meta.update(
        precision="fp16",
        parent=parent_ref(onnx_path),
        exporter=f"{meta.get('exporter', 'unknown exporter')}; onnxconverter-common {_version('onnxconverter-common')} "
        "float16.convert_float_to_float16(keep_io_types=True)",
        keep_fp32=keep,
        io=onnx_io(fp16),
        verification=None,
    )
    if verify:
        meta["verification"] = verify_fp16(fp16, fp32)
    embed_meta(fp16, meta)
    _write_artifact(fp16, meta, output, sidecar)
    return output


def verify_fp16(fp16_model, fp32_model) -> dict[str, float]:
    """onnxruntime CPU run of the FP16 model against the fp32 model (an fcn-deploy ONNX: its
    metadata gives tile size, normalisation and batch) on :func:`verification_tiles`; raise
    :class:`VerificationError` below the FP16 agreement threshold."""
    meta = meta_from_model(fp32_model)
    io_batch = meta["io"]["inputs"][0]["shape"][0]
    n_tiles, batch = _verification_plan(None if io_batch < 0 else io_batch)
    tiles = verification_tiles(n_tiles, *meta["tile_hw"], meta["mean"], meta["std"])
    metrics = compare_logits(run_onnx(fp32_model, tiles, batch), run_onnx(fp16_model, tiles, batch))
    check_thresholds(metrics, what="ONNX fp16 vs ONNX fp32", min_agreement=FP16_MIN_AGREEMENT)
    return metrics


def check_fp16_typing(model, keep_fp32: Sequence[str] = ()) -> None:
    """Raise :class:`ExportError` unless the model is strongly typed FP16: float32 IO, and every
    Conv/ConvTranspose weight initializer float16 except for nodes in ``keep_fp32``."""
    from onnx import TensorProto

    io_spec = onnx_io(model)
    dtypes = [t["dtype"] for t in io_spec["inputs"] + io_spec["outputs"]]
    if dtypes != ["float32", "float32"]:
        raise ExportError(f"fp16 check 'float32 IO' failed: image/logits are {dtypes}")
    inits = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type in ("Conv", "ConvTranspose") and node.name not in keep_fp32:
            weight = inits.get(node.input[1])
            if weight is None or weight.data_type != TensorProto.FLOAT16:
                raise ExportError(f"fp16 check 'float16 weights' failed: {node.op_type} {node.name}")


def _resolve_nodes(model, names_or_ops: Sequence[str]) -> list[str]:
    """Node names for a list of op types or node names; unknown entries are a UsageError."""
    nodes = list(model.graph.node)
    resolved: list[str] = []
    for item in names_or_ops:
        matches = [n.name for n in nodes if item in (n.op_type, n.name)]
        if not matches:
            raise UsageError(f"--keep-fp32 {item}: no node or op type of that name in the graph")
        resolved += [m for m in matches if m not in resolved]
    return resolved


def _restore_fp32_nodes(fp16, fp32, keep: Sequence[str]) -> None:
    """Fix what ``convert_float_to_float16(node_block_list=...)`` leaves behind: the weights of a
    kept node were rounded to float16 and cast back (restore the float32 originals), and a kept
    node producing a graph output gets a Cast to float16 there (remove it: output stays float32)."""
    from onnx import TensorProto

    graph = fp16.graph
    originals = {t.name: t for t in fp32.graph.initializer}
    inits = {t.name: t for t in graph.initializer}
    outputs = {o.name: o for o in graph.output}
    uses: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    by_output = {out: node for node in graph.node for out in node.output}
    drop, restored = [], set()
    for node in graph.node:
        prefixes = tuple(f"{k}_{side}_cast" for k in keep for side in ("input", "output"))
        if node.op_type != "Cast" or not node.name.startswith(prefixes):
            continue
        src, dst = node.input[0], node.output[0]
        to = next(a.i for a in node.attribute if a.name == "to")
        if src in originals and uses[src] == 1:  # weight cast feeding a kept node
            inits[src].CopyFrom(originals[src])
            restored.add(src)
            for consumer in graph.node:
                consumer.input[:] = [src if x == dst else x for x in consumer.input]
            drop.append(node)
        elif dst in outputs and to == TensorProto.FLOAT16:  # cast to a float16 graph output
            producer = by_output[src]
            producer.output[:] = [dst if x == src else x for x in producer.output]
            outputs[dst].type.tensor_type.elem_type = TensorProto.FLOAT
            drop.append(node)
    for node in drop:
        graph.node.remove(node)
    for info in [v for v in graph.value_info if v.name in restored]:
        graph.value_info.remove(info)


def _transpose_weight(model) -> np.ndarray | None:
    """Weight of the (first) ConvTranspose, or None when there is none (check_graph reports it)."""
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "ConvTranspose" and len(node.input) > 1 and node.input[1] in inits:
            return numpy_helper.to_array(inits[node.input[1]])
    return None
