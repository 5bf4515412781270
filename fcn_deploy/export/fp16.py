"""FP16 conversion of an fp32 fcn-deploy ONNX, its typing check and its verification.

onnxconverter-common's ``convert_float_to_float16(keep_io_types=True)``: a strongly typed graph
(float16 weights and activations, Cast nodes after ``image`` and before ``logits``), which is what
TensorRT 11 / TensorRT-RTX build FP16 engines from. NVIDIA ModelOpt AutoCast would pull
onnxruntime-gpu (a second onnxruntime distribution), an older onnx and CuPy.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from fcn_deploy.artifacts import embed_meta, load_onnx, meta_from_model, onnx_io, parent_ref
from fcn_deploy.chain import fp16_onnx_path
from fcn_deploy.errors import ExportError, UsageError
from fcn_deploy.export.graph import FP16_MAX, FP16_TINY, check_graph
from fcn_deploy.export.writing import check_outputs, package_version, quiet, write_artifact
from fcn_deploy.export.verify import run_onnx, verification_plan, verification_tiles, verify_logits

#: Nodes kept in float32 by default in the FP16 model: none. Measured on the random-weight FCN, 16
#: tiles (uniform and smooth noise), agreement with the fp32 ONNX: all FP16 99.9125%; first conv,
#: final 1x1 conv, ConvTranspose, final conv + ConvTranspose, all three kept fp32: 99.9119, 99.9110,
#: 99.9126, 99.9112, 99.9106% -- noise (+-50 of 2.46M pixels). Keeping the ConvTranspose lowers the
#: mean abs diff 0.00121 -> 0.00115 only, and it is the op TensorRT gains most from in FP16.
DEFAULT_KEEP_FP32: tuple[str, ...] = ()




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
    ONNX on onnxruntime CPU (itself verified against PyTorch fp32 within 1e-3 on export), with
    ``check``'s fp16 thresholds (docs/architecture.md, "Precision and parity policy").
    """
    from onnxconverter_common import float16

    output, sidecar = check_outputs(output or fp16_onnx_path(onnx_path), force)
    fp32 = load_onnx(onnx_path)
    meta = meta_from_model(fp32, str(onnx_path))
    if meta.get("precision") != "fp32":
        raise UsageError(f"{onnx_path} has precision {meta.get('precision')!r}; convert an fp32 ONNX")
    keep = resolve_nodes(fp32, DEFAULT_KEEP_FP32 if keep_fp32 is None else keep_fp32)
    with quiet():
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
        exporter=f"{meta.get('exporter', 'unknown exporter')}; onnxconverter-common {package_version('onnxconverter-common')} "
        "float16.convert_float_to_float16(keep_io_types=True)",
        keep_fp32=keep,
        io=onnx_io(fp16),
        verification=None,
    )
    if verify:
        meta["verification"] = verify_fp16(fp16, fp32)
    embed_meta(fp16, meta)
    write_artifact(fp16, meta, output, sidecar)
    return output


def verify_fp16(fp16_model, fp32_model) -> dict[str, Any]:
    """onnxruntime CPU run of the FP16 model against the fp32 model (an fcn-deploy ONNX: its
    metadata gives tile size, normalisation and batch) on :func:`verification_tiles`; raise
    :class:`VerificationError` beyond the fp16 thresholds."""
    meta = meta_from_model(fp32_model)
    io_batch = meta["io"]["inputs"][0]["shape"][0]
    n_tiles, batch = verification_plan(None if io_batch < 0 else io_batch)
    tiles = verification_tiles(n_tiles, *meta["tile_hw"], meta["mean"], meta["std"])
    return verify_logits(run_onnx(fp32_model, tiles, batch), run_onnx(fp16_model, tiles, batch),
                         what="ONNX fp16 vs ONNX fp32", precision="fp16")


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


def resolve_nodes(model, names_or_ops: Sequence[str]) -> list[str]:
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
