"""The runner interface every backend implements (modelled on Polygraphy's BaseRunner).

A runner is built from an artifact path and does nothing heavy until :meth:`Runner.activate`.
Use it as::

    with OnnxRuntimeRunner("export/fcn.onnx") as runner:
        logits = runner.infer(tiles)                 # (N, 21, H, W) float32 or float16
        labels = runner.infer(tiles, output="labels")  # (N, H, W) uint8

``tiles`` is float32 NCHW (N, 3, H, W), already ImageNet-normalised, with (H, W) the runner's
tile size (320x480 by default), either a numpy array (results come back as numpy arrays) or a
``torch.Tensor`` on :attr:`Runner.device` (results come back as tensors on that device, with no
host round trip where the backend supports it). The base class checks dtype, shape and device
of what it is fed and says "received X, expected Y"; subclasses implement ``_activate``,
``_infer`` (numpy) and ``_deactivate``, and may implement ``_infer_tensor`` (the default goes
through ``_infer`` on the host).

What a runner is and can do is declared, never probed: :attr:`Runner.artifact` (the file it
runs), :attr:`Runner.device` (where it computes and wants tensors), :attr:`Runner.capabilities`
(:class:`Capabilities`: whether device tensors stay on the device, whether it can stage inputs
for engine-only timing, how :attr:`Runner.last_inference_time` is measured).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from fcn_deploy.errors import InputMismatchError, RunnerStateError, UsageError

Output = Literal["logits", "labels"]

#: Unresolved CUDA-event timings kept before the oldest are read (reading waits for them).
_MAX_PENDING_TIMINGS = 32


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape (``-1`` for a dynamic dimension) and numpy dtype name of one IO tensor."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    def describe(self) -> str:
        dims = ",".join("N" if d < 0 else str(d) for d in self.shape)
        return f"{self.name} {self.dtype} ({dims})"


@dataclass(frozen=True)
class Capabilities:
    """What a runner can do, declared by each runner class (or instance) instead of being probed.

    Attributes:
        tensors: :meth:`Runner.infer` accepts ``torch.Tensor`` tiles on :attr:`Runner.device`
            and returns tensors there (every :class:`Runner`: through the host by default).
        device_tensors: ... and consumes them where they are, with no host round trip.
        staged: ``stage(tiles)`` places a batch where the runner computes once and
            ``run_staged(staged)`` runs it to completion: what ``bench`` times as "engine only".
        event_timing: :attr:`Runner.last_inference_time` of a CUDA tensor call is measured by
            CUDA events on the caller's stream (device time); otherwise host wall time.
    """

    tensors: bool = True
    device_tensors: bool = False
    staged: bool = False
    event_timing: bool = True


#: The capabilities of an object used as a runner that declares none (duck typing: numpy only).
HOST_ONLY = Capabilities(tensors=False, device_tensors=False, staged=False, event_timing=False)


def capabilities_of(runner: Any) -> Capabilities:
    """``runner.capabilities``; :data:`HOST_ONLY` for an object that is no :class:`Runner`
    and declares none (it is then fed numpy arrays only)."""
    declared = getattr(runner, "capabilities", None)
    return declared if isinstance(declared, Capabilities) else HOST_ONLY


def is_tensor(value: Any) -> bool:
    """True for a ``torch.Tensor`` (without importing torch: no tensor exists before it is)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


class Runner:
    """Base class of every backend runner.

    Subclasses set :attr:`name`, :attr:`device` and :attr:`capabilities`, pass their artifact to
    ``__init__``, fill :attr:`input_spec` / :attr:`meta` (at the latest in ``_activate``) and
    implement ``_activate``, ``_infer`` and ``_deactivate``; ``_infer_tensor`` where the backend
    can take device tensors (then ``capabilities.device_tensors``), ``stage`` / ``run_staged``
    where it can stage inputs (then ``capabilities.staged``).
    """

    #: Short backend name used on the command line and in reports ("torch", "ort", "trt").
    name: str = "base"
    #: Where the runner wants tensor inputs: ``"cpu"`` or ``"cuda:N"`` (numpy inputs are
    #: accepted whatever the device).
    device: str = "cpu"
    #: What it can do (:class:`Capabilities`); runners override it.
    capabilities: Capabilities = Capabilities()

    def __init__(self, artifact: str | Path | None = None) -> None:
        #: The file this runner runs (checkpoint, ONNX or engine), as given.
        self.artifact: Path | None = None if artifact is None else Path(artifact)
        self.is_active = False
        #: Spec of the image input; batch dimension -1 when dynamic.
        self.input_spec: TensorSpec | None = None
        #: Largest batch this runner accepts (``None``: unbounded).
        self.max_batch: int | None = None
        #: Artifact metadata: classes, colormap, mean, std, tile_hw, precision, ...
        self.meta: dict[str, Any] = {}
        self._last_time = 0.0
        self._total_time = 0.0
        self._pending: list[tuple[Any, Any]] = []  # (start, end) CUDA events not yet read

    # -- timing ----------------------------------------------------------------------------
    @property
    def last_inference_time(self) -> float:
        """Seconds the last :meth:`infer` call spent in the backend: host wall time for numpy
        and CPU tensors; for CUDA tensors the time between CUDA events recorded on the
        caller's stream around the call (read lazily: reading it waits for that call's work)."""
        self._resolve_timings()
        return self._last_time

    @property
    def total_inference_time(self) -> float:
        """Sum of :attr:`last_inference_time` over all :meth:`infer` calls since activation."""
        self._resolve_timings()
        return self._total_time

    def _add_time(self, seconds: float) -> None:
        self._last_time = seconds
        self._total_time += seconds

    def _resolve_timings(self, keep: int = 0) -> None:
        while len(self._pending) > keep:
            start, end = self._pending.pop(0)
            end.synchronize()
            self._add_time(start.elapsed_time(end) / 1000.0)

    # -- lifecycle -----------------------------------------------------------------------
    def activate(self) -> "Runner":
        if self.is_active:
            raise RunnerStateError(f"{self.name} runner is already active")
        self._activate()
        self.is_active = True
        self._last_time = self._total_time = 0.0
        self._pending = []
        return self

    def deactivate(self) -> None:
        if self.is_active:
            try:
                self._resolve_timings()
            finally:
                try:
                    self._deactivate()
                finally:
                    self.is_active = False

    def __enter__(self) -> "Runner":
        return self.activate()

    def __exit__(self, *exc) -> None:
        self.deactivate()

    # -- inference -----------------------------------------------------------------------
    @property
    def tile_hw(self) -> tuple[int, int]:
        """(height, width) of the tiles this runner takes."""
        if self.input_spec is None:
            raise RunnerStateError(f"{self.name} runner: input spec unknown before activate()")
        return int(self.input_spec.shape[2]), int(self.input_spec.shape[3])

    def _check_layout(self, dtype: str, shape: tuple[int, ...], where: str = "") -> None:
        """Dtype, rank, per-tile shape and batch bounds of an input against :attr:`input_spec`."""
        spec = self.input_spec
        received = f"{dtype} {shape}{where}"
        expected = spec.describe() + (f" on {self.device}" if where else "")
        if dtype != spec.dtype:
            raise InputMismatchError(f"{self.name}: received {received}, expected {expected}")
        # the batch dimension is checked below: a fixed batch takes smaller batches (padded)
        if len(shape) != len(spec.shape) or any(e >= 0 and e != r for e, r in zip(spec.shape[1:], shape[1:])):
            raise InputMismatchError(f"{self.name}: received {received}, expected {expected}")
        if shape[0] < 1:
            raise InputMismatchError(f"{self.name}: received an empty batch {received}")
        limits = [b for b in (self.max_batch, spec.shape[0]) if b is not None and b > 0]
        if limits and shape[0] > min(limits):
            raise InputMismatchError(
                f"{self.name}: received {received}, at most {min(limits)} tiles per batch allowed"
            )

    def check_input(self, tiles: Any) -> np.ndarray:
        """Validate numpy ``tiles`` against :attr:`input_spec`; return a C-contiguous array."""
        spec = self.input_spec
        if spec is None:
            raise RunnerStateError(f"{self.name} runner must be activated before infer()")
        if not isinstance(tiles, np.ndarray):
            raise InputMismatchError(
                f"{self.name}: received {type(tiles).__name__}, expected numpy.ndarray or torch.Tensor "
                f"{spec.describe()}"
            )
        self._check_layout(tiles.dtype.name, tuple(tiles.shape))
        return np.ascontiguousarray(tiles)

    def check_tensor(self, tiles: Any):
        """Validate a ``torch.Tensor`` against :attr:`input_spec` and :attr:`device`; return
        it contiguous (NCHW), detached from autograd."""
        import torch

        if self.input_spec is None:
            raise RunnerStateError(f"{self.name} runner must be activated before infer()")
        where = f" on {tiles.device}"
        self._check_layout(str(tiles.dtype).removeprefix("torch."), tuple(tiles.shape), where)
        if tiles.device != torch.device(self.device):
            raise InputMismatchError(
                f"{self.name}: received a tensor on {tiles.device}, expected one on {self.device} "
                f"({self.input_spec.describe()})"
            )
        return tiles.detach().contiguous()

    def infer(self, tiles, output: Output = "logits"):
        """Run one batch.

        Args:
            tiles: float32 (N, 3, H, W), ImageNet-normalised: a numpy array, or a
                ``torch.Tensor`` on :attr:`device`; for a model with a fixed batch B, any
                N <= B (padded with zero tiles whose outputs are dropped).
            output: ``"logits"`` for (N, C, H, W) float32/float16 logits, ``"labels"`` for
                (N, H, W) uint8 class indices (argmax computed where it is cheapest).

        Returns:
            numpy in, numpy out; a tensor in, a tensor on :attr:`device` out (possibly a view of
            a larger buffer; on CUDA ordered after the call on the caller's current stream).
        """
        if output not in ("logits", "labels"):
            raise UsageError(f"output must be 'logits' or 'labels', not {output!r}")
        if is_tensor(tiles):
            return self._infer_checked_tensor(tiles, output)
        tiles = self.check_input(tiles)
        n, fixed = tiles.shape[0], self.input_spec.shape[0]
        if 0 < n < fixed:  # a fixed-batch model: pad with zero tiles, drop their outputs
            tiles = np.concatenate([tiles, np.zeros((fixed - n, *tiles.shape[1:]), tiles.dtype)])
        start = time.perf_counter()
        result = self._infer(tiles, output)[:n]
        self._add_time(time.perf_counter() - start)
        return result

    def _infer_checked_tensor(self, tiles, output: Output):
        import torch

        tiles = self.check_tensor(tiles)
        n, fixed = tiles.shape[0], self.input_spec.shape[0]
        if 0 < n < fixed:
            tiles = torch.cat([tiles, tiles.new_zeros((fixed - n, *tiles.shape[1:]))])
        if tiles.is_cuda:
            # pragma: no mutate block (CUDA only, run by the gpu tests: docs/testing.md)
            stream = torch.cuda.current_stream(tiles.device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            result = self._infer_tensor(tiles, output)[:n]
            end.record(stream)
            self._pending.append((start, end))
            self._resolve_timings(keep=_MAX_PENDING_TIMINGS)
            return result
        t0 = time.perf_counter()
        result = self._infer_tensor(tiles, output)[:n]
        self._add_time(time.perf_counter() - t0)
        return result

    # -- to implement --------------------------------------------------------------------
    def _activate(self) -> None:
        raise NotImplementedError

    def _infer(self, tiles: np.ndarray, output: Output) -> np.ndarray:
        raise NotImplementedError

    def _infer_tensor(self, tiles, output: Output):
        """Checked contiguous float32 (B, 3, H, W) tensor on :attr:`device` -> a tensor on
        :attr:`device`. Default: through the host with :meth:`_infer`."""
        import torch

        result = self._infer(np.ascontiguousarray(tiles.cpu().numpy()), output)
        return torch.from_numpy(np.ascontiguousarray(result)).to(tiles.device)  # pragma: no mutate (device: CUDA only)

    def _deactivate(self) -> None:
        raise NotImplementedError


def argmax_labels(logits: np.ndarray) -> np.ndarray:
    """(N, C, H, W) logits -> (N, H, W) uint8 class indices (first maximum wins, NaN -> 255),
    with :func:`fcn_deploy.tiling.argmax_classes` (several times faster than ``np.argmax``)."""
    from fcn_deploy.tiling import argmax_classes

    if len(logits) == 0:
        return np.zeros((0, *logits.shape[2:]), np.uint8)
    return np.stack([argmax_classes(x) for x in logits])
