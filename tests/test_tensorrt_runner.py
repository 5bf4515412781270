"""TensorRT runner: pure bookkeeping and activation refusals here; execution under @gpu."""

from __future__ import annotations

import hashlib
import json
import sys

import numpy as np
import pytest

from fcn_deploy.engine import ENGINE_FORMAT, ENGINE_FORMAT_VERSION, sidecar_path
from fcn_deploy.errors import BackendUnavailableError, EngineError, InputMismatchError
from fcn_deploy.runners.tensorrt import (
    BatchProfile,
    Binding,
    TensorRTRunner,
    binding_table,
    labels_from_output,
    numpy_dtype,
)

H, W = 320, 480
ROWS = [
    ("image", "INPUT", (-1, 3, H, W), "FLOAT"),
    ("logits", "OUTPUT", (-1, 21, H, W), "FLOAT"),
]


# --- pure bookkeeping ------------------------------------------------------------------------------
def test_numpy_dtype_mapping():
    assert numpy_dtype("FLOAT") == "float32" and numpy_dtype("HALF") == "float16"
    assert numpy_dtype("UINT8") == "uint8" and numpy_dtype("INT32") == "int32"
    with pytest.raises(EngineError, match="BF16 has no numpy equivalent"):
        numpy_dtype("BF16")


def test_numpy_dtype_agrees_with_trt_nptype():
    trt = pytest.importorskip("tensorrt_rtx_bindings")
    for name in ("FLOAT", "HALF", "INT8", "UINT8", "INT32", "INT64", "BOOL"):
        assert np.dtype(numpy_dtype(name)) == np.dtype(trt.nptype(getattr(trt.DataType, name)))


def test_binding_table_and_buffer_sizes():
    table = binding_table(ROWS + [("labels", "OUTPUT", (-1, 1, H, W), "UINT8")])
    assert table.input == Binding("image", True, (-1, 3, H, W), "float32")
    assert table.logits.name == "logits" and table.labels.dtype == "uint8"
    assert table.input.shape_for(7) == (7, 3, H, W)
    assert table.buffer_nbytes(32) == {
        "image": 32 * 3 * H * W * 4,  # 59 MB
        "logits": 32 * 21 * H * W * 4,  # 413 MB: what --labels-output avoids copying back
        "labels": 32 * H * W,  # 4.9 MB
    }
    assert binding_table(ROWS).labels is None
    assert Binding("x", True, (4, 3, 8, 8), "float16").nbytes(99) == 4 * 3 * 8 * 8 * 2  # fixed batch


@pytest.mark.parametrize(
    "rows, match",
    [
        (ROWS + [("image2", "INPUT", (-1, 3, H, W), "FLOAT")], "2 inputs"),
        ([("image", "INPUT", (-1, 3, H, W), "HALF"), ROWS[1]], "expected float32"),
        ([("image", "INPUT", (-1, 3, -1, W), "FLOAT"), ROWS[1]], r"\(N, 3, H, W\)"),
        ([ROWS[0], ("labels", "OUTPUT", (-1, 1, H, W), "UINT8")], "one 4-D logits output"),
        ([ROWS[0], ("x", "NONE", (1,), "FLOAT")], "IO mode NONE"),
    ],
)
def test_binding_table_refuses_other_engines(rows, match):
    with pytest.raises(EngineError, match=match):
        binding_table(rows)


def test_batch_profile():
    profile = BatchProfile.from_shapes([(2, 3, H, W), (8, 3, H, W), (32, 3, H, W)])
    assert profile == BatchProfile(2, 8, 32)
    assert profile.run_batch(1) == 2  # padded up to the profile's minimum
    assert profile.run_batch(32) == 32
    with pytest.raises(InputMismatchError, match="at most 32"):
        profile.run_batch(33)


def test_labels_from_output():
    host = np.arange(4 * 1 * 2 * 3, dtype=np.int32).reshape(4, 1, 2, 3) % 21
    labels = labels_from_output(host, 3, (2, 3))
    assert labels.shape == (3, 2, 3) and labels.dtype == np.uint8
    np.testing.assert_array_equal(labels, host[:3, 0])
    host[0, 0, 0, 0] = 20
    assert labels[0, 0, 0] != 20  # a copy, not a view of the reused host buffer


# --- activation refusals ---------------------------------------------------------------------------
def _fake_engine(folder, flavour="rtx"):
    engine = folder / "fcn.fp16.engine"
    engine.write_bytes(b"plan")
    sidecar = {"format": ENGINE_FORMAT, "format_version": ENGINE_FORMAT_VERSION, "precision": "fp16",
               "trt": {"flavour": flavour, "label": "x", "version": "0"},
               "engine_sha256": hashlib.sha256(b"plan").hexdigest(), "source": {"path": "export/fcn.onnx"}}
    sidecar_path(engine).write_text(json.dumps(sidecar))
    return engine


def test_runner_is_lazy(tmp_path):
    runner = TensorRTRunner(tmp_path / "missing.engine")
    assert runner.name == "trt" and not runner.is_active and runner.input_spec is None
    with pytest.raises(EngineError, match="not found; build one with fcn-deploy build-engine"):
        runner.activate()
    (tmp_path / "nosidecar.engine").write_bytes(b"plan")
    with pytest.raises(EngineError, match="has no sidecar nosidecar.engine.json"):
        TensorRTRunner(tmp_path / "nosidecar.engine").activate()


def test_truncated_engine_is_refused_before_touching_cuda(tmp_path):
    engine = _fake_engine(tmp_path)
    engine.write_bytes(b"pl")
    with pytest.raises(EngineError, match=r"truncated.*fcn-deploy build-engine export/fcn.onnx --fp16 --trt rtx --force"):
        TensorRTRunner(engine).activate()


def test_activate_without_pycuda(tmp_path, monkeypatch):
    pytest.importorskip("tensorrt_rtx_bindings")
    monkeypatch.setitem(sys.modules, "pycuda", None)
    monkeypatch.setitem(sys.modules, "pycuda.driver", None)
    runner = TensorRTRunner(_fake_engine(tmp_path))
    with pytest.raises(BackendUnavailableError, match=r"needs pycuda: pip install 'fcn-deploy\[trt\]'"):
        runner.activate()
    assert not runner.is_active


@pytest.mark.parametrize(
    "gpu, source_bytes, match",
    [
        ({"name": "NVIDIA H200", "compute_capability": "9.0"}, b"export", r"built for sm_80.*this GPU is sm_90 \(NVIDIA H200\)"),
        ({"name": "NVIDIA RTX 4090", "compute_capability": "8.9"}, b"re-exported", "stale: built from an ONNX"),
    ],
)
def test_activate_refuses_an_engine_that_does_not_fit(tmp_path, monkeypatch, gpu, source_bytes, match):
    """The sidecar check runs before any CUDA call: fake the GPU query, keep the real decision."""
    trt = pytest.importorskip("tensorrt_rtx_bindings")
    import fcn_deploy.runners.tensorrt as module

    source = tmp_path / "fcn.onnx"
    source.write_bytes(b"export")
    engine = _fake_engine(tmp_path)
    sidecar = json.loads(sidecar_path(engine).read_text())
    sidecar.update(
        trt={"flavour": "rtx", "label": "TensorRT-RTX", "version": trt.__version__},
        target={"portable": True, "compute_capabilities": ["8.0", "8.6", "8.9", "12.0"], "gpu": None},
        parent={"path": "fcn.fp16.onnx", "sha256": "0" * 64},
        source={"path": str(source), "sha256": hashlib.sha256(b"export").hexdigest()},
    )
    sidecar_path(engine).write_text(json.dumps(sidecar))
    source.write_bytes(source_bytes)
    monkeypatch.setattr(module, "_import_pycuda", lambda: None)  # any CUDA use would fail
    monkeypatch.setattr(module, "gpu_info", lambda device: gpu)
    with pytest.raises(EngineError, match=match) as err:
        TensorRTRunner(engine).activate()
    assert f"rebuild it: fcn-deploy build-engine {source} --fp16 --trt rtx --force" in str(err.value)


def test_activate_without_the_engines_tensorrt(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(BackendUnavailableError, match=r"TensorRT is not installed.*fcn-deploy\[trt\]"):
        TensorRTRunner(_fake_engine(tmp_path, "tensorrt")).activate()


# --- on a GPU ----------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_engine_matches_onnxruntime(onnx_path, tmp_path):
    """Build an engine here, run it, compare with onnxruntime fp32 (needs pycuda and a TensorRT)."""
    pytest.importorskip("pycuda.driver")
    import onnxruntime as ort

    from fcn_deploy.engine import build_engine, engine_mismatch, machine_facts

    report = build_engine(onnx_path, precision="fp32", engines_dir=tmp_path, labels_output=True, max_batch=4, opt_batch=2)
    reason = engine_mismatch(report.meta, machine_facts())
    if reason is not None:  # e.g. TensorRT-RTX only, on an H100/H200 (sm_90) it does not target
        pytest.skip(f"no installed TensorRT runs on this GPU: {reason}")
    rng = np.random.default_rng(0)
    tiles = rng.standard_normal((3, 3, H, W), dtype=np.float32)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    expected = session.run(None, {"image": tiles})[0]
    with TensorRTRunner(report.engine) as runner:
        assert runner.max_batch == 4 and runner.tile_hw == (H, W)
        logits = runner.infer(tiles)
        labels = runner.infer(tiles, output="labels")
        again = runner.infer(tiles[:1])  # smaller batch reuses the same buffers
    assert logits.shape == (3, 21, H, W) and logits.dtype == np.float32
    assert np.abs(logits - expected).max() <= 1e-3
    assert labels.shape == (3, H, W) and labels.dtype == np.uint8
    assert (labels == expected.argmax(1)).mean() >= 0.9999
    np.testing.assert_allclose(again, logits[:1], atol=1e-5)
    assert not runner.is_active


def test_incomplete_sidecar_is_one_clear_error(tmp_path):
    engine = _fake_engine(tmp_path)
    sidecar = json.loads(sidecar_path(engine).read_text())
    del sidecar["trt"]
    sidecar_path(engine).write_text(json.dumps(sidecar))
    with pytest.raises(EngineError, match=r"incomplete sidecar \(missing 'trt'\); rebuild the engine"):
        TensorRTRunner(engine).activate()
