"""Graph checks of an exported FCN (``onnx.ModelProto``): the ONNX checker, IO names and shapes,
and the single transposed convolution that does the 32x upsampling."""

from __future__ import annotations

import copy

import numpy as np

from fcn_deploy.artifacts import onnx_io
from fcn_deploy.errors import ExportError, first_line

#: Smallest positive float16 (subnormal) and largest finite float16: the FP16 converter's
#: clamping bounds (:mod:`fcn_deploy.export.fp16`), so weights are only rounded, never lifted
#: to its default 1e-7 floor or clipped at 1e4; the weight check below allows for the first.
FP16_TINY = 2.0 ** -24
FP16_MAX = 65504.0

#: Name of the dynamic batch dimension in the ONNX graph.
BATCH_DIM = "batch"
INPUT_NAME, OUTPUT_NAME = "image", "logits"
#: Kernel, stride and padding of the FCN's transposed convolution (docs/architecture.md).
CONVT_KERNEL, CONVT_STRIDE, CONVT_PAD = 64, 32, 16


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


