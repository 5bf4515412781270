"""TensorRT runner: pure bookkeeping, activation refusals, our call order against a recording
fake of TensorRT's runtime/engine/context (CPU torch tensors), and a real engine under @gpu."""

from __future__ import annotations

import ctypes
import hashlib
import json
import re
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fcn_deploy.errors import BackendUnavailableError, EngineError, InputMismatchError
from fcn_deploy.trt.runtime import (
    BatchProfile,
    Binding,
    TensorRTRunner,
    binding_table,
    numpy_dtype,
)
from fcn_deploy.trt.sidecar import ENGINE_FORMAT, ENGINE_FORMAT_VERSION, sidecar_path

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


def test_activate_without_gpu_says_so(tmp_path):
    """Defect 12 at the runner: this machine (no NVIDIA driver, or a CPU torch) gets "no NVIDIA GPU"
    and --backend ort, not an install hint for pycuda or TensorRT."""
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    runner = TensorRTRunner(_fake_engine(tmp_path, "tensorrt"))
    with pytest.raises(BackendUnavailableError, match=r"^no NVIDIA GPU on this machine .*use --backend ort") as err:
        runner.activate()
    assert "pycuda" not in str(err.value) and "pip install" not in str(err.value)
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
    import fcn_deploy.trt.runtime as module

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
    monkeypatch.setattr(module, "gpu_info", lambda device: gpu)
    with pytest.raises(EngineError, match=match) as err:
        TensorRTRunner(engine).activate()
    assert f"rebuild it: fcn-deploy build-engine {source} --fp16 --trt rtx --force" in str(err.value)


def test_activate_without_the_engines_tensorrt(tmp_path, monkeypatch):
    import fcn_deploy.trt.runtime as module

    monkeypatch.setattr(module, "gpu_info", lambda device: {"name": "NVIDIA L4", "compute_capability": "8.9"})
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(BackendUnavailableError, match=r"TensorRT is not installed.*fcn-deploy\[trt\]"):
        TensorRTRunner(_fake_engine(tmp_path, "tensorrt")).activate()


# --- on a GPU ----------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_engine_matches_onnxruntime(onnx_path, tmp_path):
    """Build an engine here, run it on torch buffers and stream, compare with onnxruntime fp32."""
    import onnxruntime as ort

    from fcn_deploy.trt.build import build_engine
    from fcn_deploy.trt.sidecar import engine_mismatch, machine_facts

    report = build_engine(onnx_path, precision="fp32", engines_dir=tmp_path, labels_output=True, max_batch=4, opt_batch=2)
    reason = engine_mismatch(report.meta, machine_facts())
    if reason is not None:  # e.g. TensorRT-RTX only, on an H100/H200 (sm_90) it does not target
        pytest.skip(f"no installed TensorRT runs on this GPU: {reason}")
    rng = np.random.default_rng(0)
    tiles = rng.standard_normal((3, 3, H, W), dtype=np.float32)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    expected = session.run(None, {"image": tiles})[0]
    with TensorRTRunner(report.engine, device="cuda:0") as runner:
        assert runner.max_batch == 4 and runner.tile_hw == (H, W) and runner.device == "cuda:0"
        logits = runner.infer(tiles)
        labels = runner.infer(tiles, output="labels")  # the engine's labels output
        again = runner.infer(tiles[:1])  # smaller batch reuses the same buffers
        on_device = torch.from_numpy(tiles).to("cuda:0")
        dev_logits = runner.infer(on_device)
        dev_labels = runner.infer(on_device, output="labels")
        assert dev_logits.device == on_device.device and dev_labels.dtype == torch.uint8
        np.testing.assert_array_equal(dev_logits.cpu().numpy(), logits)
        np.testing.assert_array_equal(dev_labels.cpu().numpy(), labels)
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


# --- our call order, against a recording fake of TensorRT ----------------------------------------
C = 4  # classes of the fake network (small tiles keep the test fast)
TH, TW = 32, 48


class _Named:
    def __init__(self, name):
        self.name = name


class FakeContext:
    """Records every call; computes logits[n, c] = (c + 1) * input[n, c % 3] and labels =
    (argmax + 1) % C (deliberately not the argmax, so a test sees which output was used)."""

    def __init__(self, engine):
        self.engine, self.calls, self.shape = engine, engine.calls, None
        self.addresses: dict[str, int] = {}

    def set_input_shape(self, name, shape):
        self.calls.append(("set_input_shape", name, tuple(shape)))
        if self.engine.fail == "set_input_shape":
            self.engine.logger.log(FakeTrt.ILogger.Severity.ERROR, "IExecutionContext::setInputShape: Error Code 3:\nshape out of range")
            return False
        self.shape = tuple(shape)
        return True

    def get_tensor_shape(self, name):
        self.calls.append(("get_tensor_shape", name))
        n = self.shape[0]
        shape = (n, C, TH, TW) if name == "logits" else (n, 1, TH, TW)
        return (n + 1, *shape[1:]) if self.engine.fail == "output_shape" else shape

    def set_tensor_address(self, name, ptr):
        self.calls.append(("set_tensor_address", name, ptr))
        if self.engine.fail == "set_tensor_address":
            self.engine.logger.log(FakeTrt.ILogger.Severity.ERROR, f"setTensorAddress: {name} is misaligned")
            return False
        self.addresses[name] = ptr
        return True

    def execute_async_v3(self, stream_handle):
        self.calls.append(("execute_async_v3", stream_handle))
        if self.engine.fail == "execute":
            self.engine.logger.log(FakeTrt.ILogger.Severity.INTERNAL_ERROR, "enqueueV3: kernel launch failed")
            return False
        n = self.shape[0]
        image = _view(self.addresses["image"], np.float32, (n, 3, TH, TW))
        logits = _view(self.addresses["logits"], np.float32, (n, C, TH, TW))
        for c in range(C):
            logits[:, c] = (c + 1) * image[:, c % 3]
        if "labels" in self.engine.names:
            _view(self.addresses["labels"], np.uint8, (n, 1, TH, TW))[:, 0] = (logits.argmax(1) + 1) % C
        return True


def _view(ptr, dtype, shape):
    """numpy view of CPU memory at address ``ptr`` (what the engine would read or write)."""
    count = int(np.prod(shape))
    buf = (ctypes.c_byte * (count * np.dtype(dtype).itemsize)).from_address(ptr)
    return np.frombuffer(buf, dtype).reshape(shape)


class FakeEngine:
    def __init__(self, trt, labels, batch):
        self.calls, self.fail, self.logger = trt.calls, trt.fail, trt.logger
        self.names = ["image", "logits"] + (["labels"] if labels else [])
        b = -1 if batch is None else batch
        self.shapes = {"image": (b, 3, TH, TW), "logits": (b, C, TH, TW), "labels": (b, 1, TH, TW)}
        self.contexts = []

    num_io_tensors = property(lambda self: len(self.names))

    def get_tensor_name(self, i):
        return self.names[i]

    def get_tensor_mode(self, name):
        return _Named("INPUT" if name == "image" else "OUTPUT")

    def get_tensor_shape(self, name):
        return self.shapes[name]

    def get_tensor_dtype(self, name):
        return _Named("UINT8" if name == "labels" else "FLOAT")

    def get_tensor_profile_shape(self, name, profile):
        return [(b, 3, TH, TW) for b in (2, 3, 4)]

    def create_execution_context(self):
        self.calls.append(("create_execution_context",))
        if self.fail == "context":
            self.logger.log(FakeTrt.ILogger.Severity.ERROR, "Requested amount of GPU memory could not be allocated")
            return None
        self.contexts.append(FakeContext(self))
        return self.contexts[-1]


class FakeTrt(SimpleNamespace):
    """The slice of the TensorRT module the runner uses."""

    __version__ = "1.7.1.116"

    class ILogger:
        class Severity:
            INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

        def __init__(self):
            pass

    def __init__(self, fail=None, labels=False, batch=None):
        super().__init__(calls=[], fail=fail, logger=None, engines=[], labels=labels, batch=batch)

    def Runtime(self, logger):  # noqa: N802 - TensorRT's name
        self.logger = logger
        self.calls.append(("Runtime",))
        trt = self

        class _Runtime:
            def deserialize_cuda_engine(self, plan):
                trt.calls.append(("deserialize_cuda_engine", plan))
                if trt.fail == "deserialize":
                    logger.log(FakeTrt.ILogger.Severity.ERROR, "Serialization assertion failed: magic tag")
                    return None
                trt.engines.append(FakeEngine(trt, trt.labels, trt.batch))
                return trt.engines[-1]

        return _Runtime()


@pytest.fixture
def fake_engine_file(tmp_path, monkeypatch):
    """An intact engine file + sidecar that fits a faked 'RTX 3090' and the fake's version."""
    import fcn_deploy.trt.runtime as module

    monkeypatch.setattr(module, "gpu_info", lambda device: {"name": "NVIDIA GeForce RTX 3090", "compute_capability": "8.6"})
    engine = _fake_engine(tmp_path)
    sidecar = json.loads(sidecar_path(engine).read_text())
    sidecar.update(
        trt={"flavour": "rtx", "label": "TensorRT-RTX", "version": FakeTrt.__version__},
        target={"portable": True, "compute_capabilities": ["8.6"], "gpu": None},
        parent={"path": "fcn.fp16.onnx", "sha256": "0" * 64},
        source={"path": str(tmp_path / "gone.onnx"), "sha256": "0" * 64},
        tile_hw=[TH, TW],
    )
    sidecar_path(engine).write_text(json.dumps(sidecar))
    return engine


def _executes(calls):
    """Split the call log into the calls before each execute_async_v3 (from the previous one)."""
    groups, current = [], []
    for call in calls:
        current.append(call)
        if call[0] == "execute_async_v3":
            groups.append(current)
            current = []
    return groups


def _expected_logits(tiles):
    return np.stack([(c + 1) * tiles[:, c % 3] for c in range(C)], axis=1)


@pytest.mark.parametrize("labels", [False, True])
def test_call_order_buffers_and_stream(fake_engine_file, labels):
    trt = FakeTrt(labels=labels)
    rng = np.random.default_rng(0)
    tiles = rng.standard_normal((4, 3, TH, TW), dtype=np.float32)
    runner = TensorRTRunner(fake_engine_file, device="cpu", trt=trt)
    with runner:
        assert runner.max_batch == 4 and runner.tile_hw == (TH, TW) and runner.meta["precision"] == "fp16"
        buffers = {name: t.data_ptr() for name, t in runner._buffers.items()}
        logits = runner.infer(tiles[:3])
        masks = runner.infer(tiles[:4], output="labels")
        short = runner.infer(tiles[:1])  # below the profile's min batch 2: padded
        dev = runner.infer(torch.from_numpy(tiles[:2]), output="labels")
    # results: data went through our buffers, sliced back to the batch asked for
    np.testing.assert_array_equal(logits, _expected_logits(tiles[:3]))
    np.testing.assert_array_equal(short, _expected_logits(tiles[:1]))
    argmax = _expected_logits(tiles).argmax(1)
    engine_labels = (argmax + 1) % C
    np.testing.assert_array_equal(masks, engine_labels if labels else argmax)  # the engine's labels when it has them
    assert masks.dtype == np.uint8 and masks.shape == (4, TH, TW)
    assert isinstance(dev, torch.Tensor) and dev.dtype == torch.uint8 and dev.shape == (2, TH, TW)
    np.testing.assert_array_equal(dev.numpy(), (engine_labels if labels else argmax)[:2])

    names = {"image", "logits"} | ({"labels"} if labels else set())
    assert [c[0] for c in trt.calls[:3]] == ["Runtime", "deserialize_cuda_engine", "create_execution_context"]
    assert trt.calls[1][1] == b"plan"
    groups = _executes(trt.calls[3:])
    assert len(groups) == 4
    handles = set()
    for group, batch in zip(groups, (3, 4, 2, 2)):
        kinds = [c[0] for c in group]
        shape_at = kinds.index("set_input_shape")
        assert group[shape_at][1:] == ("image", (batch, 3, TH, TW))
        addresses = {c[1]: c[2] for c in group if c[0] == "set_tensor_address"}
        assert addresses == buffers and set(addresses) == names  # every address, the same buffers each call
        first_address = kinds.index("set_tensor_address")
        assert shape_at < first_address  # input shape before addresses
        assert {c[1] for c in group if c[0] == "get_tensor_shape"} == names - {"image"}
        assert max(i for i, k in enumerate(kinds) if k == "get_tensor_shape") < first_address  # shapes checked first
        assert kinds[-1] == "execute_async_v3"
        handles.add(group[-1][1])
    assert len(handles) == 1 and 0 not in handles  # one non-default stream for every execute
    assert len(trt.engines) == 1 and len(trt.engines[0].contexts) == 1
    assert not runner.is_active and runner._buffers == {} and runner._context is None


@pytest.mark.parametrize(
    "fail, match",
    [
        ("deserialize", r"cannot deserialise it \(Serialization assertion failed: magic tag\); rebuild it: fcn-deploy build-engine"),
        ("context", r"cannot create an execution context .*: Requested amount of GPU memory could not be allocated"),
        ("set_input_shape", r"refused input shape \(3, 3, 32, 48\) .*: IExecutionContext::setInputShape: Error Code 3: shape out of range"),
        ("set_tensor_address", r"set_tensor_address\(image\) failed .*: setTensorAddress: image is misaligned"),
        ("execute", r"execute_async_v3 failed .*: enqueueV3: kernel launch failed"),
        ("output_shape", r"output logits has shape \(4, 4, 32, 48\), expected \(3, 4, 32, 48\)"),
    ],
)
def test_tensorrt_failures_are_one_line_engine_errors(fake_engine_file, fail, match):
    trt = FakeTrt(fail=fail)
    runner = TensorRTRunner(fake_engine_file, device="cpu", trt=trt)
    tiles = np.zeros((3, 3, TH, TW), np.float32)
    with pytest.raises(EngineError, match=match) as err:
        with runner:
            runner.infer(tiles)
    assert "\n" not in str(err.value)
    assert not runner.is_active
    assert "execute_async_v3" not in [c[0] for c in trt.calls] or fail == "execute"


def test_infer_checks_the_tensors_it_is_fed(fake_engine_file):
    with TensorRTRunner(fake_engine_file, device="cpu", trt=FakeTrt()) as runner:
        good = torch.zeros(2, 3, TH, TW)
        assert runner.infer(good).shape == (2, C, TH, TW)
        for bad, words in [
            ([good], "received list, expected numpy.ndarray or torch.Tensor"),
            (good.half(), "received float16 (2, 3, 32, 48)"),
            (torch.zeros(2, 3, TH, TW + 32), "received float32 (2, 3, 32, 80)"),
            (torch.zeros(5, 3, TH, TW), "at most 4 tiles"),
            (good.to("meta"), "on meta"),
        ]:
            with pytest.raises(InputMismatchError, match=re.escape(words)):
                runner.infer(bad)
        with pytest.raises(InputMismatchError, match="at most 4"):
            runner.infer(np.zeros((5, 3, TH, TW), np.float32))


def test_fixed_batch_engine_pads_to_its_batch(fake_engine_file):
    trt = FakeTrt(batch=4)
    with TensorRTRunner(fake_engine_file, device="cpu", trt=trt) as runner:
        assert runner.max_batch == 4 and runner.input_spec.shape[0] == -1
        tiles = np.ones((1, 3, TH, TW), np.float32)
        np.testing.assert_array_equal(runner.infer(tiles), _expected_logits(tiles))
        assert ("set_input_shape", "image", (4, 3, TH, TW)) in trt.calls


def test_device_argument():
    assert TensorRTRunner("x.engine").device == "cuda:0"
    assert TensorRTRunner("x.engine", device=1).device == "cuda:1"
    assert TensorRTRunner("x.engine", device="cuda").device == "cuda:0"
    assert TensorRTRunner("x.engine", device="cuda:2").device == "cuda:2"
    with pytest.raises(Exception, match="cuda:N"):
        TensorRTRunner("x.engine", device="gpu")


def test_results_outlive_the_next_batch_and_execute_gets_the_runner_s_stream(fake_engine_file):
    """Labels and logits are copies, not views of the engine's buffers that the next batch
    overwrites; every execute is queued on the runner's own stream handle."""
    trt = FakeTrt(labels=True)
    tiles = np.random.default_rng(1).standard_normal((4, 3, TH, TW), dtype=np.float32)
    runner = TensorRTRunner(fake_engine_file, device="cpu", trt=trt)
    with runner:
        labels = runner.infer(tiles[:2], output="labels")
        logits = runner.infer(tiles[:2])
        kept_labels, kept_logits = labels.copy(), logits.copy()
        runner.infer(-tiles[2:4], output="labels")
        runner.infer(-tiles[2:4])
        handle = runner._stream.handle
    np.testing.assert_array_equal(labels, kept_labels)
    np.testing.assert_array_equal(logits, kept_logits)
    assert [c[1] for c in trt.calls if c[0] == "execute_async_v3"] == [handle] * 4


def test_activation_names_an_unknown_flavour_and_asks_about_device_0(fake_engine_file, monkeypatch):
    import fcn_deploy.trt.runtime as module

    asked = []
    monkeypatch.setattr(module, "gpu_info", lambda device: asked.append(device) or {
        "name": "NVIDIA GeForce RTX 3090", "compute_capability": "8.6"})
    with TensorRTRunner(fake_engine_file, device="cpu", trt=FakeTrt()):
        pass
    assert asked == [0]  # the CPU stand-in runs as device 0
    sidecar = json.loads(sidecar_path(fake_engine_file).read_text())
    sidecar["trt"]["flavour"] = "onnx-tensorrt"
    sidecar_path(fake_engine_file).write_text(json.dumps(sidecar))
    with pytest.raises(EngineError) as err:
        with TensorRTRunner(fake_engine_file, device="cpu", trt=FakeTrt()):
            pass
    assert str(err.value) == f"{fake_engine_file}: unknown TensorRT flavour 'onnx-tensorrt'"
