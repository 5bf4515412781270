"""INT8 QDQ export (fcn_deploy.quantize): calibration data, graph form, sidecar, runner,
refusals, and the TensorRT-RTX build of the QDQ network (on the CPU, nothing run)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

from fcn_deploy.chain import int8_onnx_path
from fcn_deploy.errors import ArtifactExistsError, DatasetError, UsageError
from fcn_deploy.fileio import sha256_file
from fcn_deploy.quantize import (
    MIN_CALIB_TILES,
    TileCalibrationReader,
    calibration_tiles,
    export_int8,
    quantize_qdq,
)

TILE_HW = (64, 96)


@pytest.fixture(scope="module")
def small_onnx(checkpoint_path, tmp_path_factory):
    """The random-weight checkpoint exported at 64x96 tiles (dynamic batch)."""
    from fcn_deploy.export.torch_export import export_onnx

    return export_onnx(checkpoint_path, tmp_path_factory.mktemp("int8") / "fcn.onnx", height=64, width=96).path


@pytest.fixture(scope="module")
def int8_report(small_onnx, voc_root):
    return export_int8(small_onnx, voc_root=voc_root, calib_tiles=MIN_CALIB_TILES)


def _inits(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _activation_scales(model) -> dict[str, float]:
    """Scale of every QuantizeLinear (activations; weights are stored quantized), by its input."""
    inits = _inits(model)
    return {n.input[0]: float(inits[n.input[1]]) for n in model.graph.node if n.op_type == "QuantizeLinear"}


def test_int8_artifact_form_and_sidecar(int8_report, small_onnx):
    path = int8_report.path
    assert path == int8_onnx_path(small_onnx) and path.name == "fcn.int8.onnx"
    model = onnx.load(path)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") > 10 and ops.count("DequantizeLinear") > 10
    inits = _inits(model)
    producers = {o: n for n in model.graph.node for o in n.output}
    # symmetric: every zero point is 0 and int8
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and len(node.input) > 2:
            zp = inits[node.input[2]]
            assert zp.dtype == np.int8 and not zp.any()
    # per-channel int8 Conv weights, float bias; the ConvTranspose stays float32
    for node in model.graph.node:
        if node.op_type == "Conv":
            dq = producers[node.input[1]]
            assert dq.op_type == "DequantizeLinear" and inits[dq.input[0]].dtype == np.int8
            assert inits[dq.input[1]].shape == (inits[dq.input[0]].shape[0],)
            if len(node.input) > 2:
                assert inits[node.input[2]].dtype == np.float32
        if node.op_type == "ConvTranspose":
            assert inits[node.input[1]].dtype == np.float32 and inits[node.input[1]].shape == (21, 21, 64, 64)
    # sidecar: the parent's keys plus calibration, precision int8, identical to the embedded copy
    side = json.loads(int8_report.sidecar_path.read_text())
    parent_meta = json.loads(small_onnx.with_suffix(".json").read_text())
    assert set(parent_meta) | {"calibration"} == set(side)
    assert side["precision"] == "int8" and side["tile_hw"] == list(TILE_HW)
    from fcn_deploy.artifacts import meta_from_model

    assert meta_from_model(model) == side
    cal = side["calibration"]
    assert cal["method"] == "minmax" and cal["tiles"] == MIN_CALIB_TILES
    assert cal["parent_sha256"] == side["parent"]["sha256"] == sha256_file(small_onnx)
    assert cal["source"]["split"] == "train" and all(f.endswith(".jpg") for f in cal["files"])
    assert side["io"]["inputs"][0]["dtype"] == side["io"]["outputs"][0]["dtype"] == "float32"
    assert 0.0 <= side["verification"]["agreement"] <= 100.0


def test_onnxruntime_runner_runs_int8(int8_report):
    from fcn_deploy.runners.onnxrt import OnnxRuntimeRunner

    x = np.random.default_rng(1).standard_normal((3, 3, *TILE_HW)).astype(np.float32)
    with OnnxRuntimeRunner(int8_report.path) as runner:
        assert runner.meta["precision"] == "int8"
        logits = runner.infer(x)
        labels = runner.infer(x, output="labels")
    assert logits.shape == (3, 21, *TILE_HW) and logits.dtype == np.float32 and np.isfinite(logits).all()
    assert labels.dtype == np.uint8 and np.array_equal(labels, logits.argmax(axis=1))


def test_calibration_reads_only_the_given_tiles(small_onnx, voc_root):
    from fcn_deploy.artifacts import meta_from_model

    fp32 = onnx.load(small_onnx)
    meta = meta_from_model(fp32)
    tiles, _, _ = calibration_tiles(TILE_HW, voc_root=voc_root, tiles=MIN_CALIB_TILES)
    dark = (tiles.rgb // 4).astype(np.uint8)  # another tile set: same images, a quarter as bright

    def calibrate(rgb):
        reader = TileCalibrationReader(rgb, meta["mean"], meta["std"], "image", batch=3)
        model, excluded = quantize_qdq(fp32, reader, preprocess=False)
        return model, reader, excluded

    first, reader, excluded = calibrate(tiles.rgb)
    # every tile handed out, each once per pass over the data, and nothing else
    assert reader.served % len(tiles) == 0 and reader.served > 0
    assert sorted(set(reader.served_ids)) == list(range(len(tiles)))
    assert [n.op_type for n in first.graph.node if n.name in excluded] == ["ConvTranspose"]
    again, _, _ = calibrate(tiles.rgb)
    other, _, _ = calibrate(dark)
    scales = _activation_scales(first)
    assert len(scales) > 10
    assert _activation_scales(again) == scales  # nothing but the tiles decides the scales
    other_scales = _activation_scales(other)
    assert other_scales.keys() == scales.keys()
    assert sum(other_scales[k] != v for k, v in scales.items()) > len(scales) // 2


def test_fixed_batch_reader_fills_up_with_its_own_tiles():
    rgb = np.arange(5 * 3 * 2 * 2, dtype=np.uint8).reshape(5, 3, 2, 2)
    reader = TileCalibrationReader(rgb, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), "image", batch=4, fixed=True)
    batches = list(reader)
    assert [b["image"].shape[0] for b in batches] == [4, 4]
    assert reader.served_ids == [0, 1, 2, 3, 4, 0, 1, 2]
    assert np.allclose(batches[1]["image"][1] * 255, rgb[0].astype(np.float32))


def test_refusals(small_onnx, voc_root, int8_report, tmp_path):
    from fcn_deploy.export.fp16 import convert_fp16

    fp16_onnx_path = convert_fp16(small_onnx, tmp_path / "fp16" / "fcn.fp16.onnx", verify=False)
    with pytest.raises(UsageError, match="--calib-tiles 4: calibration needs at least 8"):
        export_int8(small_onnx, voc_root=voc_root, calib_tiles=4, output=tmp_path / "a.onnx")
    with pytest.raises(UsageError, match="--calib PATHS or --voc-root DIR"):
        export_int8(small_onnx, output=tmp_path / "a.onnx")
    with pytest.raises(UsageError, match="one of them"):
        export_int8(small_onnx, calib=[tmp_path], voc_root=voc_root, output=tmp_path / "a.onnx")
    with pytest.raises(ArtifactExistsError, match="fcn.int8.onnx exists"):
        export_int8(small_onnx, voc_root=voc_root)
    with pytest.raises(UsageError, match="would replace its input"):
        export_int8(small_onnx, voc_root=voc_root, output=small_onnx, force=True)
    with pytest.raises(UsageError, match="quantize the fp32 ONNX"):
        export_int8(fp16_onnx_path, voc_root=voc_root, output=tmp_path / "b.onnx")
    # one small photo gives a single 64x96 tile: too few, named
    from PIL import Image

    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (90, 60), (120, 30, 200)).save(photos / "one.png")
    with pytest.raises(DatasetError, match=r"only 1 calibration tiles .* need at least 8"):
        export_int8(small_onnx, calib=[photos], output=tmp_path / "c.onnx")
    assert not list(tmp_path.glob("*.onnx"))  # nothing written by any refusal


def test_stale_int8_is_detected(int8_report, small_onnx, tmp_path):
    """The int8 ONNX records its fp32 parent's sha256: a re-exported parent makes it stale, the
    same rule as the FP16 ONNX (``check`` / the artifact chain refuse it)."""
    import shutil

    from fcn_deploy.chain import onnx_staleness

    assert onnx_staleness(int8_report.path, small_onnx) is None
    changed = tmp_path / "fcn.onnx"
    shutil.copy(small_onnx, changed)
    model = onnx.load(changed)
    model.doc_string = "re-exported"
    onnx.save(model, changed)
    assert "is stale" in onnx_staleness(int8_report.path, changed)


def test_cli_export_int8(checkpoint_path, voc_root, tmp_path):
    from fcn_deploy.cli import cli

    out = tmp_path / "export" / "fcn.onnx"
    args = ["export", str(checkpoint_path), "-o", str(out), "--height", "64", "--width", "96", "--no-verify"]
    result = CliRunner().invoke(cli, [*args, "--int8"])
    assert result.exit_code == 2 and "error: --int8 calibrates on real images" in result.output
    assert not out.exists()  # refused before the fp32 export
    result = CliRunner().invoke(cli, [*args, "--calib-tiles", "8", "--voc-root", str(voc_root)])
    assert result.exit_code == 2 and "--voc-root only applies with --int8" in result.output
    result = CliRunner().invoke(cli, [*args, "--int8", "--voc-root", str(voc_root), "--calib-tiles", "8",
                                      "--calib-method", "percentile"])
    assert result.exit_code == 0, result.output
    assert "fcn.int8.onnx" in result.output and "calibrated (percentile) on 8 tiles" in result.output
    side = json.loads((tmp_path / "export" / "fcn.int8.json").read_text())
    assert side["calibration"]["method"] == "percentile" and side["verification"] is None


def test_tensorrt_rtx_builds_the_qdq_network(int8_report):
    """TensorRT-RTX parses the QDQ ONNX into a strongly typed network with Q/DQ layers and builds
    an engine on the CPU (it cannot run it here)."""
    pytest.importorskip("tensorrt_rtx_bindings")
    from fcn_deploy.quantize import build_int8_engine_check

    built = build_int8_engine_check(int8_report.path, flavour="rtx", max_batch=2)
    assert built["flavour"] == "rtx" and built["engine_bytes"] > 1_000_000
    assert built["quantize_layers"] > 10 and built["dequantize_layers"] > 10


def test_every_calibration_batch_counts(small_onnx):
    """The input scale reflects the last of 9 one-tile batches (a white tile among grey ones): no
    batch is dropped (onnxruntime's CalibMaxIntermediateOutputs would drop them)."""
    from fcn_deploy.artifacts import meta_from_model

    fp32 = onnx.load(small_onnx)
    meta = meta_from_model(fp32)
    rgb = np.full((9, 3, *TILE_HW), 128, dtype=np.uint8)
    rgb[-1] = 255
    reader = TileCalibrationReader(rgb, meta["mean"], meta["std"], "image", batch=1)
    model, _ = quantize_qdq(fp32, reader, preprocess=False)
    white = max((1.0 - m) / s for m, s in zip(meta["mean"], meta["std"]))
    assert reader.served_ids == list(range(9))
    assert _activation_scales(model)["image"] == pytest.approx(white / 127, rel=1e-4)
