"""Runners (torch, onnxruntime) and the backend factory: interface, validation, numerics."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from fcn_deploy.errors import (
    ArtifactNotFoundError,
    ArtifactReadError,
    BackendUnavailableError,
    FcnDeployError,
    InputMismatchError,
    UsageError,
)
from fcn_deploy.model import load_checkpoint
from fcn_deploy.runners import BACKENDS, open_runner
from fcn_deploy.runners.base import argmax_labels
from fcn_deploy.runners.onnxrt import OnnxRuntimeRunner, physical_cores
from fcn_deploy.runners.torch_runner import TorchRunner

SMALL = (64, 96)


def _tiles(n: int, hw=SMALL, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, *hw), dtype=np.float32)


def _assert_labels_agree(labels: np.ndarray, ref_logits: np.ndarray, tol: float) -> None:
    """Labels equal the reference argmax except where its top-2 logits are within ``tol``."""
    ref = argmax_labels(ref_logits)
    top2 = np.sort(ref_logits, axis=1)[:, -2:]
    near_tie = (top2[:, 1] - top2[:, 0]) <= tol
    assert not np.any((labels != ref) & ~near_tie)
    assert (labels == ref).mean() >= 0.9999


@pytest.fixture
def small_torch(checkpoint_path):
    return TorchRunner(checkpoint_path, tile_hw=SMALL)


# -- interface ----------------------------------------------------------------------------
def test_torch_runner_lifecycle(small_torch):
    with pytest.raises(FcnDeployError, match="activated before infer"):
        small_torch.infer(_tiles(1))
    assert not small_torch.is_active
    with small_torch as runner:
        assert runner is small_torch and runner.is_active
        with pytest.raises(FcnDeployError, match="already active"):
            runner.activate()
        runner.infer(_tiles(1))
        assert runner.last_inference_time > 0
    assert not small_torch.is_active
    with small_torch:  # re-activation after deactivate works
        assert small_torch.infer(_tiles(1), output="labels").shape == (1, *SMALL)


def test_torch_input_validation_messages(small_torch):
    with small_torch as runner:
        with pytest.raises(InputMismatchError) as err:
            runner.infer(_tiles(2).astype(np.float64))
        assert str(err.value) == "torch: received float64 (2, 3, 64, 96), expected image float32 (N,3,64,96)"
        with pytest.raises(InputMismatchError, match=r"received float32 \(1, 3, 32, 96\), expected image"):
            runner.infer(_tiles(1, hw=(32, 96)))
        with pytest.raises(InputMismatchError, match=r"received float32 \(3, 64, 96\)"):
            runner.infer(_tiles(1)[0])
        with pytest.raises(InputMismatchError, match="received list"):
            runner.infer(_tiles(1).tolist())
        with pytest.raises(FcnDeployError, match="output must be"):
            runner.infer(_tiles(1), output="probabilities")


def test_torch_logits_equal_model_and_labels_equal_argmax(checkpoint_path, small_torch):
    x = _tiles(3)
    model, _ = load_checkpoint(checkpoint_path)
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    with small_torch as runner:
        logits = runner.infer(x)
        labels = runner.infer(x, output="labels")
    assert logits.dtype == np.float32 and logits.shape == (3, 21, *SMALL)
    np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-5)
    assert labels.dtype == np.uint8 and labels.shape == (3, *SMALL)
    np.testing.assert_array_equal(labels, argmax_labels(logits))


def test_torch_spec_and_meta(small_torch):
    with small_torch as runner:
        assert runner.input_spec.shape == (-1, 3, *SMALL)
        assert runner.input_spec.name == "image" and runner.input_spec.dtype == "float32"
        assert runner.tile_hw == SMALL
        meta = runner.meta
        assert meta["num_classes"] == 21 == len(meta["classes"]) == len(meta["colormap"])
        assert meta["tile_hw"] == list(SMALL) and meta["precision"] == "fp32"
        assert meta["mean"] == pytest.approx([0.485, 0.456, 0.406])


def test_torch_bad_arguments(checkpoint_path, tmp_path):
    with pytest.raises(UsageError, match="fp16 needs --device cuda"):
        TorchRunner(checkpoint_path, precision="fp16")
    with pytest.raises(UsageError, match="multiples of 32"):
        TorchRunner(checkpoint_path, tile_hw=(100, 96))
    with pytest.raises(UsageError, match="--device must be"):
        TorchRunner(checkpoint_path, device="tpu")
    with pytest.raises(UsageError, match="--precision"):
        TorchRunner(checkpoint_path, precision="int8")
    with pytest.raises(ArtifactNotFoundError, match="missing.pt"):
        TorchRunner(tmp_path / "missing.pt").activate()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_torch_cuda_unavailable(small_torch, checkpoint_path):
    runner = TorchRunner(checkpoint_path, device="cuda", tile_hw=SMALL)
    with pytest.raises(BackendUnavailableError, match="sees no CUDA GPU"):
        runner.activate()
    assert not runner.is_active


# -- onnxruntime ---------------------------------------------------------------------------
def test_ort_matches_torch(onnx_path, checkpoint_path):
    x = _tiles(2, hw=(320, 480), seed=1)
    with TorchRunner(checkpoint_path) as ref, OnnxRuntimeRunner(onnx_path) as ort:
        ref_logits = ref.infer(x)
        logits = ort.infer(x)
        labels = ort.infer(x, output="labels")
    assert logits.shape == ref_logits.shape and logits.dtype == np.float32
    assert np.abs(logits - ref_logits).max() <= 1e-3
    assert labels.dtype == np.uint8 and labels.shape == (2, 320, 480)
    _assert_labels_agree(labels, ref_logits, tol=2e-3)


def test_ort_fp16_artifact_agrees(fp16_onnx_path, checkpoint_path):
    x = _tiles(1, hw=(320, 480), seed=4)
    with TorchRunner(checkpoint_path) as ref, open_runner("ort-fp16", fp16_onnx_path) as half:
        ref_logits = ref.infer(x)
        logits = half.infer(x)
        labels = half.infer(x, output="labels")
        assert half.meta["precision"] == "fp16" and half.name == "ort-fp16"
    assert logits.dtype == np.float32 and logits.shape == ref_logits.shape
    np.testing.assert_array_equal(labels, argmax_labels(logits))
    assert (labels == argmax_labels(ref_logits)).mean() >= 0.995


def test_ort_graph_argmax_equals_numpy_argmax(onnx_path):
    x = _tiles(1, hw=(320, 480), seed=2)
    with OnnxRuntimeRunner(onnx_path) as graph, OnnxRuntimeRunner(onnx_path, argmax_in_graph=False) as plain:
        np.testing.assert_array_equal(graph.infer(x, "labels"), argmax_labels(plain.infer(x)))
        np.testing.assert_array_equal(plain.infer(x, "labels"), argmax_labels(plain.infer(x)))


def test_ort_spec_meta_and_threads(onnx_path):
    with OnnxRuntimeRunner(onnx_path, threads=1) as runner:
        assert runner.input_spec.shape == (-1, 3, 320, 480)
        assert runner.input_spec.dtype == "float32"
        assert runner.max_batch is None
        assert runner.meta["threads"] == 1 and runner.meta["providers"] == ["cpu"]
        assert runner.meta["tile_hw"] == [320, 480]
        assert len(runner.meta["classes"]) == 21
        with pytest.raises(InputMismatchError, match=r"ort: received float64 \(1, 3, 320, 480\), expected "):
            runner.infer(_tiles(1, hw=(320, 480)).astype(np.float64))
    assert 1 <= physical_cores() <= os.cpu_count()


def _fixed_batch_onnx(onnx_path, tmp_path, batch: int):
    """A copy of the dynamic-batch export with its batch dimension fixed to ``batch``."""
    model = onnx.load(str(onnx_path))
    for value in (model.graph.input[0], model.graph.output[0]):
        value.type.tensor_type.shape.dim[0].dim_value = batch
    fixed = tmp_path / f"fixed{batch}.onnx"
    onnx.save(model, str(fixed))
    return fixed


def test_ort_fixed_batch_rejects_larger_batch(onnx_path, tmp_path):
    with OnnxRuntimeRunner(_fixed_batch_onnx(onnx_path, tmp_path, 1)) as runner:
        assert runner.max_batch == 1 and runner.input_spec.shape[0] == 1
        assert runner.infer(_tiles(1, hw=(320, 480)), "labels").shape == (1, 320, 480)
        with pytest.raises(InputMismatchError, match=r"received float32 \(2, 3, 320, 480\)"):
            runner.infer(_tiles(2, hw=(320, 480)))


def test_ort_checks_metadata(onnx_path, tmp_path):
    from fcn_deploy.artifacts import embed_meta, meta_from_model

    model = onnx.load(str(onnx_path))
    meta = meta_from_model(model)
    embed_meta(model, {**meta, "num_classes": 5})
    wrong = tmp_path / "wrong.onnx"
    onnx.save(model, str(wrong))
    with pytest.raises(ArtifactReadError, match="outputs 21 classes but its metadata says 5"):
        OnnxRuntimeRunner(wrong).activate()
    del model.metadata_props[:]
    bare = tmp_path / "bare.onnx"
    onnx.save(model, str(bare))
    with pytest.raises(ArtifactReadError, match="carries no fcn-deploy metadata"):
        OnnxRuntimeRunner(bare).activate()


def _tiny_onnx(path, in_shape, out_shape, in_type=TensorProto.FLOAT):
    """An Identity-like graph with the given declared IO shapes."""
    x = helper.make_tensor_value_info("x", in_type, in_shape)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)
    node = helper.make_node("Identity", ["x"], ["y"])
    model = helper.make_model(helper.make_graph([node], "g", [x], [y]), opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path))
    return path


def test_ort_rejects_wrong_input(tmp_path):
    path = _tiny_onnx(tmp_path / "gray.onnx", ["N", 1, 64, 64], ["N", 1, 64, 64])
    with pytest.raises(InputMismatchError) as err:
        OnnxRuntimeRunner(path).activate()
    assert str(err.value) == f"{path}: input is x float32 (N,1,64,64), expected float32 (N,3,H,W) with fixed H and W"
    path = _tiny_onnx(tmp_path / "int.onnx", ["N", 3, 64, 64], ["N", 3, 64, 64], in_type=TensorProto.INT64)
    with pytest.raises(InputMismatchError, match="input is x int64"):
        OnnxRuntimeRunner(path).activate()
    path = _tiny_onnx(tmp_path / "dyn.onnx", ["N", 3, "H", "W"], ["N", 3, "H", "W"])
    with pytest.raises(InputMismatchError, match=r"\(N,3,H,W\), expected .* fixed H and W"):
        OnnxRuntimeRunner(path).activate()


def test_ort_rejects_wrong_output_and_garbage(tmp_path):
    path = _tiny_onnx(tmp_path / "flat.onnx", ["N", 3, 64, 64], ["N", 12288])
    with pytest.raises(ArtifactReadError, match=r"output is y float32 \(N,12288\), expected logits"):
        OnnxRuntimeRunner(path).activate()
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"this is not a protobuf \x00\xff" * 10)
    with pytest.raises(ArtifactReadError, match="garbage.onnx is not a readable ONNX model"):
        OnnxRuntimeRunner(garbage).activate()
    with pytest.raises(ArtifactNotFoundError, match="nothing.onnx not found"):
        OnnxRuntimeRunner(tmp_path / "nothing.onnx").activate()


def test_ort_provider_checks(tmp_path):
    import onnxruntime

    with pytest.raises(UsageError, match="unknown 'rocm'; choose from cpu, cuda, tensorrt"):
        OnnxRuntimeRunner(tmp_path / "x.onnx", providers=("rocm",))
    with pytest.raises(UsageError, match="--threads"):
        OnnxRuntimeRunner(tmp_path / "x.onnx", threads=0)
    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider")
    path = _tiny_onnx(tmp_path / "ok.onnx", ["N", 3, 64, 64], ["N", 3, 64, 64])
    runner = OnnxRuntimeRunner(path, providers="cuda,cpu")
    with pytest.raises(BackendUnavailableError, match=r"no CUDAExecutionProvider .*pip install 'fcn-deploy\[gpu\]'"):
        runner.activate()
    assert not runner.is_active


# -- factory -------------------------------------------------------------------------------
def test_factory_unknown_backend():
    with pytest.raises(UsageError) as err:
        open_runner("tflite")
    assert str(err.value) == "--backend must be one of torch, ort, ort-fp16, ort-int8, ort-int8-cpu, trt, not 'tflite'"
    assert BACKENDS == ("torch", "ort", "ort-fp16", "ort-int8", "ort-int8-cpu", "trt")


def test_factory_missing_defaults_name_the_command(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ArtifactNotFoundError) as err:
        open_runner("torch")
    assert str(err.value) == "checkpoint model.pt not found; run `fcn-deploy train -o model.pt` first"
    with pytest.raises(ArtifactNotFoundError) as err:
        open_runner("ort")
    assert str(err.value) == "ONNX model export/fcn.onnx not found; run `fcn-deploy export model.pt` first"
    with pytest.raises(ArtifactNotFoundError, match=r"out/fcn.fp16.onnx not found; run `fcn-deploy export model.pt -o out/fcn.onnx --fp16`"):
        open_runner("ort-fp16", export_dir="out")


def test_factory_builds_runners(checkpoint_path, tmp_path):
    runner = open_runner("torch", checkpoint_path, tile_hw=SMALL)
    assert isinstance(runner, TorchRunner) and runner.precision == "fp32" and not runner.is_active
    ort = open_runner("ort-fp16", tmp_path / "m.onnx", device="cpu")
    assert isinstance(ort, OnnxRuntimeRunner) and ort.name == "ort-fp16" and ort.providers == ("cpu",)
    gpu = open_runner("ort", tmp_path / "m.onnx", device="cuda:1")
    assert gpu.providers == ("cuda",) and gpu._device_id == 1
    assert open_runner("ort", tmp_path / "m.onnx", threads=1, providers=("cpu",)).threads == 1
    with pytest.raises(UsageError, match="use --backend ort-fp16 for fp16"):
        open_runner("ort", tmp_path / "m.onnx", precision="fp16")
    with pytest.raises(UsageError, match="--device must be"):
        open_runner("ort", tmp_path / "m.onnx", device="gpu")


def test_every_runner_names_its_artifact_and_declares_its_capabilities(checkpoint_path, tmp_path):
    """One attribute for the artifact (bench's JSON reported ``"artifact": ""`` for trt: issue 20)
    and declared capabilities (bench times ``stage``/``run_staged`` only where declared)."""
    from fcn_deploy.runners.base import capabilities_of
    from fcn_deploy.trt.runtime import TensorRTRunner

    engine = tmp_path / "fcn.engine"  # never read: a runner reads its artifact when activated
    runners = [TorchRunner(checkpoint_path), OnnxRuntimeRunner(tmp_path / "m.onnx"), TensorRTRunner(engine)]
    assert [str(r.artifact) for r in runners] == [str(checkpoint_path), str(tmp_path / "m.onnx"), str(engine)]
    staged = [capabilities_of(r).staged for r in runners]
    assert staged == [True, True, False]
    assert all(hasattr(r, "stage") and hasattr(r, "run_staged") for r, s in zip(runners, staged) if s)


# -- torch tensors in, torch tensors out ---------------------------------------------------
def test_torch_tensor_path_equals_numpy_path(small_torch):
    x = _tiles(3, seed=5)
    with small_torch as runner:
        assert runner.device == "cpu"
        logits_np = runner.infer(x)
        labels_np = runner.infer(x, "labels")
        logits = runner.infer(torch.from_numpy(x))
        assert runner.last_inference_time > 0
        labels = runner.infer(torch.from_numpy(x), output="labels")
    assert isinstance(logits, torch.Tensor) and logits.dtype == torch.float32 and logits.device.type == "cpu"
    assert logits.shape == (3, 21, *SMALL) and logits.is_contiguous()
    np.testing.assert_allclose(logits.numpy(), logits_np, rtol=0, atol=1e-5)
    assert labels.dtype == torch.uint8 and labels.shape == (3, *SMALL)
    np.testing.assert_array_equal(labels.numpy(), labels_np)
    logits.mul_(2)  # a normal tensor (not an inference-mode one): callers may update it in place


def test_ort_cpu_tensor_path_equals_numpy_path(onnx_path):
    x = _tiles(2, hw=(320, 480), seed=6)
    with OnnxRuntimeRunner(onnx_path, threads=1) as runner:
        assert runner.device == "cpu"
        logits_np, labels_np = runner.infer(x), runner.infer(x, "labels")
        logits = runner.infer(torch.from_numpy(x))
        labels = runner.infer(torch.from_numpy(x), "labels")
    assert isinstance(logits, torch.Tensor) and logits.dtype == torch.float32 and logits.shape == (2, 21, 320, 480)
    np.testing.assert_array_equal(logits.numpy(), logits_np)
    assert isinstance(labels, torch.Tensor) and labels.dtype == torch.uint8
    np.testing.assert_array_equal(labels.numpy(), labels_np)


def test_tensor_input_validation_messages(small_torch):
    x = torch.from_numpy(_tiles(2))
    with small_torch as runner:
        with pytest.raises(InputMismatchError) as err:
            runner.infer(x.double())
        assert str(err.value) == (
            "torch: received float64 (2, 3, 64, 96) on cpu, expected image float32 (N,3,64,96) on cpu"
        )
        with pytest.raises(InputMismatchError, match=r"received float32 \(2, 3, 64, 64\) on cpu, expected"):
            runner.infer(x[..., :64])
        with pytest.raises(InputMismatchError, match="received an empty batch"):
            runner.infer(x[:0])
        with pytest.raises(InputMismatchError) as err:
            runner.infer(torch.empty((2, 3, *SMALL), device="meta"))
        assert str(err.value) == "torch: received a tensor on meta, expected one on cpu (image float32 (N,3,64,96))"
        assert "\n" not in str(err.value)
        # a non-contiguous view is accepted (made contiguous) and gives the same result
        wide = torch.from_numpy(_tiles(2, hw=(64, 192)))[..., ::2]
        np.testing.assert_allclose(runner.infer(wide).numpy(), runner.infer(wide.contiguous().numpy()), atol=1e-5)


def test_fixed_batch_runner_pads_a_short_tensor_batch(onnx_path, tmp_path):
    tiles = torch.from_numpy(_tiles(3, hw=(320, 480), seed=7))
    with OnnxRuntimeRunner(_fixed_batch_onnx(onnx_path, tmp_path, 3), threads=1) as runner:
        full = runner.infer(tiles)
        short = runner.infer(tiles[:1])
        labels = runner.infer(tiles[1:3], "labels")
        with pytest.raises(InputMismatchError, match="at most 3 tiles per batch"):
            runner.infer(torch.cat([tiles, tiles[:1]]))
    assert short.shape == (1, 21, 320, 480) and torch.allclose(short[0], full[0], atol=1e-4)
    assert labels.shape == (2, 320, 480) and torch.equal(labels, full[1:3].argmax(1).to(torch.uint8))


# -- --device auto ---------------------------------------------------------------------------
def test_resolve_device_on_this_machine(capsys):
    """``auto`` is announced in one line on stderr inside a command (:func:`announce_devices`);
    a library call prints nothing."""
    from fcn_deploy.runners.device import resolve_device

    from fcn_deploy.runners.device import announce_devices

    expected = "cuda:0" if torch.cuda.is_available() else "cpu"
    assert resolve_device("torch", "auto") == expected  # a library call: silent (issue 24)
    assert capsys.readouterr() == ("", "")
    with announce_devices():  # as in every command
        assert resolve_device("torch", "auto") == expected
    line = capsys.readouterr().err.strip()
    assert line.startswith(f"device: {expected} (") and "\n" not in line
    assert capsys.readouterr() == ("", "")  # nothing printed by the library itself
    if expected == "cpu":
        assert line == "device: cpu (no CUDA GPU)"
        with announce_devices():
            assert resolve_device("ort") == "cpu"
    assert resolve_device("trt", "auto", echo=None) == "cuda:0"  # TensorRT always runs on a GPU
    assert capsys.readouterr().err.count("device:") == (1 if expected == "cpu" else 0)


@pytest.mark.parametrize("device, expected", [
    (0, "cuda:0"), (3, "cuda:3"), ("cuda", "cuda:0"), (" CUDA:2 ", "cuda:2"), ("cuda:10", "cuda:10"), ("cpu", "cpu"),
    ("CPU", "cpu"), ("cuda:01", "cuda:1"),
])
def test_parse_device(device, expected):
    from fcn_deploy.runners.device import device_index, is_cuda, parse_device

    assert parse_device(device) == expected
    assert is_cuda(device) == (expected != "cpu")
    if expected != "cpu":
        assert device_index(device) == int(expected[5:])


@pytest.mark.parametrize("device", [-1, "cuda:", "cuda:-1", "cuda:x", "gpu", "0", "cuda0", "", True, None])
def test_parse_device_refusals_are_one_usage_error(device):
    from fcn_deploy.runners.device import parse_device

    with pytest.raises(UsageError, match=r"^--device must be auto, cpu, cuda or cuda:N, not "):
        parse_device(device)


def test_device_index_of_the_cpu_is_an_error():
    from fcn_deploy.runners.device import device_index

    with pytest.raises(UsageError, match="--device cpu has no GPU index"):
        device_index("cpu")


def test_resolve_device_trt_without_gpu_announces_nothing(monkeypatch):
    """issue 24: ``--backend trt`` without a GPU printed "device: cuda:0" before its no-GPU error."""
    from fcn_deploy.runners import device

    monkeypatch.setattr(device, "cuda_gpu", lambda: (False, "no CUDA GPU"))
    lines: list[str] = []
    assert device.resolve_device("trt", "auto", echo=lines.append) == "cuda:0" and lines == []
    monkeypatch.setattr(device, "cuda_gpu", lambda: (True, "NVIDIA H200"))
    assert device.resolve_device("trt", "auto", echo=lines.append) == "cuda:0"
    assert lines == ["device: cuda:0 (NVIDIA H200)"]


def test_resolve_device_explicit_values_are_normalised(capsys):
    from fcn_deploy.runners.device import resolve_device

    assert resolve_device("ort", "cpu") == "cpu"
    assert resolve_device("torch", " CUDA ") == "cuda:0"
    assert resolve_device("trt", "cuda:01") == "cuda:1"
    assert capsys.readouterr().err == ""  # only "auto" is announced
    for bad in ("gpu", "cuda:x", "", "cuda:-1"):
        with pytest.raises(UsageError, match="--device must be auto, cpu, cuda or cuda:N"):
            resolve_device("torch", bad)


@pytest.fixture
def fake_gpu(monkeypatch):
    """torch reports one CUDA GPU named "Fake GPU" (nothing runs on it)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake GPU")


@pytest.mark.parametrize("providers, ort_device", [
    (["CPUExecutionProvider"], "cpu"),
    (["CUDAExecutionProvider", "CPUExecutionProvider"], "cuda:0"),
])
def test_resolve_device_auto_with_a_gpu(fake_gpu, monkeypatch, providers, ort_device):
    import onnxruntime

    from fcn_deploy.runners.device import resolve_device

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: list(providers))
    lines = []
    assert resolve_device("torch", echo=lines.append) == "cuda:0"
    assert resolve_device("ort", echo=lines.append) == ort_device
    assert resolve_device("ort-fp16", echo=lines.append) == ort_device
    assert resolve_device("trt", echo=lines.append) == "cuda:0"
    assert lines[0] == "device: cuda:0 (Fake GPU)"
    if ort_device == "cpu":
        assert lines[1].startswith("device: cpu (onnxruntime ") and "has no CUDAExecutionProvider" in lines[1]
    else:
        assert lines[1] == "device: cuda:0 (Fake GPU)"


def test_resolve_device_auto_without_a_gpu(monkeypatch):
    import onnxruntime

    from fcn_deploy.runners.device import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    lines = []
    assert resolve_device("torch", echo=lines.append) == "cpu"
    assert resolve_device("ort", echo=lines.append) == "cpu"  # onnxruntime-gpu without a GPU
    assert lines == ["device: cpu (no CUDA GPU)"] * 2


def test_factory_auto_device_picks_the_backend_runtime(fake_gpu, monkeypatch, checkpoint_path, tmp_path, capsys):
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    from fcn_deploy.runners.device import announce_devices

    with announce_devices():
        torch_runner = open_runner("torch", checkpoint_path)
        ort = open_runner("ort", tmp_path / "m.onnx")
    assert torch_runner.device == "cuda:0" and torch_runner.channels_last is False
    assert ort.providers == ("cuda",) and ort.device == "cuda:0"
    assert capsys.readouterr().err.splitlines() == ["device: cuda:0 (Fake GPU)"] * 2
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    cpu = open_runner("ort", tmp_path / "m.onnx")
    assert cpu.providers == ("cpu",) and cpu.device == "cpu"
    assert open_runner("torch", checkpoint_path, device="cpu").device == "cpu"


def test_cli_device_defaults_are_auto():
    from fcn_deploy.cli import cli

    for name in ("infer", "check", "evaluate", "bench"):
        option = next(p for p in cli.commands[name].params if p.name == "device")
        assert option.default == "auto", name


# -- onnxruntime CUDA provider options -------------------------------------------------------
def test_cuda_provider_options_are_configurable():
    from fcn_deploy.runners.onnxrt import parse_cuda_options, provider_list

    options = parse_cuda_options("cudnn_conv_algo_search=HEURISTIC, prefer_nhwc=1,")
    assert options == {"cudnn_conv_algo_search": "HEURISTIC", "prefer_nhwc": "1"}
    assert parse_cuda_options({"enable_cuda_graph": True}) == {"enable_cuda_graph": "1"}
    assert parse_cuda_options(None) == {}
    cuda, cpu = provider_list(("cuda",), 0, {"use_tf32": "1", **options})
    assert cuda == ("CUDAExecutionProvider", {"device_id": 0, "use_tf32": "1", **options})
    with pytest.raises(UsageError, match="'prefer_nhwc' is not key=value"):
        parse_cuda_options("prefer_nhwc")
    with pytest.raises(UsageError, match="user_compute_stream is set by the runner"):
        parse_cuda_options({"user_compute_stream": "0"})
    runner = OnnxRuntimeRunner("x.onnx", providers="cuda", cuda_options="enable_cuda_graph=1", max_batch=8)
    assert runner.cuda_graph and runner.device == "cuda:0" and runner.cuda_options == {"enable_cuda_graph": "1"}
    assert not OnnxRuntimeRunner("x.onnx", cuda_options="enable_cuda_graph=1").cuda_graph  # CPU provider
    with pytest.raises(UsageError, match="max_batch"):
        OnnxRuntimeRunner("x.onnx", max_batch=0)


# -- CUDA (skipped without a GPU) ------------------------------------------------------------
@pytest.mark.gpu
def test_torch_cuda_fp32_matches_cpu_and_fp16_agrees(checkpoint_path):
    x = _tiles(4, hw=(320, 480), seed=3)
    with TorchRunner(checkpoint_path) as cpu:
        ref = cpu.infer(x)
    tf32_before = torch.backends.cudnn.conv.fp32_precision
    with TorchRunner(checkpoint_path, device="cuda") as gpu:
        assert torch.backends.cudnn.conv.fp32_precision == "ieee"
        first = gpu.infer(x[:2])
        second = gpu.infer(x[2:])  # same pinned buffer: ``first`` must not alias it
        logits = gpu.infer(x)  # grows the buffer
        labels = gpu.infer(x, output="labels")
        assert np.abs(first - ref[:2]).max() <= 1e-3 and np.abs(second - ref[2:]).max() <= 1e-3
        staged = gpu.stage(x)
        assert staged.is_cuda
        gpu.run_staged(staged)
    assert torch.backends.cudnn.conv.fp32_precision == tf32_before
    assert logits.dtype == np.float32 and np.abs(logits - ref).max() <= 1e-3
    np.testing.assert_array_equal(labels, argmax_labels(logits))
    _assert_labels_agree(labels, ref, tol=2e-3)
    for channels_last in (False, True):
        with TorchRunner(checkpoint_path, device="cuda", precision="fp16", channels_last=channels_last) as half:
            half_logits = half.infer(x)
            half_labels = half.infer(x, output="labels")
        assert half_logits.dtype == np.float16 and half_logits.shape == ref.shape
        assert half_labels.dtype == np.uint8
        assert (half_labels == argmax_labels(ref)).mean() >= 0.995


def test_cuda_provider_disables_tf32_and_keeps_cpu_fallback():
    from fcn_deploy.runners.onnxrt import provider_list

    assert provider_list(("cpu",)) == ["CPUExecutionProvider"]
    cuda, cpu = provider_list(("cuda",), device_id=1)
    assert cuda == ("CUDAExecutionProvider", {"device_id": 1, "use_tf32": 0}) and cpu == "CPUExecutionProvider"
    trt, cuda, cpu = provider_list(("tensorrt", "cuda"))
    assert trt[0] == "TensorrtExecutionProvider" and cuda[1]["use_tf32"] == 0 and cpu == "CPUExecutionProvider"


def test_fixed_batch_runner_pads_a_short_batch(onnx_path, tmp_path):
    tiles = _tiles(3, hw=(320, 480))
    with OnnxRuntimeRunner(_fixed_batch_onnx(onnx_path, tmp_path, 3)) as runner:
        full = runner.infer(tiles)
        short = runner.infer(tiles[:1])
        labels = runner.infer(tiles[:2], "labels")
    assert short.shape == (1, 21, 320, 480) and np.allclose(short[0], full[0], atol=1e-4)
    assert labels.shape == (2, 320, 480) and np.array_equal(labels, full[:2].argmax(1))


def test_every_command_refuses_a_stale_onnx_the_same_way(checkpoint_path, onnx_path, fp16_onnx_path, tmp_path):
    """Issue 10, structure 1: `infer --backend ort` never checked staleness; now open_runner
    (infer, evaluate, bench) resolves through fcn_deploy.chain like check does."""
    import shutil

    import onnx
    from click.testing import CliRunner

    from fcn_deploy.artifacts import embed_meta, meta_from_model
    from fcn_deploy.chain import resolve
    from fcn_deploy.cli import cli
    from fcn_deploy.errors import StaleArtifactError
    from fcn_deploy.fileio import sha256_file
    from fcn_deploy.model import FCN, save_checkpoint

    export = tmp_path / "export"
    export.mkdir()
    ckpt = tmp_path / "model.pt"
    shutil.copy(checkpoint_path, ckpt)
    model = onnx.load(onnx_path)
    meta = meta_from_model(model)
    meta["parent"] = {"path": str(ckpt), "sha256": sha256_file(ckpt)}
    embed_meta(model, meta)
    onnx.save(model, export / "fcn.onnx")  # new bytes: the fixture's fcn.fp16.onnx is now stale
    shutil.copy(fp16_onnx_path, export / "fcn.fp16.onnx")
    assert resolve("ort", export_dir=export).stale is None
    with pytest.raises(StaleArtifactError, match=r"fcn.fp16.onnx is stale for .*fcn.onnx: it was made from .*fcn.onnx .*to make it from .*: fcn-deploy export"):
        open_runner("ort-fp16", export_dir=export)
    torch.manual_seed(3)
    save_checkpoint(ckpt, FCN().eval())  # the checkpoint changes: fcn.onnx is stale too
    with pytest.raises(StaleArtifactError, match=r"fcn.onnx is stale: .*model.pt has changed since it was made from it \(sha256 \w+ then, \w+ now\)"):
        open_runner("ort", export_dir=export)
    photos = tmp_path / "photos"
    photos.mkdir()
    res = CliRunner().invoke(cli, ["infer", str(photos), "-o", str(tmp_path / "out"), "--backend", "ort",
                                   "--model", str(export / "fcn.onnx")])
    assert res.exit_code == 2 and "error: " in res.output and "fcn.onnx is stale" in res.output, res.output
    # a parent that is absent does not make an artifact stale (a user who only has the ONNX)
    ckpt.unlink()
    assert resolve("ort", export_dir=export).stale is None
    (export / "fcn.onnx").unlink()
    assert resolve("ort-fp16", export_dir=export).stale is None


def test_registry_lists_every_backend_once():
    from fcn_deploy.runners.registry import CHECK_BACKENDS, REGISTRY, get_backend

    assert CHECK_BACKENDS == ("ort", "ort-fp16", "ort-int8", "ort-int8-cpu", "trt")
    assert {s.name: (s.artifact, s.precision) for s in REGISTRY.values()} == {
        "torch": ("checkpoint", None), "ort": ("onnx", "fp32"), "ort-fp16": ("onnx", "fp16"),
        "ort-int8": ("onnx", "int8"), "ort-int8-cpu": ("onnx", "int8"), "trt": ("engine", None)}
    assert get_backend("ort").available() is None  # onnxruntime is installed here
    missing = get_backend("ort").__class__("x", "fp32", "onnx", None, ("no_such_module_fcn",), "pip install x", "")
    assert missing.available() == "--backend x needs no_such_module_fcn, which is not installed; pip install x"


def test_missing_onnxruntime_names_both_extras(monkeypatch):
    import sys

    from fcn_deploy.errors import BackendUnavailableError
    from fcn_deploy.runners.ortimport import import_onnxruntime

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    with pytest.raises(BackendUnavailableError, match=r"pip install 'fcn-deploy\[cpu\]' .* or 'fcn-deploy\[gpu\]'"):
        import_onnxruntime()

@pytest.mark.gpu
def test_torch_cuda_tensor_path_stays_on_the_device(checkpoint_path):
    x = _tiles(4, hw=(320, 480), seed=8)
    with TorchRunner(checkpoint_path) as cpu:
        ref = cpu.infer(x)
    t = torch.from_numpy(x).cuda()
    with TorchRunner(checkpoint_path, device="cuda") as gpu:
        assert gpu.device == "cuda:0" and not gpu.channels_last
        logits, labels = gpu.infer(t), gpu.infer(t, "labels")
        assert logits.device == t.device and labels.device == t.device and labels.dtype == torch.uint8
        assert gpu.last_inference_time > 0 and gpu.total_inference_time >= gpu.last_inference_time
        with pytest.raises(InputMismatchError, match="received a tensor on cpu, expected one on cuda:0"):
            gpu.infer(torch.from_numpy(x))
    assert np.abs(logits.cpu().numpy() - ref).max() <= 1e-3
    _assert_labels_agree(labels.cpu().numpy(), ref, tol=2e-3)
    with TorchRunner(checkpoint_path, device="cuda", precision="fp16") as half:
        assert half.channels_last  # the fp16 default
        out, lab = half.infer(t), half.infer(t, "labels")
    assert out.dtype == torch.float16 and out.is_contiguous() and out.shape == ref.shape
    assert (lab.cpu().numpy() == argmax_labels(ref)).mean() >= 0.995


@pytest.mark.gpu
@pytest.mark.parametrize("cuda_graph", [False, True])
def test_ort_cuda_tensor_path_binds_device_memory_in_stream_order(onnx_path, cuda_graph):
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        pytest.skip("needs onnxruntime-gpu")
    x = _tiles(3, hw=(320, 480), seed=9)
    with OnnxRuntimeRunner(onnx_path) as cpu:
        ref = cpu.infer(x)
    options = {"enable_cuda_graph": 1} if cuda_graph else None
    t = torch.from_numpy(x).cuda()
    with OnnxRuntimeRunner(onnx_path, providers="cuda", cuda_options=options, max_batch=4) as gpu:
        assert gpu.device == "cuda:0"
        side = torch.cuda.Stream()
        with torch.cuda.stream(side):  # the caller's stream: the input exists only after a delay
            tiles = torch.zeros_like(t)
            torch.cuda._sleep(50_000_000)
            tiles.copy_(t)
            logits = gpu.infer(tiles)
            labels = gpu.infer(tiles, "labels")
            again = gpu.infer(tiles[:2] * 0)  # must not change ``logits`` (graph mode reuses buffers)
        side.synchronize()
        host = gpu.infer(x)
        assert gpu.total_inference_time > 0
    assert logits.device == t.device and logits.dtype == torch.float32 and logits.shape == (3, 21, 320, 480)
    assert np.abs(logits.cpu().numpy() - ref).max() <= 1e-3
    assert np.abs(host - ref).max() <= 1e-3
    assert labels.dtype == torch.uint8 and torch.equal(labels, logits.argmax(1).to(torch.uint8))
    assert again.shape == (2, 21, 320, 480) and not torch.equal(again, logits[:2])


def test_ort_cuda_tensor_call_order_with_a_recording_fake(onnx_path, monkeypatch):
    """Our side of the IO-binding path, against recording fakes of the onnxruntime session and the
    torch streams (the real thing runs in the gpu-marked test above): the runner's stream waits
    for the caller's before the run, the input and a fresh output are bound by pointer with the
    right dtype and shape, and the caller's stream waits for the runner's after it."""
    log: list = []

    class Stream:
        def __init__(self, name):
            self.name = name

        def wait_stream(self, other):
            log.append(("wait", self.name, other.name))

        def synchronize(self):
            log.append(("synchronize", self.name))

    class Binding:
        def bind_input(self, *args):
            log.append(("bind_input", *args))

        def bind_output(self, *args):
            log.append(("bind_output", *args))

    class Session:
        def io_binding(self):
            return Binding()

        def run_with_iobinding(self, binding, run_options):
            log.append(("run", run_options))

    caller = Stream("caller")
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: caller)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: __import__("contextlib").nullcontext())
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda t, s: log.append(("record", t.data_ptr(), s.name)))
    tiles = torch.from_numpy(_tiles(2, hw=(320, 480)))
    with OnnxRuntimeRunner(onnx_path, threads=1) as runner:
        runner._torch, runner._stream, runner._run_options = torch, Stream("ort"), "no-sync"
        runner._session = Session()
        for output, name, shape, dtype in (("logits", "logits", (2, 21, 320, 480), np.float32),
                                           ("labels", runner._labels_name, (2, 320, 480), np.uint8)):
            log.clear()
            result = runner._infer_tensor(tiles, output)
            assert tuple(result.shape) == shape and result.dtype == getattr(torch, np.dtype(dtype).name)
            assert log == [
                ("wait", "ort", "caller"),
                ("bind_input", "image", "cuda", 0, np.dtype(np.float32), (2, 3, 320, 480), tiles.data_ptr()),
                ("bind_output", name, "cuda", 0, np.dtype(dtype), shape, result.data_ptr()),
                ("run", "no-sync"),
                ("wait", "caller", "ort"),
                ("record", tiles.data_ptr(), "ort"),
                ("record", result.data_ptr(), "caller"),
            ]
        log.clear()
    assert log == [("synchronize", "ort")]  # deactivate waits for the runner's stream
