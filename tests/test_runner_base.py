"""The runner interface every backend shares (fcn_deploy.runners.base): activate / infer /
deactivate and ``with``, input checks that say "received X, expected Y", padding of a fixed
batch, the device-tensor path on CPU tensors, and the timing bookkeeping. The runner under test
is a real 1x1 convolution in numpy (no model file), checked against torch's conv2d."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch

from fcn_deploy.errors import FcnDeployError, InputMismatchError
from fcn_deploy.runners import base
from fcn_deploy.runners.base import Runner, TensorSpec, argmax_labels, is_tensor

TILE = (8, 12)
CLASSES = 4


class ConvRunner(Runner):
    """A 1x1 convolution (3 -> 4 classes, fixed random weights) in numpy; records each call."""

    name = "conv"

    def __init__(self, batch: int = -1, max_batch: int | None = None, fail_deactivate: bool = False):
        super().__init__()
        rng = np.random.default_rng(0)
        self.weight = rng.standard_normal((CLASSES, 3)).astype(np.float32)
        self.bias = rng.standard_normal(CLASSES).astype(np.float32)
        self._spec = TensorSpec("image", (batch, 3, *TILE), "float32")
        self._max_batch = max_batch
        self.fail_deactivate = fail_deactivate
        self.activations = self.deactivations = 0
        self.seen: list[np.ndarray] = []  # the arrays _infer received

    def _activate(self):
        self.activations += 1
        self.input_spec = self._spec
        self.max_batch = self._max_batch

    def _deactivate(self):
        self.deactivations += 1
        if self.fail_deactivate:
            raise RuntimeError("device lost")

    def _infer(self, tiles, output):
        self.seen.append(tiles)
        logits = np.einsum("ck,nkhw->nchw", self.weight, tiles) + self.bias[:, None, None]
        return argmax_labels(logits) if output == "labels" else logits.astype(np.float32)

    def reference(self, tiles: np.ndarray) -> np.ndarray:
        """The same convolution by torch."""
        w = torch.from_numpy(self.weight)[:, :, None, None]
        return torch.nn.functional.conv2d(torch.from_numpy(tiles), w, torch.from_numpy(self.bias)).numpy()


def _tiles(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, *TILE)).astype(np.float32)


class FakeClock:
    """``time.perf_counter`` stand-in: each call advances by ``step`` seconds."""

    def __init__(self, step: float):
        self.now, self.step = 0.0, step

    def perf_counter(self) -> float:
        self.now += self.step
        return self.now


class FakeEvent:
    """A recording stand-in for a torch.cuda.Event pair's end (our bookkeeping only)."""

    def __init__(self, log: list, name: str, ms: float = 0.0):
        self.log, self.name, self.ms = log, name, ms

    def synchronize(self):
        self.log.append(("sync", self.name))

    def elapsed_time(self, end):
        self.log.append(("elapsed", self.name, end.name))
        return end.ms


# -- TensorSpec, is_tensor, argmax_labels --------------------------------------------------------
def test_tensor_spec_describes_dynamic_dimensions_as_n():
    assert TensorSpec("image", (-1, 3, 8, 12), "float32").describe() == "image float32 (N,3,8,12)"
    assert TensorSpec("logits", (2, 0, 5), "float16").describe() == "logits float16 (2,0,5)"


def test_is_tensor_without_and_with_torch(monkeypatch):
    assert is_tensor(torch.zeros(1))
    assert not is_tensor(np.zeros(1)) and not is_tensor([0.0])
    monkeypatch.delitem(sys.modules, "torch")
    assert not is_tensor(np.zeros(1))  # no torch imported: nothing is a tensor


def test_argmax_labels_first_maximum_and_nan():
    logits = np.random.default_rng(2).standard_normal((3, CLASSES, 5, 7)).astype(np.float32)
    logits[0, :, 0, 0] = [1, 3, 3, 0]  # a tie: the first maximum wins
    logits[1, 2, 1, 1] = np.nan
    labels = argmax_labels(logits)
    expected = logits.argmax(1).astype(np.uint8)
    expected[1, 1, 1] = 255
    assert labels.dtype == np.uint8 and labels.shape == (3, 5, 7)
    np.testing.assert_array_equal(labels, expected)
    assert labels[0, 0, 0] == 1
    empty = argmax_labels(np.zeros((0, CLASSES, 5, 7), np.float32))
    assert empty.shape == (0, 5, 7) and empty.dtype == np.uint8


# -- lifecycle --------------------------------------------------------------------------------
def test_activate_deactivate_and_with():
    runner = ConvRunner()
    assert runner.is_active is False and runner.input_spec is None
    assert runner.activate() is runner and runner.is_active and runner.activations == 1
    with pytest.raises(FcnDeployError, match=r"^conv runner is already active$"):
        runner.activate()
    assert runner.activations == 1
    runner.deactivate()
    runner.deactivate()  # idempotent: the backend is released once
    assert runner.is_active is False and runner.deactivations == 1
    with runner as same:
        assert same is runner and runner.is_active and runner.activations == 2
    assert not runner.is_active and runner.deactivations == 2


def test_with_deactivates_on_error_and_a_failing_deactivate_still_leaves_inactive():
    runner = ConvRunner()
    with pytest.raises(KeyError):
        with runner:
            raise KeyError("boom")
    assert not runner.is_active and runner.deactivations == 1
    failing = ConvRunner(fail_deactivate=True).activate()
    failing._pending = [(FakeEvent([], "s"), FakeEvent([], "e", 1.0))]
    with pytest.raises(RuntimeError, match="device lost"):
        failing.deactivate()
    assert failing.is_active is False
    failing.activate()  # can be activated again
    assert failing.is_active


def test_tile_hw_needs_activation():
    runner = ConvRunner()
    with pytest.raises(FcnDeployError, match=r"^conv runner: input spec unknown before activate\(\)$"):
        runner.tile_hw
    runner.activate()
    assert runner.tile_hw == TILE and all(type(v) is int for v in runner.tile_hw)


# -- numpy inference ----------------------------------------------------------------------------
def test_infer_logits_and_labels_equal_the_reference_convolution():
    tiles = _tiles(5)
    with ConvRunner() as runner:
        logits = runner.infer(tiles)
        default = runner.infer(tiles, output="logits")
        labels = runner.infer(tiles, output="labels")
        ref = runner.reference(tiles)
    assert isinstance(logits, np.ndarray) and logits.shape == (5, CLASSES, *TILE)
    np.testing.assert_allclose(logits, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(default, logits)
    assert labels.dtype == np.uint8 and labels.shape == (5, *TILE)
    np.testing.assert_array_equal(labels, ref.argmax(1))


def test_infer_refuses_an_unknown_output_and_an_inactive_runner():
    runner = ConvRunner()
    with pytest.raises(FcnDeployError, match=r"^conv runner must be activated before infer\(\)$"):
        runner.infer(_tiles(1))
    with pytest.raises(FcnDeployError, match=r"^conv runner must be activated before infer\(\)$"):
        runner.infer(torch.from_numpy(_tiles(1)))
    runner.activate()
    with pytest.raises(FcnDeployError, match=r"^output must be 'logits' or 'labels', not 'probs'$"):
        runner.infer(_tiles(1), output="probs")


@pytest.mark.parametrize("tiles, message", [
    (np.zeros((2, 3, 8, 12), np.float64),
     "conv: received float64 (2, 3, 8, 12), expected image float32 (N,3,8,12)"),
    (np.zeros((3, 8, 12), np.float32), "conv: received float32 (3, 8, 12), expected image float32 (N,3,8,12)"),
    (np.zeros((2, 3, 8, 12, 1), np.float32),
     "conv: received float32 (2, 3, 8, 12, 1), expected image float32 (N,3,8,12)"),
    (np.zeros((2, 4, 8, 12), np.float32), "conv: received float32 (2, 4, 8, 12), expected image float32 (N,3,8,12)"),
    (np.zeros((2, 3, 9, 12), np.float32), "conv: received float32 (2, 3, 9, 12), expected image float32 (N,3,8,12)"),
    (np.zeros((2, 3, 8, 11), np.float32), "conv: received float32 (2, 3, 8, 11), expected image float32 (N,3,8,12)"),
    (np.zeros((0, 3, 8, 12), np.float32), "conv: received an empty batch float32 (0, 3, 8, 12)"),
    ([[0.0]], "conv: received list, expected numpy.ndarray or torch.Tensor image float32 (N,3,8,12)"),
])
def test_numpy_input_checks_say_received_and_expected(tiles, message):
    with ConvRunner() as runner:
        with pytest.raises(InputMismatchError) as err:
            runner.infer(tiles)
        assert str(err.value) == message
        assert runner.seen == []


@pytest.mark.parametrize("fixed, max_batch, limit", [(-1, 4, 4), (3, None, 3), (3, 2, 2), (2, 5, 2), (1, None, 1),
                                                     (-1, 1, 1)])
def test_batch_limits_from_max_batch_and_a_fixed_batch(fixed, max_batch, limit):
    with ConvRunner(batch=fixed, max_batch=max_batch) as runner:
        out = runner.infer(_tiles(limit))
        assert out.shape[0] == limit
        with pytest.raises(InputMismatchError) as err:
            runner.infer(_tiles(limit + 1))
    assert str(err.value) == (f"conv: received float32 ({limit + 1}, 3, 8, 12), "
                              f"at most {limit} tiles per batch allowed")


def test_unbounded_dynamic_batch():
    with ConvRunner() as runner:
        assert runner.infer(_tiles(40)).shape == (40, CLASSES, *TILE)


@pytest.mark.parametrize("tensor", [False, True])
def test_one_tile_on_a_fixed_batch_is_padded(tensor):
    tile = _tiles(1, seed=4)
    with ConvRunner(batch=3) as runner:
        out = runner.infer(torch.from_numpy(tile) if tensor else tile)
        fed = runner.seen[0]
    assert fed.shape == (3, 3, *TILE) and fed.dtype == np.float32 and not fed[1:].any()
    assert out.shape == (1, CLASSES, *TILE)
    np.testing.assert_allclose(np.asarray(out), runner.reference(tile), rtol=1e-5, atol=1e-5)


def test_fixed_batch_is_padded_with_zero_tiles_and_their_outputs_dropped():
    tiles = _tiles(2)
    with ConvRunner(batch=3) as runner:
        logits = runner.infer(tiles)
        labels = runner.infer(tiles, output="labels")
        full = runner.infer(_tiles(3))
        assert logits.shape == (2, CLASSES, *TILE) and labels.shape == (2, *TILE) and full.shape[0] == 3
        fed = runner.seen[0]
        assert fed.shape == (3, 3, *TILE) and fed.dtype == np.float32
        np.testing.assert_array_equal(fed[:2], tiles)
        assert not fed[2].any()
        assert runner.seen[2].shape == (3, 3, *TILE)
        np.testing.assert_allclose(logits, runner.reference(tiles), rtol=1e-5, atol=1e-5)


def test_non_contiguous_input_reaches_the_backend_contiguous():
    tiles = np.asfortranarray(_tiles(3))
    assert not tiles.flags.c_contiguous
    with ConvRunner() as runner:
        logits = runner.infer(tiles)
        assert runner.seen[0].flags.c_contiguous
        np.testing.assert_array_equal(runner.seen[0], tiles)
        np.testing.assert_allclose(logits, runner.reference(np.ascontiguousarray(tiles)), rtol=1e-5, atol=1e-5)


# -- tensor inference (CPU tensors) -------------------------------------------------------------
def test_cpu_tensor_path_equals_numpy_path():
    tiles = _tiles(4)
    with ConvRunner() as runner:
        logits = runner.infer(torch.from_numpy(tiles))
        labels = runner.infer(torch.from_numpy(tiles), output="labels")
        ref = runner.infer(tiles)
    assert isinstance(logits, torch.Tensor) and logits.device.type == "cpu"
    np.testing.assert_array_equal(logits.numpy(), ref)
    assert labels.dtype == torch.uint8 and labels.shape == (4, *TILE)
    np.testing.assert_array_equal(labels.numpy(), ref.argmax(1))


def test_tensor_path_detaches_makes_contiguous_and_pads_a_fixed_batch():
    base_tiles = torch.from_numpy(_tiles(2)).to(memory_format=torch.channels_last).requires_grad_(True)
    assert not base_tiles.is_contiguous()
    with ConvRunner(batch=3) as runner:
        logits = runner.infer(base_tiles)
        fed = runner.seen[0]
        assert fed.shape == (3, 3, *TILE) and fed.flags.c_contiguous and not fed[2].any()
        np.testing.assert_array_equal(fed[:2], base_tiles.detach().numpy())
        assert logits.shape == (2, CLASSES, *TILE) and not logits.requires_grad
        np.testing.assert_allclose(logits.numpy(), runner.reference(_tiles(2)), rtol=1e-5, atol=1e-5)


def test_tensor_checks_say_received_and_expected():
    with ConvRunner(max_batch=2) as runner:
        with pytest.raises(InputMismatchError) as err:
            runner.infer(torch.zeros((2, 3, 8, 12), dtype=torch.float64))
        assert str(err.value) == ("conv: received float64 (2, 3, 8, 12) on cpu, "
                                  "expected image float32 (N,3,8,12) on cpu")
        with pytest.raises(InputMismatchError) as err:
            runner.infer(torch.zeros((2, 3, 7, 12)))
        assert str(err.value) == ("conv: received float32 (2, 3, 7, 12) on cpu, "
                                  "expected image float32 (N,3,8,12) on cpu")
        with pytest.raises(InputMismatchError) as err:
            runner.infer(torch.zeros((3, 3, 8, 12)))
        assert str(err.value) == "conv: received float32 (3, 3, 8, 12) on cpu, at most 2 tiles per batch allowed"
        runner.device = "cuda:0"  # where the runner wants its tensors
        with pytest.raises(InputMismatchError) as err:
            runner.infer(torch.zeros((2, 3, 8, 12)))
        assert str(err.value) == ("conv: received a tensor on cpu, expected one on cuda:0 "
                                  "(image float32 (N,3,8,12))")
        assert runner.seen == []
        runner.device = "cpu"
        assert runner.infer(torch.zeros((2, 3, 8, 12))).shape == (2, CLASSES, *TILE)


class TensorConvRunner(ConvRunner):
    """The same convolution on torch tensors (a backend that takes device tensors)."""

    def _infer_tensor(self, tiles, output):
        self.seen.append(tiles)
        w = torch.from_numpy(self.weight)[:, :, None, None]
        logits = torch.nn.functional.conv2d(tiles, w, torch.from_numpy(self.bias))
        return logits.argmax(1).to(torch.uint8) if output == "labels" else logits


def test_a_tensor_backend_gets_the_checked_tensor_and_padding():
    tiles = _tiles(2)
    with TensorConvRunner(batch=3) as runner:
        out = runner.infer(torch.from_numpy(tiles).to(memory_format=torch.channels_last))
        fed = runner.seen[0]
        assert isinstance(fed, torch.Tensor) and fed.shape == (3, 3, *TILE) and fed.is_contiguous()
        assert not fed[2].any()
        np.testing.assert_allclose(out.numpy(), runner.reference(tiles), rtol=1e-5, atol=1e-5)
        labels = runner.infer(torch.from_numpy(tiles), output="labels")
        assert labels.shape == (2, *TILE)


# -- timing -------------------------------------------------------------------------------------
def test_host_timing_last_and_total(monkeypatch):
    monkeypatch.setattr(base, "time", types.SimpleNamespace(perf_counter=FakeClock(0.25).perf_counter))
    runner = ConvRunner()
    assert runner.last_inference_time == 0.0 and runner.total_inference_time == 0.0
    with runner:
        runner.infer(_tiles(1))
        assert runner.last_inference_time == 0.25 and runner.total_inference_time == 0.25
        runner.infer(torch.from_numpy(_tiles(1)))  # a CPU tensor: host wall time too
        assert runner.last_inference_time == 0.25 and runner.total_inference_time == 0.5
    assert runner.total_inference_time == 0.5  # still readable after deactivate
    with runner:  # a new activation starts from zero
        assert runner.last_inference_time == 0.0 and runner.total_inference_time == 0.0


def test_a_failed_infer_adds_no_time(monkeypatch):
    monkeypatch.setattr(base, "time", types.SimpleNamespace(perf_counter=FakeClock(1.0).perf_counter))
    with ConvRunner() as runner:
        with pytest.raises(InputMismatchError):
            runner.infer(_tiles(1)[:, :2])
        assert runner.total_inference_time == 0.0


def test_device_timings_are_read_in_order_and_at_deactivate():
    log: list = []
    runner = ConvRunner().activate()
    runner._add_time(1.0)
    runner._pending = [(FakeEvent(log, "s1"), FakeEvent(log, "e1", 20.0)),
                       (FakeEvent(log, "s2"), FakeEvent(log, "e2", 30.0)),
                       (FakeEvent(log, "s3"), FakeEvent(log, "e3", 50.0))]
    runner._resolve_timings(keep=1)  # what the CUDA path does after each call
    assert log == [("sync", "e1"), ("elapsed", "s1", "e1"), ("sync", "e2"), ("elapsed", "s2", "e2")]
    assert len(runner._pending) == 1
    assert runner._last_time == pytest.approx(0.03) and runner._total_time == pytest.approx(1.05)
    runner.deactivate()  # resolves what is left before the backend goes
    assert runner._pending == [] and log[-1] == ("elapsed", "s3", "e3")
    assert runner.last_inference_time == pytest.approx(0.05)
    assert runner.total_inference_time == pytest.approx(1.1)
    runner._pending = [(FakeEvent(log, "s4"), FakeEvent(log, "e4", 10.0))]
    assert runner.total_inference_time == pytest.approx(1.11)  # reading resolves
    runner._pending = [(FakeEvent(log, "s5"), FakeEvent(log, "e5", 7.0))]
    assert runner.last_inference_time == pytest.approx(0.007)
    runner._pending = [(FakeEvent(log, "s6"), FakeEvent(log, "e6", 7.0))]
    runner.activate()
    assert runner._pending == [] and runner.total_inference_time == 0.0


def test_base_methods_are_abstract():
    runner = Runner()
    assert runner.name == "base" and runner.device == "cpu" and runner.max_batch is None and runner.meta == {}
    with pytest.raises(NotImplementedError):
        runner.activate()
    assert not runner.is_active
    for call in (lambda: runner._infer(_tiles(1), "logits"), runner._deactivate):
        with pytest.raises(NotImplementedError):
            call()
