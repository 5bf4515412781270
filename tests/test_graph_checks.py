"""Graph checks of fcn_deploy/export/graph.py on small hand-built ONNX graphs (no export, fast):
image (N, 3, 64, 64) -> Conv 32x32 stride 32 -> ConvTranspose 64/32/16 -> logits (N, K, 64, 64),
and one change at a time that each check must reject."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from fcn_deploy.errors import ExportError
from fcn_deploy.export.graph import check_graph

K, H, W = 2, 64, 64
CONVT_ATTRS = {"kernel_shape": [64, 64], "strides": [32, 32], "pads": [16, 16, 16, 16]}


def _weights(dtype=np.float32):
    rng = np.random.default_rng(0)
    conv_w = rng.standard_normal((K, 3, 32, 32)).astype(np.float32).astype(dtype)
    convt_w = rng.standard_normal((K, K, 64, 64)).astype(np.float32).astype(dtype)
    return conv_w, convt_w


def _model(*, convt_attrs=None, extra_nodes=(), extra_inits=(), fp16=False, batch="batch",
           input_name="image", output_name="logits", in_channels=3, out_dtype=TensorProto.FLOAT,
           weight_as_input=False, last="logits_raw"):
    """The small FCN-like graph; ``extra_nodes`` go after the ConvTranspose (which writes
    ``logits_raw``), ``last`` is the tensor copied to the output by an Identity."""
    conv_w, convt_w = _weights(np.float16 if fp16 else np.float32)
    inits = [numpy_helper.from_array(conv_w, "conv_w"), *extra_inits]
    if not weight_as_input:
        inits.append(numpy_helper.from_array(convt_w, "convt_w"))
    nodes = []
    x = input_name
    if fp16:
        nodes.append(helper.make_node("Cast", [x], ["x16"], to=TensorProto.FLOAT16))
        x = "x16"
    nodes.append(helper.make_node("Conv", [x, "conv_w"], ["score"], kernel_shape=[32, 32], strides=[32, 32]))
    attrs = dict(CONVT_ATTRS) if convt_attrs is None else convt_attrs
    convt_out = "up16" if fp16 else "logits_raw"
    nodes.append(helper.make_node("ConvTranspose", ["score", "convt_w"], [convt_out], name="upsample", **attrs))
    if fp16:
        nodes.append(helper.make_node("Cast", ["up16"], ["logits_raw"], to=TensorProto.FLOAT))
    nodes.extend(extra_nodes)
    nodes.append(helper.make_node("Identity", [last], [output_name]))
    inputs = [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, [batch, in_channels, H, W])]
    if weight_as_input:
        inputs.append(helper.make_tensor_value_info("convt_w", TensorProto.FLOAT, [K, K, 64, 64]))
    outputs = [helper.make_tensor_value_info(output_name, out_dtype, [batch, K, H, W])]
    graph = helper.make_graph(nodes, "fcn", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _check(model, **kw):
    args = {"height": H, "width": W, "num_classes": K, **kw}
    check_graph(model, **args)


def test_the_small_fcn_passes_with_and_without_its_weight():
    model = _model()
    onnx.checker.check_model(model, full_check=True)
    _check(model, transpose_weight=_weights()[1])
    _check(model)
    _check(_model(batch=4), transpose_weight=_weights()[1])  # a fixed batch passes too
    # attributes left at their defaults, or given with the default values, are the same
    _check(_model(convt_attrs={**CONVT_ATTRS, "group": 1, "output_padding": [0, 0], "dilations": [1, 1],
                               "auto_pad": "NOTSET"}))


def test_a_resize_beside_the_one_convtranspose_is_rejected():
    """Issue 14: the check accepted an extra upsampling node next to the ConvTranspose."""
    scales = numpy_helper.from_array(np.ones(4, np.float32), "scales")
    resize = helper.make_node("Resize", ["logits_raw", "", "scales"], ["resized"], mode="nearest")
    model = _model(extra_nodes=[resize], extra_inits=[scales], last="resized")
    onnx.checker.check_model(model, full_check=True)  # a valid graph with the right output shape
    with pytest.raises(ExportError, match=r"^graph check 'ConvTranspose' failed: expected exactly one "
                                          r"ConvTranspose and no Resize/Upsample, found 1 ConvTranspose "
                                          r"and 1 Resize/Upsample$"):
        _check(model)


def test_a_second_convtranspose_or_none_is_rejected():
    w2 = numpy_helper.from_array(np.zeros((K, K, 1, 1), np.float32), "w2")
    second = helper.make_node("ConvTranspose", ["logits_raw", "w2"], ["again"], kernel_shape=[1, 1])
    with pytest.raises(ExportError, match="found 2 ConvTranspose and 0 Resize/Upsample"):
        _check(_model(extra_nodes=[second], extra_inits=[w2], last="again"))
    # the same shapes without a ConvTranspose: Conv 1x1 then Resize x32
    conv_w = numpy_helper.from_array(np.ones((K, 3, 32, 32), np.float32), "conv_w")
    scales = numpy_helper.from_array(np.array([1, 1, 32, 32], np.float32), "scales")
    nodes = [helper.make_node("Conv", ["image", "conv_w"], ["score"], kernel_shape=[32, 32], strides=[32, 32]),
             helper.make_node("Resize", ["score", "", "scales"], ["logits"], mode="linear")]
    graph = helper.make_graph(nodes, "fcn", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, H, W])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", K, H, W])],
                              [conv_w, scales])
    with pytest.raises(ExportError, match="found 0 ConvTranspose and 1 Resize/Upsample"):
        _check(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


@pytest.mark.parametrize("name, value, shown", [
    ("group", 2, "got 2, expected 1"),
    ("output_padding", [1, 1], r"got \[1, 1\], expected \[0, 0\]"),
    ("dilations", [2, 2], r"got \[2, 2\], expected \[1, 1\]"),
    ("auto_pad", "SAME_UPPER", "got b'SAME_UPPER', expected b'NOTSET'"),
    ("kernel_shape", [64, 63], r"got \[64, 63\], expected \[64, 64\]"),
    ("strides", [32, 16], r"got \[32, 16\], expected \[32, 32\]"),
    ("pads", [16, 16, 16, 15], r"got \[16, 16, 16, 15\], expected \[16, 16, 16, 16\]"),
])
def test_each_convtranspose_attribute_is_checked(name, value, shown):
    from fcn_deploy.export.graph import _check_transpose_conv

    model = _model(convt_attrs={**CONVT_ATTRS, name: value})
    with pytest.raises(ExportError, match=rf"^graph check 'ConvTranspose {name}' failed: {shown}$"):
        _check_transpose_conv(model, K, None)  # the attribute check alone (shapes may differ)


def test_a_missing_attribute_is_reported_as_none():
    from fcn_deploy.export.graph import _check_transpose_conv

    attrs = dict(CONVT_ATTRS)
    del attrs["strides"]
    with pytest.raises(ExportError, match=r"'ConvTranspose strides' failed: got None, expected \[32, 32\]"):
        _check_transpose_conv(_model(convt_attrs=attrs), K, None)


def test_output_shape_attribute_and_a_weight_that_is_no_initializer_are_rejected():
    from fcn_deploy.export.graph import _check_transpose_conv

    with pytest.raises(ExportError, match="^graph check 'ConvTranspose output_shape' failed: attribute must be absent$"):
        _check_transpose_conv(_model(convt_attrs={**CONVT_ATTRS, "output_shape": [H, W]}), K, None)
    with pytest.raises(ExportError, match="^graph check 'ConvTranspose weight' failed: weight is not an initializer$"):
        _check_transpose_conv(_model(weight_as_input=True), K, None)
    bare = _model()
    del bare.graph.node[1].input[1:]  # a ConvTranspose with one input
    with pytest.raises(ExportError, match="weight is not an initializer"):
        _check_transpose_conv(bare, K, None)
    with pytest.raises(ExportError, match=r"^graph check 'ConvTranspose weight' failed: shape \(2, 2, 64, 64\), "
                                          r"expected \(3, 3, 64, 64\)$"):
        _check_transpose_conv(_model(), 3, None)


def test_the_weight_must_equal_the_checkpoint_s():
    ref = _weights()[1].copy()
    _check(_model(), transpose_weight=ref.astype(np.float64))  # any float dtype of the same values
    ref[1, 1, 63, 63] += 0.5  # one value, the last one
    with pytest.raises(ExportError, match=r"^graph check 'ConvTranspose weight' failed: differs from the "
                                          r"checkpoint's \(max abs 0.5\)$"):
        _check(_model(), transpose_weight=ref)


def test_fp16_weight_within_float16_rounding_passes():
    ref32 = _weights()[1]
    model = _model(fp16=True)  # its ConvTranspose weight is _weights(float16): ref32 rounded
    assert model.graph.initializer[1].data_type == TensorProto.FLOAT16
    _check(model, transpose_weight=ref32)
    tiny = ref32.copy()
    tiny[0, 0, 0, 0] = 2.0 ** -26  # under FP16_TINY: the converter lifts it, within the tolerance
    init = numpy_helper.to_array(model.graph.initializer[1]).copy()
    init[0, 0, 0, 0] = np.float16(2.0 ** -24)
    model.graph.initializer[1].CopyFrom(numpy_helper.from_array(init, "convt_w"))
    _check(model, transpose_weight=tiny)
    off = ref32.copy()
    off[1, 1, 5, 5] += 0.01  # more than float16 rounding of a value near 1
    with pytest.raises(ExportError, match="differs from the checkpoint's"):
        _check(model, transpose_weight=off)


def test_io_names_dtype_and_shapes_are_checked():
    with pytest.raises(ExportError, match=r"^graph check 'io names' failed: got \(\['x'\], \['logits'\]\), "
                                          r"expected \(\['image'\], \['logits'\]\)$"):
        _check(_model(input_name="x"))
    with pytest.raises(ExportError, match=r"got \(\['image'\], \['out'\]\)"):
        _check(_model(output_name="out"))
    with pytest.raises(ExportError, match=r"^graph check 'input shape' failed: image is float32 \[-1, 3, 64, 64\], "
                                          r"expected float32 \[N, 3, 32, 64\]$"):
        _check(_model(), height=32)
    with pytest.raises(ExportError, match=r"expected float32 \[N, 3, 64, 48\]$"):
        _check(_model(), width=48)
    with pytest.raises(ExportError, match=r"^graph check 'output shape' failed: inferred logits float32 "
                                          r"\[-1, 2, 64, 64\], expected float32 \[-1, 3, 64, 64\]$"):
        _check(_model(), num_classes=3)


def test_declared_output_must_be_float32_and_the_expected_shape():
    model = _model()
    model.graph.output[0].type.tensor_type.elem_type = TensorProto.DOUBLE
    with pytest.raises(ExportError, match=r"^graph check 'onnx.checker' failed: .*differs from existing elem type"):
        _check(model)
    fixed = _model()  # a fixed batch declared on the output of a dynamic-batch graph
    fixed.graph.output[0].type.tensor_type.shape.dim[0].dim_value = 4
    with pytest.raises(ExportError, match=r"^graph check 'output shape' failed: declared logits float32 "
                                          r"\[4, 2, 64, 64\], expected float32 \[-1, 2, 64, 64\]$"):
        _check(fixed)


def test_checker_failure_names_the_check_and_its_reason():
    model = _model()
    model.graph.node[0].input[0] = "no_such_tensor"
    with pytest.raises(ExportError, match="^graph check 'onnx.checker' failed: .*'no_such_tensor'"):
        _check(model)


def test_the_full_checker_runs_shape_inference():
    """A recorded intermediate shape that contradicts the graph passes the plain checker only."""
    model = _model()
    model.graph.value_info.append(helper.make_tensor_value_info("score", TensorProto.FLOAT, ["batch", K, 3, 3]))
    onnx.checker.check_model(model)
    with pytest.raises(ExportError, match=r"^graph check 'onnx.checker' failed: .*Inferred shape and existing shape differ"):
        _check(model)


def test_an_upsample_beside_the_convtranspose_is_rejected():
    scales = numpy_helper.from_array(np.ones(4, np.float32), "scales")
    up = helper.make_node("Upsample", ["logits_raw", "scales"], ["up"], mode="nearest")
    model = _model(extra_nodes=[up], extra_inits=[scales], last="up")
    model.opset_import[0].version = 9  # Upsample's last opset
    onnx.checker.check_model(model, full_check=True)
    with pytest.raises(ExportError, match="found 1 ConvTranspose and 1 Resize/Upsample"):
        _check(model)


def test_the_check_leaves_the_model_unchanged():
    model = _model()
    before = model.SerializeToString()
    _check(model, transpose_weight=_weights()[1])
    assert model.SerializeToString() == before
    assert [d.dim_value for d in model.graph.output[0].type.tensor_type.shape.dim][1:] == [K, H, W]


def test_a_float64_reference_is_compared_at_float32():
    ref = _weights()[1].astype(np.float64) + 1e-12  # the same float32 values once rounded
    _check(_model(), transpose_weight=ref)
