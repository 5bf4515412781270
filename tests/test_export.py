"""ONNX export (issue 3): graph checks and their negative cases, dynamic/fixed batch, metadata,
verification, the FP16 variant and the CLI's refusals. Exports happen three times in this file
(the session fixture, the CLI run at 64x96 with a fixed batch, the failed-export atomicity test)."""

from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from fcn_deploy.artifacts import META_KEY, embed_meta, read_artifact_meta, sidecar_path
from fcn_deploy.cli import cli
from fcn_deploy.errors import ArtifactExistsError, ArtifactNotFoundError, ArtifactReadError, ExportError, UsageError, VerificationError
from fcn_deploy.export.fp16 import check_fp16_typing, convert_fp16
from fcn_deploy.export.graph import check_graph
from fcn_deploy.export.torch_export import DEFAULT_OPSET, export_onnx
from fcn_deploy.export.verify import verification_tiles, verify_logits, verify_onnx
from fcn_deploy.parity.metrics import compare_logits
from fcn_deploy.parity.thresholds import DEFAULT_THRESHOLDS

FP32_MIN_AGREEMENT = DEFAULT_THRESHOLDS["fp32"]["agreement"]  # % of pixels
FP32_MAX_ABS = DEFAULT_THRESHOLDS["fp32"]["max_abs"]
FP16_MIN_AGREEMENT = DEFAULT_THRESHOLDS["fp16"]["agreement"]
from fcn_deploy.fileio import sha256_file
from fcn_deploy.model import FCN, load_checkpoint
from fcn_deploy.defaults import IMAGENET_MEAN, IMAGENET_STD, VOC_CLASSES, VOC_COLORMAP

H, W, K = 320, 480, len(VOC_CLASSES)


@pytest.fixture(scope="module")
def model(onnx_path) -> onnx.ModelProto:
    return onnx.load(onnx_path)


@pytest.fixture(scope="module")
def ckpt_weight(checkpoint_path) -> np.ndarray:
    net, _ = load_checkpoint(checkpoint_path)
    return net.transpose_conv.weight.detach().numpy()


def _session(model_or_path) -> ort.InferenceSession:
    data = model_or_path.SerializeToString() if isinstance(model_or_path, onnx.ModelProto) else str(model_or_path)
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"])


def _dims(value_info) -> list:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def _convt(model: onnx.ModelProto) -> onnx.NodeProto:
    (node,) = [n for n in model.graph.node if n.op_type == "ConvTranspose"]
    return node


# -- graph checks -----------------------------------------------------------------------------
def test_exported_graph_passes_checks(model, ckpt_weight):
    check_graph(model, height=H, width=W, num_classes=K, transpose_weight=ckpt_weight)
    assert [n.op_type for n in model.graph.node].count("ConvTranspose") == 1
    assert not {"Resize", "Upsample"} & {n.op_type for n in model.graph.node}
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [DEFAULT_OPSET]


def test_declared_io_names_shapes_and_dynamic_batch(model):
    (image,), (logits,) = model.graph.input, model.graph.output
    assert (image.name, logits.name) == ("image", "logits")
    assert image.type.tensor_type.elem_type == logits.type.tensor_type.elem_type == TensorProto.FLOAT
    assert _dims(image) == ["batch", 3, H, W]
    assert _dims(logits) == ["batch", K, H, W]


def test_onnx_is_one_self_contained_file(onnx_path, model):
    assert all(t.data_location == TensorProto.DEFAULT for t in model.graph.initializer)
    assert {p.name for p in onnx_path.parent.iterdir()} <= {"fcn.onnx", "fcn.json", "fcn.fp16.onnx", "fcn.fp16.json"}
    assert onnx_path.stat().st_size > 40e6  # ~45 MB of float32 weights inside


def test_dynamic_batch_runs_with_batch_1_and_3(onnx_path):
    session = _session(onnx_path)
    tiles = verification_tiles(3, H, W, IMAGENET_MEAN, IMAGENET_STD, seed=5)
    one = session.run(["logits"], {"image": tiles[:1]})[0]
    three = session.run(["logits"], {"image": tiles})[0]
    assert one.shape == (1, K, H, W) and three.shape == (3, K, H, W)
    assert one.dtype == np.float32
    np.testing.assert_allclose(one[0], three[0], atol=1e-4)


def _replace_convt_by_resize(model: onnx.ModelProto) -> onnx.ModelProto:
    bad = copy.deepcopy(model)
    node = _convt(bad)
    scales = numpy_helper.from_array(np.array([1, 1, 32, 32], dtype=np.float32), "up_scales")
    bad.graph.initializer.append(scales)
    resize = helper.make_node("Resize", [node.input[0], "", "up_scales"], list(node.output), mode="linear", name="up")
    index = list(bad.graph.node).index(node)
    bad.graph.node.remove(node)
    bad.graph.node.insert(index, resize)
    for name in node.input[1:]:
        bad.graph.initializer.remove(next(t for t in bad.graph.initializer if t.name == name))
    return bad


def test_convtranspose_replaced_by_resize_is_rejected(model, ckpt_weight):
    bad = _replace_convt_by_resize(model)
    onnx.checker.check_model(bad, full_check=True)  # a valid graph of the right output shape...
    assert _session(bad).run(None, {"image": np.zeros((1, 3, H, W), np.float32)})[0].shape == (1, K, H, W)
    with pytest.raises(ExportError, match="'ConvTranspose' failed.*found 0 ConvTranspose and 1 Resize"):
        check_graph(bad, height=H, width=W, num_classes=K, transpose_weight=ckpt_weight)  # ...but rejected


def test_wrong_convtranspose_weight_is_rejected(model, ckpt_weight):
    bad = copy.deepcopy(model)
    init = next(t for t in bad.graph.initializer if t.name == _convt(bad).input[1])
    weight = numpy_helper.to_array(init).copy()
    weight[0, 0, 31, 31] += 1e-3
    init.CopyFrom(numpy_helper.from_array(weight, init.name))
    with pytest.raises(ExportError, match="'ConvTranspose weight' failed: differs.*max abs 0.001"):
        check_graph(bad, height=H, width=W, num_classes=K, transpose_weight=ckpt_weight)
    check_graph(bad, height=H, width=W, num_classes=K)  # without a reference only the shape is checked


@pytest.mark.parametrize(
    "attrs, weight_slice, message",
    [
        # shape-preserving changes: only the ConvTranspose check catches them
        ({"group": 3}, np.s_[:, :7], "'ConvTranspose group' failed: got 3, expected 1"),
        ({"kernel_shape": [32, 32], "pads": [0, 0, 0, 0]}, np.s_[:, :, :32, :32], "'ConvTranspose kernel_shape' failed"),
        ({"pads": [16, 16, 17, 17], "output_padding": [1, 1]}, np.s_[:], "'ConvTranspose pads' failed"),
    ],
)
def test_changed_convtranspose_attributes_are_rejected(model, attrs, weight_slice, message):
    bad = _change_convt(model, attrs, weight_slice)
    assert _session(bad).run(None, {"image": np.zeros((1, 3, H, W), np.float32)})[0].shape == (1, K, H, W)
    with pytest.raises(ExportError, match=message):
        check_graph(bad, height=H, width=W, num_classes=K)


def test_shape_changing_convtranspose_is_caught_by_the_checker(model):
    bad = _change_convt(model, {"strides": [16, 16]}, np.s_[:])
    with pytest.raises(ExportError, match="'onnx.checker' failed.*ConvTranspose.*differ"):
        check_graph(bad, height=H, width=W, num_classes=K)


def _change_convt(model: onnx.ModelProto, attrs: dict, weight_slice) -> onnx.ModelProto:
    bad = copy.deepcopy(model)
    node = _convt(bad)
    kept = [a for a in node.attribute if a.name not in attrs]
    del node.attribute[:]
    node.attribute.extend([*kept, *(helper.make_attribute(k, v) for k, v in attrs.items())])
    init = next(t for t in bad.graph.initializer if t.name == node.input[1])
    weight = np.ascontiguousarray(numpy_helper.to_array(init)[weight_slice])
    init.CopyFrom(numpy_helper.from_array(weight, init.name))
    for info in [v for v in bad.graph.value_info if v.name == init.name]:
        bad.graph.value_info.remove(info)
    return bad


def test_declared_shape_must_match_tile_and_classes(model):
    with pytest.raises(ExportError, match=r"'input shape' failed.*expected float32 \[N, 3, 64, 480\]"):
        check_graph(model, height=64, width=W, num_classes=K)
    with pytest.raises(ExportError, match=r"'output shape' failed: inferred logits float32 \[-1, 21, 320, 480\], expected float32 \[-1, 20"):
        check_graph(model, height=H, width=W, num_classes=20)


def test_checker_failure_is_reported(model):
    bad = copy.deepcopy(model)
    bad.graph.node[0].input[0] = "no_such_tensor"
    with pytest.raises(ExportError, match="'onnx.checker' failed"):
        check_graph(bad, height=H, width=W, num_classes=K)


# -- metadata ---------------------------------------------------------------------------------
def test_metadata_round_trip(onnx_path, checkpoint_path, model):
    meta = read_artifact_meta(onnx_path)
    assert meta == json.loads(sidecar_path(onnx_path).read_text()) == read_artifact_meta(sidecar_path(onnx_path))
    assert sidecar_path(onnx_path).name == "fcn.json"
    assert meta["parent"] == {"path": str(checkpoint_path.resolve()), "sha256": sha256_file(checkpoint_path)}
    assert meta["classes"] == list(VOC_CLASSES) and meta["colormap"] == [list(c) for c in VOC_COLORMAP]
    assert meta["mean"] == pytest.approx(IMAGENET_MEAN) and meta["std"] == pytest.approx(IMAGENET_STD)
    assert (meta["tile_hw"], meta["num_classes"], meta["precision"], meta["opset"]) == ([H, W], K, "fp32", DEFAULT_OPSET)
    assert meta["io"] == {
        "inputs": [{"name": "image", "shape": [-1, 3, H, W], "dtype": "float32"}],
        "outputs": [{"name": "logits", "shape": [-1, K, H, W], "dtype": "float32"}],
    }
    assert "dynamo=True" in meta["exporter"] and meta["fcn_deploy_version"]
    assert [p.key for p in model.metadata_props].count(META_KEY) == 1


def test_read_artifact_meta_refusals(tmp_path):
    with pytest.raises(ArtifactNotFoundError, match="absent.onnx not found"):
        read_artifact_meta(tmp_path / "absent.onnx")
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    foreign = tmp_path / "foreign.onnx"
    onnx.save(helper.make_model(graph), foreign)
    with pytest.raises(ArtifactReadError, match="foreign.onnx carries no fcn-deploy metadata"):
        read_artifact_meta(foreign)
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\xff" * 100)
    with pytest.raises(ArtifactReadError, match="garbage.onnx is not a readable ONNX model"):
        read_artifact_meta(garbage)


# -- verification -----------------------------------------------------------------------------
def test_export_verification_within_fp32_thresholds(onnx_path):
    v = read_artifact_meta(onnx_path)["verification"]
    assert v["tiles"] == 3
    assert v["agreement"] >= FP32_MIN_AGREEMENT and v["nonfinite"] == 0
    assert 0 < v["mean_abs"] <= v["max_abs"] <= FP32_MAX_ABS


def test_perturbed_model_fails_verification(model, checkpoint_path):
    net, _ = load_checkpoint(checkpoint_path)
    bad = copy.deepcopy(model)
    init = next(t for t in bad.graph.initializer if t.name == _convt(bad).input[2])  # ConvTranspose bias
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) + np.float32(0.01), init.name))
    tiles = verification_tiles(1, H, W, IMAGENET_MEAN, IMAGENET_STD)
    with pytest.raises(VerificationError, match=r"ONNX fp32 vs PyTorch fp32: max abs logit difference 1.0\de-02 > 1.00e-03 \(over by 9") as info:
        verify_onnx(bad, net, tiles, batch=1)
    assert info.value.exit_code == 1
    assert verify_onnx(model, net, tiles, batch=1)["max_abs"] <= FP32_MAX_ABS


def test_metrics_and_thresholds_on_known_arrays():
    """Export's verification uses check's metrics and its threshold table (percentages)."""
    ref = np.zeros((1, 2, 10, 10), np.float32)
    ref[:, 1] = 1.0  # class 1 everywhere
    cand = ref.copy()
    cand[0, 0, 0, :3] = 2.0  # 3 of 100 pixels flip to class 0, by up to 2.0
    metrics = compare_logits(ref, cand)
    assert metrics["max_abs"] == 2.0 and metrics["mean_abs"] == pytest.approx(6 / 200)
    assert metrics["agreement"] == pytest.approx(97.0) and metrics["tiles"] == 1 and metrics["nonfinite"] == 0
    with pytest.raises(VerificationError, match=r"x: argmax agreement 97.00% < 99.50% \(short by 2.50 points\)$"):
        verify_logits(ref, cand, what="x", precision="fp16")
    with pytest.raises(VerificationError, match=r"agreement .*short by .*\); x: max abs logit difference 2.00e\+00 > 1.00e-03"):
        verify_logits(ref, cand, what="x", precision="fp32")
    assert verify_logits(ref, ref.copy(), what="x", precision="fp32")["max_abs"] == 0.0
    cand[0, 1, 5, 5] = np.inf  # e.g. float16 overflow: fails even without a max-abs threshold
    cand[0, 1, 5, 6] = np.nan
    assert compare_logits(ref, cand)["nonfinite"] == 2
    with pytest.raises(VerificationError, match=r"x: non-finite \(NaN/inf\) logits 2 > 0"):
        verify_logits(ref, cand, what="x", precision="fp16")


def test_failed_export_leaves_no_file(checkpoint_path, tmp_path, monkeypatch):
    def failing(*args, **kwargs):
        raise VerificationError("forced failure")

    monkeypatch.setattr("fcn_deploy.export.torch_export.verify_onnx", failing)
    with pytest.raises(VerificationError, match="forced failure"):
        export_onnx(checkpoint_path, tmp_path / "out" / "fcn.onnx", height=64, width=96)
    assert list(tmp_path.rglob("*")) == []  # neither the ONNX, its sidecar nor a temporary file


# -- FP16 -------------------------------------------------------------------------------------
def test_fp16_model_is_strongly_typed_with_float32_io(fp16_onnx_path, onnx_path, ckpt_weight):
    assert fp16_onnx_path == onnx_path.with_name("fcn.fp16.onnx")
    fp16 = onnx.load(fp16_onnx_path)
    check_graph(fp16, height=H, width=W, num_classes=K, transpose_weight=ckpt_weight)  # full checker inside
    check_fp16_typing(fp16)
    inits = {t.name: t for t in fp16.graph.initializer}
    convs = [n for n in fp16.graph.node if n.op_type in ("Conv", "ConvTranspose")]
    assert len(convs) > 10 and all(inits[n.input[1]].data_type == TensorProto.FLOAT16 for n in convs)
    assert fp16.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert fp16.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    first = next(n for n in fp16.graph.node if "image" in n.input)
    last = next(n for n in fp16.graph.node if "logits" in n.output)
    assert first.op_type == last.op_type == "Cast"
    assert fp16_onnx_path.stat().st_size < 0.6 * onnx_path.stat().st_size


def test_fp16_metadata_and_parity(fp16_onnx_path, onnx_path, checkpoint_path):
    meta, parent_meta = read_artifact_meta(fp16_onnx_path), read_artifact_meta(onnx_path)
    assert meta == json.loads(sidecar_path(fp16_onnx_path).read_text())
    assert sidecar_path(fp16_onnx_path).name == "fcn.fp16.json"
    assert meta["precision"] == "fp16" and meta["keep_fp32"] == []
    assert meta["parent"] == {"path": str(onnx_path.resolve()), "sha256": sha256_file(onnx_path)}
    assert meta["io"] == parent_meta["io"]
    assert meta["verification"]["agreement"] >= FP16_MIN_AGREEMENT
    # independent check against the float32 PyTorch model, on other tiles
    tiles = verification_tiles(2, H, W, meta["mean"], meta["std"], seed=7)
    out16 = _session(fp16_onnx_path).run(["logits"], {"image": tiles})[0]
    assert out16.dtype == np.float32
    net, _ = load_checkpoint(checkpoint_path)
    with torch.inference_mode():
        ref = net(torch.from_numpy(tiles)).numpy()
    assert compare_logits(ref, out16)["agreement"] >= FP16_MIN_AGREEMENT


def test_fp16_keep_convtranspose_in_fp32(onnx_path, tmp_path, ckpt_weight):
    out = convert_fp16(onnx_path, tmp_path / "keep.onnx", keep_fp32=["ConvTranspose"], verify=False)
    model = onnx.load(out)
    check_graph(model, height=H, width=W, num_classes=K, transpose_weight=ckpt_weight)
    node = _convt(model)
    check_fp16_typing(model, [node.name])
    weight = next(t for t in model.graph.initializer if t.name == node.input[1])
    assert weight.data_type == TensorProto.FLOAT
    np.testing.assert_array_equal(numpy_helper.to_array(weight), ckpt_weight)
    assert node.output[0] == "logits" and model.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert read_artifact_meta(out)["keep_fp32"] == [node.name]
    with pytest.raises(ExportError, match="'float16 weights' failed: ConvTranspose"):
        check_fp16_typing(model)


def test_fp16_refusals(onnx_path, fp16_onnx_path, tmp_path):
    with pytest.raises(UsageError, match="--keep-fp32 Softmax: no node or op type"):
        convert_fp16(onnx_path, tmp_path / "x.onnx", keep_fp32=["Softmax"])
    with pytest.raises(UsageError, match="has precision 'fp16'; convert an fp32 ONNX"):
        convert_fp16(fp16_onnx_path, tmp_path / "y.onnx")
    with pytest.raises(ArtifactExistsError, match="fcn.fp16.onnx exists; pass --force"):
        convert_fp16(onnx_path)  # fcn.fp16.onnx was written by the fixture
    assert list(tmp_path.iterdir()) == []


# -- CLI --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cli_export(checkpoint_path, tmp_path_factory):
    """``fcn-deploy export CKPT -o .../small.onnx --height 64 --width 96 --batch 2 --fp16
    --keep-fp32 ConvTranspose``."""
    out = tmp_path_factory.mktemp("cli") / "small.onnx"
    args = ["export", str(checkpoint_path), "-o", str(out), "--height", "64", "--width", "96", "--batch", "2", "--fp16",
            "--keep-fp32", "ConvTranspose"]
    return out, CliRunner().invoke(cli, args)


def test_cli_export_fixed_batch_and_fp16(cli_export):
    out, result = cli_export
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.parent.iterdir()) == ["small.fp16.json", "small.fp16.onnx", "small.json", "small.onnx"]
    lines = result.output.splitlines()
    assert len(lines) == 4 and "image float32 (2,3,64,96) -> logits float32 (2,21,64,96)" in lines[0]
    assert "verified against PyTorch fp32 on 2 tiles" in lines[1] and "verified against ONNX fp32" in lines[3]
    for path in (out, out.with_name("small.fp16.onnx")):
        model = onnx.load(path)
        assert _dims(model.graph.input[0]) == [2, 3, 64, 96] and _dims(model.graph.output[0]) == [2, K, 64, 96]
        session = _session(model)
        tiles = np.zeros((2, 3, 64, 96), np.float32)
        assert session.run(None, {"image": tiles})[0].shape == (2, K, 64, 96)
        with pytest.raises(Exception, match="(?i)dimension|shape"):
            session.run(None, {"image": np.zeros((3, 3, 64, 96), np.float32)})
        meta = read_artifact_meta(path)
        assert meta["tile_hw"] == [64, 96] and meta["io"]["inputs"][0]["shape"] == [2, 3, 64, 96]
    assert len(read_artifact_meta(out.with_name("small.fp16.onnx"))["keep_fp32"]) == 1  # the ConvTranspose


def test_cli_refuses_existing_output_without_force(cli_export, checkpoint_path):
    out, _ = cli_export
    before = {p.name: p.stat().st_mtime_ns for p in out.parent.iterdir()}
    result = CliRunner().invoke(cli, ["export", str(checkpoint_path), "-o", str(out), "--height", "64", "--width", "96"])
    assert result.exit_code == 2
    assert result.stderr == f"error: {out} exists; pass --force to overwrite it\n"
    assert {p.name: p.stat().st_mtime_ns for p in out.parent.iterdir()} == before


def _write_bad_checkpoints(tmp_path):
    (tmp_path / "corrupt.pt").write_bytes(b"PK\x03\x04 truncated zip")
    torch.save(torch.nn.Linear(2, 2).state_dict(), tmp_path / "linear.pt")
    wrong = FCN(num_classes=21).state_dict()
    wrong["final_conv.weight"] = torch.zeros(21, 256, 1, 1)  # 512 input channels expected
    torch.save(wrong, tmp_path / "wrong_shape.pt")


@pytest.mark.parametrize(
    "args, message",
    [
        (["{d}/absent.pt"], "checkpoint {d}/absent.pt not found"),
        (["{d}/corrupt.pt"], "corrupt.pt is truncated or not a PyTorch checkpoint"),
        (["{d}/linear.pt"], "linear.pt is not a d2l FCN checkpoint"),
        (["{d}/wrong_shape.pt"], "wrong_shape.pt does not fit the FCN architecture"),
        (["{d}/wrong_shape.pt", "--height", "100"], "--height 100 is not a positive multiple of 32"),
        (["{d}/wrong_shape.pt", "--width", "0"], "--width 0 is not a positive multiple of 32"),
        (["{d}/wrong_shape.pt", "--opset", "99"], "--opset 99 is not supported: the exporter writes opsets 16..{max_opset}"),
        (["{d}/wrong_shape.pt", "--opset", "11"], "--opset 11 is not supported"),
        (["{d}/wrong_shape.pt", "--batch", "0"], "--batch 0 must be at least 1"),
        (["{d}/wrong_shape.pt", "-o", "{d}/out/fcn.onnx.tmp"], "must end in .onnx"),
        (["{d}/wrong_shape.pt", "--keep-fp32", "Conv"], "--keep-fp32 only applies with --fp16"),
    ],
)
def test_cli_bad_input_one_error_line_no_file(tmp_path, args, message):
    _write_bad_checkpoints(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    argv = ["export", *[a.format(d=tmp_path) for a in args]]
    if "-o" not in argv:
        argv += ["-o", str(tmp_path / "out" / "fcn.onnx")]
    result = CliRunner().invoke(cli, argv)
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert message.format(d=tmp_path, max_opset=onnx.defs.onnx_opset_version()) in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no out/ folder, no partial file


def test_embed_meta_replaces_previous_entry():
    model = helper.make_model(helper.make_graph([], "g", [], []))
    embed_meta(model, {"a": 1})
    embed_meta(model, {"a": 2})
    assert [(p.key, json.loads(p.value)) for p in model.metadata_props] == [(META_KEY, {"a": 2})]


def test_fp16_of_trained_weights_with_tiny_values(tmp_path):
    """Weight decay leaves many |w| < 1e-7 in a trained transposed conv: the FP16 conversion must
    round them (not lift them to the converter's default 1e-7 floor) and still pass the checks."""
    from fcn_deploy.export.fp16 import FP16_TINY
    from fcn_deploy.model import save_checkpoint

    torch.manual_seed(1)
    net = FCN().eval()
    with torch.no_grad():
        net.transpose_conv.weight.add_(torch.randn_like(net.transpose_conv.weight) * 1e-8)
    ckpt = tmp_path / "trained.pt"
    save_checkpoint(ckpt, net)
    fp32 = export_onnx(ckpt, tmp_path / "fcn.onnx", height=64, width=96, verify=False).path
    fp16 = onnx.load(convert_fp16(fp32, verify=False))
    got = numpy_helper.to_array({t.name: t for t in fp16.graph.initializer}[_convt(fp16).input[1]])
    ref = net.transpose_conv.weight.detach().numpy()
    tiny = np.abs(ref) < FP16_TINY
    assert tiny.sum() > 1000
    assert np.abs(got[tiny].astype(np.float32)).max() <= FP16_TINY
    assert np.array_equal(got[~tiny], ref[~tiny].astype(np.float16))


def test_export_output_path_checked_before_the_work(checkpoint_path, tmp_path, monkeypatch):
    """Issue 10, defect 6: `export -o afile/fcn.onnx` exported and verified before failing to write."""
    def no_work(*args, **kwargs):
        raise AssertionError("the export started before its output path was checked")

    monkeypatch.setattr("fcn_deploy.model.load_checkpoint", no_work)
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    res = CliRunner().invoke(cli, ["export", str(checkpoint_path), "-o", str(blocker / "fcn.onnx")])
    assert res.exit_code == 2 and isinstance(res.exception, SystemExit), res.output
    assert "error: -o " in res.output and "cannot create a folder there" in res.output and "afile is a file" in res.output
    assert blocker.read_text() == "x"


@pytest.mark.parametrize("location, why", [("w.data", "not regular file"), ("../../etc/passwd", "points outside")])
def test_build_engine_onnx_with_missing_or_escaping_external_data_is_one_line(tmp_path, location, why, external_data_onnx):
    """Issue 10, defect 10: build-engine showed an onnx ValidationError traceback (the fix is in
    artifacts.load_onnx, which read_artifact_meta and the engine build use)."""
    pytest.importorskip("tensorrt_rtx_bindings")
    path = external_data_onnx(tmp_path / "export", location)
    with pytest.raises(ArtifactReadError, match=f"fcn.onnx is not a readable ONNX model .*{why}"):
        read_artifact_meta(path)
    res = CliRunner().invoke(cli, ["build-engine", str(path), "--fp32", "--trt", "rtx", "-o", str(tmp_path / "e.engine")])
    assert res.exit_code == 2 and isinstance(res.exception, SystemExit), res.output
    assert "Traceback" not in res.output and why in res.output


def test_cli_fp16_unknown_keep_fp32_name_writes_nothing(checkpoint_path, tmp_path):
    """issue 24: --keep-fp32 names are checked against the exported graph before fcn.onnx is
    written (a rerun needs no --force); a known name writes both (the cli_export fixture)."""
    args = ["export", str(checkpoint_path), "-o", str(tmp_path / "fcn.onnx"), "--height", "64", "--width", "96",
            "--fp16", "--no-verify", "--keep-fp32", "ConvTranspose", "--keep-fp32", "Bogus"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines() == ["error: --keep-fp32 Bogus: no node or op type of that name in the graph"]
    assert list(tmp_path.iterdir()) == []
