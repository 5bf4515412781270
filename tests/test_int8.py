"""INT8 QDQ export (fcn_deploy.export.int8): calibration data, graph form, sidecar, verification
gate, runner, the ``ort-int8`` registry entry and its staleness, ``check``'s int8 limits, and
``build-engine --int8`` with TensorRT-RTX (a real build on the CPU; the engine is not run)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

from fcn_deploy.chain import int8_onnx_path
from fcn_deploy.errors import (
    ArtifactExistsError,
    ArtifactNotFoundError,
    DatasetError,
    StaleArtifactError,
    UsageError,
    VerificationError,
)
from fcn_deploy.fileio import sha256_file
from fcn_deploy.export.int8 import (
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
    """Not verified: the random-weight FCN's near-uniform logits flip argmax under int8 (95.5%
    agreement), below the int8 gate (test_export_verification_uses_the_int8_limits)."""
    return export_int8(small_onnx, voc_root=voc_root, calib_tiles=MIN_CALIB_TILES, verify=False)


@pytest.fixture()
def int8_export_dir(small_onnx, int8_report, tmp_path):
    """A copy of the export folder holding fcn.onnx and fcn.int8.onnx (+ sidecars), as the chain lays it out."""
    import shutil

    export = tmp_path / "export"
    export.mkdir()
    for path in (small_onnx, small_onnx.with_suffix(".json"), int8_report.path, int8_report.sidecar_path):
        shutil.copy(path, export / path.name)
    return export


def _touch_onnx(path) -> None:
    """Re-save an ONNX with another doc_string: same graph, new sha256 (a re-export)."""
    model = onnx.load(path)
    model.doc_string = "re-exported"
    onnx.save(model, path)


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
    assert side["verification"] is None


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


def test_export_verification_uses_the_int8_limits(small_onnx, voc_root, tmp_path):
    """export --int8 verifies against check's int8 limits: on the random-weight model it fails
    naming the metric, and writes nothing; an int8 model equal to its parent passes."""
    from fcn_deploy.artifacts import meta_from_model
    from fcn_deploy.parity.thresholds import DEFAULT_THRESHOLDS
    from fcn_deploy.export.int8 import verify_int8

    out = tmp_path / "fcn.int8.onnx"
    with pytest.raises(VerificationError, match=r"ONNX int8 vs ONNX fp32: argmax agreement \d+\.\d+% < 99\.00%"):
        export_int8(small_onnx, out, voc_root=voc_root, calib_tiles=MIN_CALIB_TILES)
    assert not list(tmp_path.iterdir())
    assert DEFAULT_THRESHOLDS["int8"] == {"agreement": 99.0, "miou_gt_change": 1.0}
    fp32 = onnx.load(small_onnx)
    meta = meta_from_model(fp32)
    rgb = np.random.default_rng(0).integers(0, 256, (3, 3, *TILE_HW), dtype=np.uint8)
    reader = TileCalibrationReader(rgb, meta["mean"], meta["std"], "image", batch=2)
    metrics = verify_int8(fp32, fp32, reader, 3)
    assert metrics["agreement"] == 100.0 and metrics["tiles"] == 3 and metrics["tiles_source"] == "calibration"


def test_registry_entry_resolves_and_refuses_stale(int8_export_dir):
    """``ort-int8`` is one registry entry: the chain finds export/fcn.int8.onnx, runs it, and
    refuses it once fcn.onnx changed, like ort-fp16."""
    from fcn_deploy.chain import resolve
    from fcn_deploy.runners import open_runner
    from fcn_deploy.runners.registry import BACKENDS, CHECK_BACKENDS, backend_for, get_backend

    assert "ort-int8" in BACKENDS and "ort-int8" in CHECK_BACKENDS and backend_for("onnx", "int8") == "ort-int8"
    spec = get_backend("ort-int8")
    assert (spec.artifact, spec.precision) == ("onnx", "int8")
    resolved = resolve("ort-int8", export_dir=int8_export_dir)
    assert resolved.path == int8_export_dir / "fcn.int8.onnx" and resolved.precision == "int8" and resolved.stale is None
    with open_runner("ort-int8", export_dir=int8_export_dir, device="cpu") as runner:
        assert runner.name == "ort-int8" and runner.meta["precision"] == "int8"
        assert runner.infer(np.zeros((1, 3, *TILE_HW), np.float32)).shape == (1, 21, *TILE_HW)
    with pytest.raises(UsageError, match="use --backend ort-int8 for int8"):
        resolve("ort", export_dir=int8_export_dir, precision="int8")
    _touch_onnx(int8_export_dir / "fcn.onnx")
    stale = resolve("ort-int8", export_dir=int8_export_dir).stale
    assert "fcn.int8.onnx is stale" in stale and "--int8 --voc-root DIR (or --calib PHOTOS) --force" in stale
    with pytest.raises(StaleArtifactError, match="fcn.int8.onnx is stale"):
        open_runner("ort-int8", export_dir=int8_export_dir, device="cpu")
    (int8_export_dir / "fcn.int8.onnx").unlink()
    with pytest.raises(ArtifactNotFoundError, match=r"INT8 ONNX model .*fcn.int8.onnx not found; run `fcn-deploy export model.pt -o .*fcn.onnx --int8"):
        open_runner("ort-int8", export_dir=int8_export_dir, device="cpu")


def test_check_int8_gate_names_the_metric(checkpoint_path, int8_export_dir, voc_root, tmp_path):
    """``check --backend all`` includes ort-int8 once it exists; its gate is the int8 row of the
    table (random weights: agreement about 95% fails, named) and ``--threshold int8.*`` moves it."""
    from fcn_deploy.parity.check import check

    kw = dict(model=checkpoint_path, export_dir=int8_export_dir, engines_dir=tmp_path / "engines",
              voc_root=voc_root, max_tiles=2, echo=None, disagreement_dir=tmp_path / "maps")  # never ./check
    with pytest.raises(VerificationError, match=r"parity check failed: ort-int8: argmax agreement \d+\.\d+% < 99\.00% \(short by"):
        check(["all"], **kw)
    result = check(["ort-int8"], thresholds=["int8.agreement=80", "int8.miou_gt_change=off"], **kw)
    (entry,) = result.as_dict()["backends"]
    assert (entry["backend"], entry["precision"], entry["status"]) == ("ort-int8", "int8", "pass")
    assert [c["metric"] for c in entry["checks"]] == ["nonfinite", "agreement"]
    assert 80 <= entry["checks"][1]["value"] < 99


def test_build_engine_int8(int8_export_dir, tmp_path):
    """build-engine --int8 with TensorRT-RTX: from the fp32 export it builds <stem>.int8.onnx
    (strongly typed QDQ network), names the engine int8, records the int8 ONNX as parent and the
    export as source, and find_engine(precision="int8") picks it; a missing or stale int8 ONNX
    is refused with the command that makes it."""
    pytest.importorskip("tensorrt_rtx_bindings")
    from fcn_deploy.cli import cli
    from fcn_deploy.trt.build import build_engine
    from fcn_deploy.trt.sidecar import find_engine

    engines = tmp_path / "engines"
    fp32, int8 = int8_export_dir / "fcn.onnx", int8_export_dir / "fcn.int8.onnx"
    report = build_engine(fp32, precision="int8", flavour="rtx", engines_dir=engines,
                          min_batch=1, opt_batch=2, max_batch=2)
    assert report.engine.name.startswith("fcn.int8.trt-rtx-") and report.engine.stat().st_size > 1_000_000
    side = json.loads(report.sidecar.read_text())
    assert side["precision"] == "int8" and side["parent"] == {"path": str(int8), "sha256": sha256_file(int8)}
    assert side["source"] == {"path": str(fp32), "sha256": sha256_file(fp32)}
    assert [t["dtype"] for t in side["io"]["inputs"] + side["io"]["outputs"]] == ["float32", "float32"]
    assert side["profile"]["max"] == [2, 3, *TILE_HW]
    facts = {"trt": {"rtx": side["trt"]["version"], "tensorrt": None},
             "gpu": {"name": "NVIDIA GeForce RTX 3090", "compute_capability": "8.6"}, "gpu_error": None}
    assert find_engine(engines, precision="int8", machine=facts) == report.engine
    assert find_engine(engines, machine=facts) == report.engine  # the only engine that fits
    from fcn_deploy.errors import EngineError

    with pytest.raises(EngineError, match="int8 engine, fp16 asked for"):
        find_engine(engines, precision="fp16", machine=facts)
    # an int8 ONNX given directly, through the CLI
    out = tmp_path / "direct.engine"
    result = CliRunner().invoke(cli, ["build-engine", str(int8), "--int8", "--trt", "rtx", "-o", str(out),
                                      "--max-batch", "2", "--opt-batch", "2"])
    assert result.exit_code == 0, result.output
    assert "int8" in result.output and json.loads((tmp_path / "direct.engine.json").read_text())["precision"] == "int8"
    result = CliRunner().invoke(cli, ["build-engine", str(int8), "--fp16", "--trt", "rtx", "-o", str(tmp_path / "x.engine")])
    assert result.exit_code != 0 and "is an INT8 ONNX; pass --int8" in result.output
    # stale (fcn.onnx re-exported) and missing int8 ONNX: refused, nothing written
    _touch_onnx(fp32)
    with pytest.raises(StaleArtifactError, match="fcn.int8.onnx is stale"):
        build_engine(fp32, tmp_path / "stale.engine", precision="int8", flavour="rtx")
    int8.unlink()
    result = CliRunner().invoke(cli, ["build-engine", str(fp32), "--int8", "--trt", "rtx", "-o", str(tmp_path / "m.engine")])
    assert result.exit_code != 0 and result.output.count("\n") == 1
    assert "INT8 ONNX" in result.output and "export <checkpoint> -o" in result.output and "--int8 --voc-root DIR" in result.output
    assert not list(tmp_path.glob("[sm]*.engine*"))


def test_bench_compares_ort_int8_with_ort_in_one_run(int8_export_dir, tmp_path, monkeypatch):
    """``bench --backend ort --backend ort-int8``: both default artifacts, same tiles, interleaved
    calls, tiles/s side by side with the ratio to the first (fields only, never speeds)."""
    from fcn_deploy.bench import bench_compare
    from fcn_deploy.cli import cli

    lines = []
    result = bench_compare(["ort", "ort-int8"], export_dir=int8_export_dir, batch_sizes=(1, 2), warmup=0,
                           iterations=2, device="cpu", report=tmp_path / "b.json", echo=lines.append)
    assert [b["backend"] for b in result["backends"]] == ["ort", "ort-int8"]
    assert [b["precision"] for b in result["backends"]] == ["fp32", "int8"]
    assert result["backends"][1]["artifact"] == str(int8_export_dir / "fcn.int8.onnx")
    for row in result["comparison"]:
        speeds = row["tiles_per_s"]
        assert set(speeds) == {"ort", "ort-int8"} and min(speeds.values()) > 0 and row["vs_first"]["ort"] == 1.0
        assert row["vs_first"]["ort-int8"] == pytest.approx(speeds["ort-int8"] / speeds["ort"], abs=2e-3)
    assert all(r["runs"] == 2 for b in result["backends"] for r in b["engine"])
    assert json.loads((tmp_path / "b.json").read_text()) == result
    assert "ort tiles/s" in lines[0] and "ort-int8 tiles/s" in lines[0] and "x ort" in lines[0]
    monkeypatch.chdir(int8_export_dir.parent)
    args = ["bench", "--backend", "ort", "--backend", "ort-int8", "--batch-sizes", "1", "--iterations", "1",
            "--warmup", "0", "--device", "cpu"]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    assert "bench ort (" in res.output and " vs ort-int8 (" in res.output and "calls interleaved" in res.output
    res = CliRunner().invoke(cli, [*args, "--model", "export/fcn.onnx"])
    assert res.exit_code == 2 and "--model applies to one --backend" in res.output


def test_int8_cpu_variant(small_onnx, voc_root, int8_export_dir, tmp_path):
    """export --int8-cpu: uint8 activations (zero points), weights still symmetric int8, its own
    artifact <stem>.int8-cpu.onnx and backend ort-int8-cpu (precision int8: the int8 limits);
    onnxruntime fuses every conv into QLinearConv; build-engine refuses it (TensorRT refuses
    non-zero zero points); a stale one names --int8-cpu."""
    from fcn_deploy.chain import resolve
    from fcn_deploy.runners import open_runner

    out = int8_export_dir / "fcn.int8-cpu.onnx"
    report = export_int8(int8_export_dir / "fcn.onnx", voc_root=voc_root, calib_tiles=MIN_CALIB_TILES,
                         verify=False, cpu_only=True)
    assert report.path == out and "uint8 activations, onnxruntime CPU only" in report.summary()
    model = onnx.load(out)
    inits = _inits(model)
    zps = [inits[n.input[2]] for n in model.graph.node if n.op_type == "QuantizeLinear" and len(n.input) > 2]
    assert zps and all(z.dtype == np.uint8 for z in zps) and any(z.any() for z in zps)
    side = json.loads(out.with_suffix(".json").read_text())
    assert side["precision"] == "int8" and side["calibration"]["symmetric"] is False
    assert "CPU only" in side["calibration"]["runtime"]
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(out), opts, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(tmp_path / "opt.onnx").graph.node]
    assert ops.count("QLinearConv") == sum(n.op_type == "Conv" for n in onnx.load(small_onnx).graph.node)
    resolved = resolve("ort-int8-cpu", export_dir=int8_export_dir)
    assert resolved.path == out and resolved.precision == "int8" and resolved.stale is None
    with open_runner("ort-int8-cpu", export_dir=int8_export_dir, device="cpu") as runner:
        assert runner.name == "ort-int8-cpu" and runner.meta["precision"] == "int8"
    from fcn_deploy.trt.build import build_engine

    with pytest.raises(UsageError, match="CPU-only INT8 ONNX .* TensorRT refuses"):
        build_engine(out, tmp_path / "e.engine", precision="int8", flavour="rtx")
    _touch_onnx(int8_export_dir / "fcn.onnx")
    assert "--int8-cpu --voc-root DIR" in resolve("ort-int8-cpu", export_dir=int8_export_dir).stale
    (int8_export_dir / "fcn.int8-cpu.onnx").unlink()
    with pytest.raises(ArtifactNotFoundError, match=r"INT8-CPU ONNX model .* run `fcn-deploy export model.pt -o .*fcn.onnx --int8-cpu"):
        resolve("ort-int8-cpu", export_dir=int8_export_dir)
