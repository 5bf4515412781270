"""ONNX export of the FCN with PyTorch: ``export_onnx`` (graph checks, verification, metadata,
atomic write) and ``export_artifacts`` (``fcn-deploy export``: the fp32 ONNX, then its FP16 child).

Exporter: ``torch.onnx.export(dynamo=True)`` (torch.export-based). The TorchScript exporter
(``dynamo=False``) produces an equally valid graph here (one ConvTranspose, dynamic batch) but is
deprecated since torch 2.9 and warns that it will be removed; the dynamo exporter writes opset 18
natively and a graph without Identity nodes. Its default of writing weights as external data is
avoided: the in-memory ``ModelProto`` is saved as one self-contained file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from fcn_deploy.artifacts import (
    checkpoint_artifact_meta,
    embed_meta,
    onnx_io,
    parent_ref,
    read_artifact_meta,
    sidecar_path,
)
from fcn_deploy.chain import fp16_onnx_path
from fcn_deploy.errors import ExportError, UsageError, first_line
from fcn_deploy.export.graph import BATCH_DIM, INPUT_NAME, OUTPUT_NAME, check_graph
from fcn_deploy.export.verify import verification_plan, verification_tiles, verify_onnx
from fcn_deploy.export.writing import check_outputs, package_version, quiet, write_artifact
from fcn_deploy.outpaths import check_distinct_paths

#: Default opset: the torch.export-based exporter's native opset (no version conversion), parsed by
#: TensorRT 10.x/11.x (max opset 20-25), TensorRT-RTX 1.x and onnxruntime >= 1.14.
DEFAULT_OPSET = 18
#: Lowest opset the exporter's version conversion reaches for this graph (below: no adapter).
MIN_OPSET = 16
#: Name of the dynamic batch dimension in the ONNX graph.


@dataclass
class ExportReport:
    """What :func:`export_onnx` wrote: paths, the embedded metadata and the verification metrics
    (:func:`fcn_deploy.parity.metrics.compare_logits`: ``max_abs``, ``agreement`` in %, ``tiles``,
    ...) or None."""

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
                f"{v['max_abs']:.3g}, mean abs {v['mean_abs']:.3g}, argmax agreement {v['agreement']:.4f}%"
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
    outputs = {"-o": output, "its sidecar": sidecar_path(output)}
    if fp16:
        outputs.update({"the FP16 ONNX": fp16_onnx_path(output), "the FP16 sidecar": sidecar_path(fp16_onnx_path(output))})
    check_distinct_paths(outputs, {"the checkpoint": checkpoint})
    check_outputs(output, force)
    if fp16:
        check_outputs(fp16_onnx_path(output), force)
    if fp16 and keep_fp32:
        # --keep-fp32 names nodes of the exported graph: resolve them before anything is written
        from fcn_deploy.export.fp16 import resolve_nodes

        _check_export_args(height, width, batch, opset)
        out, sidecar = check_outputs(output, force)
        proto, meta = _export_proto(checkpoint, height, width, batch, opset, verify)
        resolve_nodes(proto, keep_fp32)
        write_artifact(proto, meta, out, sidecar)
        reports = [ExportReport(out, sidecar, meta, meta["verification"])]
    else:
        reports = [export_onnx(checkpoint, output, height=height, width=width, batch=batch, opset=opset,
                               force=force, verify=verify)]
    if fp16:
        from fcn_deploy.export.fp16 import convert_fp16

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
    _check_export_args(height, width, batch, opset)
    output, sidecar = check_outputs(output, force)
    proto, meta = _export_proto(checkpoint, height, width, batch, opset, verify)
    write_artifact(proto, meta, output, sidecar)
    return ExportReport(output, sidecar, meta, meta["verification"])


def _export_proto(checkpoint, height: int, width: int, batch: int | None, opset: int, verify: bool):
    """The checked (and unless ``verify`` is False, verified) ``onnx.ModelProto`` of a checkpoint
    with its metadata embedded, and that metadata; nothing written."""
    import torch

    from fcn_deploy.model import load_checkpoint

    model, ckpt_meta = load_checkpoint(checkpoint)
    proto = _torch_export(model, height, width, batch, opset)
    weight = model.transpose_conv.weight.detach().numpy()
    check_graph(proto, height=height, width=width, num_classes=model.num_classes, transpose_weight=weight)
    meta = checkpoint_artifact_meta(ckpt_meta, tile_hw=(height, width), parent=parent_ref(checkpoint))
    meta.update(
        precision="fp32",
        io=onnx_io(proto),
        opset=opset,
        exporter=f"torch.onnx.export(dynamo=True), torch {torch.__version__}, onnxscript {package_version('onnxscript')}",
        verification=None,
    )
    if verify:
        n_tiles, run_batch = verification_plan(batch)
        tiles = verification_tiles(n_tiles, height, width, meta["mean"], meta["std"])
        meta["verification"] = verify_onnx(proto, model, tiles, batch=run_batch)
    embed_meta(proto, meta)
    return proto, meta


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


def _torch_export(model, height: int, width: int, batch: int | None, opset: int):
    """Run the torch.export-based exporter; return the ``onnx.ModelProto`` (weights inside)."""
    import torch

    # Example batch 2 for a dynamic batch: torch.export specialises sizes 0 and 1.
    example = torch.zeros(batch or 2, 3, height, width)
    dynamic = None if batch else ({0: torch.export.Dim(BATCH_DIM)},)
    try:
        with quiet():
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
