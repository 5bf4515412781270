"""TensorRT runner: a serialized engine executed on torch CUDA buffers and a torch CUDA stream.

``TensorRTRunner(engine_path)`` reads nothing until :meth:`~TensorRTRunner.activate`, which checks
the engine's sidecar against this machine (an NVIDIA GPU, TensorRT flavour and version, compute
capability, stale ONNX), deserialises the engine, creates one execution context and one
non-default torch stream on ``cuda:N``, and allocates one torch tensor per engine input/output,
once, for the optimisation profile's largest batch. Each batch then does, as torch-tensorrt's
Python runtime module does: ``set_input_shape``, check the output shapes the context reports,
``set_tensor_address(name, tensor.data_ptr())`` for every IO tensor, ``execute_async_v3`` on that
stream. There is no pycuda: one CUDA context (the device's primary context) shared by torch,
onnxruntime and TensorRT, and no pinned host copy that the caller does not ask for.

:meth:`~fcn_deploy.runners.base.Runner.infer` takes and returns tensors on the runner's device (what a GPU
tile assembler needs); the numpy :meth:`~fcn_deploy.runners.base.Runner.infer` uploads, calls the
same code and downloads the result. ``output="labels"`` uses the engine's uint8 ``labels`` output
when it was built with ``--labels-output`` (an argmax inside the engine), else ``torch.argmax`` on
the device: logits never go to the host just to be reduced to labels.

Streams: the engine stream first waits for the caller's current stream (which wrote the input),
and the caller's stream then waits for the engine stream, so results are ordered on the caller's
stream like any torch op. The bookkeeping (binding table, buffer sizes, batch padding for the
profile) is pure; the TensorRT module and the device are injectable, so the call order is tested
with a recording fake of TensorRT on CPU tensors. See docs/architecture.md for the runner contract.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Iterable, Sequence

import numpy as np

from fcn_deploy.errors import EngineError, InputMismatchError, UsageError
from fcn_deploy.runners.base import Capabilities, Output, Runner, TensorSpec
from fcn_deploy.runners.device import device_index, parse_device
from fcn_deploy.trt.flavour import FLAVOURS, TRT_TO_NUMPY, collecting_logger, gc_paused
from fcn_deploy.trt.sidecar import (
    LABELS_OUTPUT,
    META_KEYS,
    check_engine_file,
    current_onnx_sha256,
    engine_mismatch,
    gpu_info,
    read_sidecar,
    sidecar_path,
    rebuild_hint,
)


# --- pure bookkeeping ------------------------------------------------------------------------------
def numpy_dtype(trt_dtype_name: str) -> str:
    """numpy dtype name of a TensorRT ``DataType`` member name (``"HALF"`` -> ``"float16"``)."""
    try:
        return TRT_TO_NUMPY[trt_dtype_name]
    except KeyError:
        raise EngineError(f"engine tensor type {trt_dtype_name} has no numpy equivalent") from None


@dataclass(frozen=True)
class Binding:
    """One engine IO tensor: name, direction, shape (-1 = dynamic batch) and numpy dtype name."""

    name: str
    is_input: bool
    shape: tuple[int, ...]
    dtype: str

    def shape_for(self, batch: int) -> tuple[int, ...]:
        """The concrete shape for ``batch`` (only the leading dimension may be dynamic)."""
        return (batch if self.shape[0] < 0 else self.shape[0], *self.shape[1:])

    def nbytes(self, batch: int) -> int:
        return int(np.prod(self.shape_for(batch))) * np.dtype(self.dtype).itemsize


@dataclass(frozen=True)
class BindingTable:
    """The engine's image input, its logits output and its optional ``labels`` output."""

    input: Binding
    logits: Binding
    labels: Binding | None

    @property
    def all(self) -> list[Binding]:
        return [b for b in (self.input, self.logits, self.labels) if b is not None]

    @property
    def outputs(self) -> list[Binding]:
        return [b for b in (self.logits, self.labels) if b is not None]

    def buffer_nbytes(self, batch: int) -> dict[str, int]:
        """Bytes each device buffer needs for ``batch`` tiles."""
        return {b.name: b.nbytes(batch) for b in self.all}


def binding_table(rows: Iterable[tuple[str, str, Sequence[int], str]]) -> BindingTable:
    """Build the table from ``(name, mode, shape, dtype)`` rows as the engine reports them.

    ``mode`` is a ``TensorIOMode`` member name (``"INPUT"``/``"OUTPUT"``), ``dtype`` a
    ``DataType`` member name. Expects one float32 (N, 3, H, W) input, one 4-D logits output and
    optionally ``labels``; anything else is an :class:`EngineError`.
    """
    inputs, outputs = [], []
    for name, mode, shape, dtype in rows:
        if mode not in ("INPUT", "OUTPUT"):
            raise EngineError(f"engine tensor {name} has IO mode {mode}")
        binding = Binding(name, mode == "INPUT", tuple(int(d) for d in shape), numpy_dtype(dtype))
        (inputs if binding.is_input else outputs).append(binding)
    if len(inputs) != 1:
        raise EngineError(f"engine has {len(inputs)} inputs, expected 1")
    inp = inputs[0]
    if len(inp.shape) != 4 or inp.dtype != "float32" or inp.shape[1] != 3 or any(d < 0 for d in inp.shape[2:]):
        raise EngineError(f"engine input {inp.name} is {inp.dtype} {inp.shape}, expected float32 (N, 3, H, W)")
    labels = [o for o in outputs if o.name == LABELS_OUTPUT]
    logits = [o for o in outputs if o.name != LABELS_OUTPUT]
    if len(logits) != 1 or len(logits[0].shape) != 4:
        raise EngineError(f"engine outputs {[o.name for o in outputs]}: expected one 4-D logits output")
    return BindingTable(inp, logits[0], labels[0] if labels else None)


@dataclass(frozen=True)
class BatchProfile:
    """Batch range of the engine's optimisation profile."""

    min: int
    opt: int
    max: int

    @classmethod
    def from_shapes(cls, shapes: Sequence[Sequence[int]]) -> "BatchProfile":
        """From ``get_tensor_profile_shape``'s (min, opt, max) input shapes."""
        return cls(*(int(s[0]) for s in shapes))

    def run_batch(self, n: int) -> int:
        """Batch to execute for ``n`` tiles: ``n``, or ``min`` when smaller (zero-padded)."""
        if n > self.max:
            raise InputMismatchError(f"trt: received batch {n}, the engine's profile allows at most {self.max}")
        if n < 1:
            raise InputMismatchError("trt: received an empty batch")
        return max(n, self.min)


# --- devices and streams ---------------------------------------------------------------------------
class _CudaStream:
    """The runner's non-default torch CUDA stream on one device, and the waits around execute."""

    def __init__(self, torch, device: str) -> None:
        self._torch = torch
        self.device = torch.device(device)
        self.stream = torch.cuda.Stream(self.device)

    @property
    def handle(self) -> int:
        """``cudaStream_t`` for ``execute_async_v3``."""
        return self.stream.cuda_stream

    def current(self):
        """The device (CUDA context current: TensorRT allocates on the current device)."""
        return self._torch.cuda.device(self.device)

    def after_caller(self) -> Any:
        """Make the engine stream wait for the caller's stream; return the caller's stream."""
        caller = self._torch.cuda.current_stream(self.device)
        self.stream.wait_stream(caller)
        return caller

    def before_caller(self, caller) -> None:
        caller.wait_stream(self.stream)

    def synchronize(self) -> None:
        self.stream.synchronize()


class _HostStream:
    """Stand-in of :class:`_CudaStream` for CPU tensors (a fake TensorRT in tests): work runs in
    program order, so the waits are no-ops; the handle is a fixed non-zero number per stream."""

    def __init__(self) -> None:
        self.handle = id(self)

    def current(self):
        return contextlib.nullcontext()

    def after_caller(self) -> None:
        return None

    def before_caller(self, caller) -> None:
        pass

    def synchronize(self) -> None:
        pass


# --- the runner ------------------------------------------------------------------------------------
def _torch():
    import torch

    return torch


class TensorRTRunner(Runner):
    """Runs a TensorRT / TensorRT-RTX engine built by :func:`fcn_deploy.trt.build.build_engine`.

    Input float32 (N, 3, H, W) with N up to the profile's max batch; output (N, C, H, W) logits of
    the engine's output dtype (float32 for fcn-deploy engines) or uint8 (N, H, W) labels.

    Args:
        engine_path: the engine; its sidecar ``<engine>.json`` must be beside it.
        device: CUDA device index, ``"cuda"`` or ``"cuda:N"`` (default GPU 0).
        trt: the TensorRT module to use instead of importing the one the sidecar names (tests
            pass a recording fake, with ``device="cpu"``).
    """

    name = "trt"
    #: Tensors stay on the GPU (bound as the engine's IO); bench times it through infer.
    capabilities = Capabilities(device_tensors=True, staged=False)

    def __init__(self, engine_path: str | Path, *, device: int | str = 0, trt: ModuleType | None = None) -> None:
        super().__init__(engine_path)
        #: ``"cuda:N"``: where :meth:`infer` takes and returns tensors.
        self.device = parse_device(device)
        if self.device == "cpu" and trt is None:
            raise UsageError("--backend trt runs TensorRT engines on an NVIDIA GPU only, not --device cpu; "
                             "use --backend ort (onnxruntime) or torch on the CPU")
        self._trt_module = trt
        self._logger: Any = None
        self._runtime: Any = None
        self._engine: Any = None
        self._context: Any = None
        self._stream: _CudaStream | _HostStream | None = None
        self._table: BindingTable | None = None
        self._profile: BatchProfile | None = None
        self._buffers: dict[str, Any] = {}

    @property
    def _index(self) -> int:
        return 0 if self.device == "cpu" else device_index(self.device)

    # -- activation ------------------------------------------------------------------------------
    def _activate(self) -> None:
        if not self.artifact.is_file():
            raise EngineError(f"engine {self.artifact} not found; build one with fcn-deploy build-engine")
        sidecar = read_sidecar(self.artifact)
        check_engine_file(self.artifact, sidecar)
        try:
            flavour = FLAVOURS.get(sidecar["trt"]["flavour"])
            if flavour is None:
                raise EngineError(f"{self.artifact}: unknown TensorRT flavour {sidecar['trt']['flavour']!r}")
            gpu = gpu_info(self._index)  # no NVIDIA GPU: say so before asking to install TensorRT
            trt = self._trt_module if self._trt_module is not None else flavour.load()
            machine = {"trt": {flavour.name: trt.__version__}, "gpu": gpu, "gpu_error": None}
            reason = engine_mismatch(sidecar, machine, onnx_sha256=current_onnx_sha256(sidecar))
        except (KeyError, TypeError) as exc:
            raise EngineError(
                f"{self.artifact}: incomplete sidecar (missing {exc}); rebuild the engine with fcn-deploy build-engine"
            ) from None
        if reason is not None:
            raise EngineError(f"{self.artifact.name}: {reason}; rebuild it: {rebuild_hint(sidecar)}")
        from fcn_deploy.artifacts import check_normalization

        check_normalization(sidecar, str(sidecar_path(self.artifact)))
        try:
            self._load(trt, sidecar)
        except BaseException:
            self._release()
            raise
        self.meta = {k: sidecar[k] for k in (*META_KEYS, "precision") if k in sidecar}

    def _fail(self, what: str) -> EngineError:
        """One-line EngineError for a failed TensorRT call, with what TensorRT logged."""
        return EngineError(f"trt: {what} ({self.artifact.name}): {self._logger.take()}")

    @gc_paused()
    def _load(self, trt: ModuleType, sidecar: dict[str, Any]) -> None:
        """Deserialise, create context and stream, allocate the device buffers once."""
        torch = _torch()
        self._stream = _HostStream() if self.device == "cpu" else _CudaStream(torch, self.device)
        self._logger = collecting_logger(trt)
        with self._stream.current():
            self._runtime = trt.Runtime(self._logger)
            self._engine = self._runtime.deserialize_cuda_engine(self.artifact.read_bytes())
            if self._engine is None:
                raise EngineError(
                    f"{self.artifact}: {sidecar['trt']['label']} {trt.__version__} cannot deserialise it "
                    f"({self._logger.take()}); rebuild it: {rebuild_hint(sidecar)}"
                )
            engine = self._engine
            rows = []
            for i in range(engine.num_io_tensors):
                name = engine.get_tensor_name(i)
                rows.append(
                    (name, engine.get_tensor_mode(name).name, tuple(engine.get_tensor_shape(name)),
                     engine.get_tensor_dtype(name).name)
                )
            table = binding_table(rows)
            if table.input.shape[0] < 0:
                profile = BatchProfile.from_shapes(engine.get_tensor_profile_shape(table.input.name, 0))
            else:
                profile = BatchProfile(table.input.shape[0], table.input.shape[0], table.input.shape[0])
            self._context = engine.create_execution_context()
            if self._context is None:
                raise self._fail("cannot create an execution context (out of GPU memory?)")
            self._buffers = {
                b.name: torch.empty(b.shape_for(profile.max), dtype=getattr(torch, b.dtype), device=self.device)
                for b in table.all
            }
        self._table, self._profile = table, profile
        self.input_spec = TensorSpec(table.input.name, (-1, *table.input.shape[1:]), "float32")
        self.max_batch = profile.max

    def _release(self) -> None:
        """Wait for queued work, then drop the context, engine, runtime and buffers (in that order)."""
        if self._stream is not None and self._context is not None:
            self._stream.synchronize()
        self._context = None
        self._engine = None
        self._runtime = None
        self._buffers = {}
        self._stream = None

    def _deactivate(self) -> None:
        self._release()

    # -- inference -------------------------------------------------------------------------------
    def _infer_tensor(self, tiles: Any, output: Output) -> Any:
        """Run one batch already on the device (checked by :meth:`Runner.infer`).

        Args:
            tiles: float32 (B, 3, H, W) torch tensor on :attr:`device`, ImageNet-normalised,
                1 <= B <= :attr:`max_batch`.
            output: ``"logits"``: (B, C, H, W) tensor of the engine's logits dtype; ``"labels"``:
                (B, H, W) uint8 class indices.

        Returns:
            A new tensor on :attr:`device`, ordered on the caller's current stream (the stream
            current when this was called waits for the engine): torch ops the caller queues on
            that stream afterwards see it; another stream must wait on that one, and the host must
            synchronise it (``.cpu()`` does).
        """
        return self._run(tiles, output)

    def _infer(self, tiles: np.ndarray, output: Output) -> np.ndarray:
        torch = _torch()
        result = self._run(torch.from_numpy(tiles).to(self.device), output)
        return result.cpu().numpy()

    def _run(self, tiles, output: Output):
        """Copy ``tiles`` into the input buffer, execute, return the asked output (see _infer_tensor)."""
        torch = _torch()
        table, context, stream = self._table, self._context, self._stream
        n = int(tiles.shape[0])
        run = self._profile.run_batch(n)
        buffers = self._buffers
        self._logger.errors.clear()  # a failure below quotes only what this batch logged
        with stream.current():
            # queued on the caller's stream, which the previous execute already waited for
            buffers[table.input.name][:n].copy_(tiles)
            if run > n:
                buffers[table.input.name][n:run].zero_()
            in_shape = table.input.shape_for(run)
            if not context.set_input_shape(table.input.name, in_shape):
                raise self._fail(f"the engine refused input shape {in_shape}")
            for b in table.outputs:
                got = tuple(int(d) for d in context.get_tensor_shape(b.name))
                if got != b.shape_for(run):
                    raise EngineError(
                        f"trt: for input {in_shape} the engine's output {b.name} has shape {got}, "
                        f"expected {b.shape_for(run)} ({self.artifact.name})"
                    )
            for b in table.all:
                if not context.set_tensor_address(b.name, buffers[b.name].data_ptr()):
                    raise self._fail(f"set_tensor_address({b.name}) failed")
            caller = stream.after_caller()
            if not context.execute_async_v3(stream.handle):
                raise self._fail("execute_async_v3 failed")
            stream.before_caller(caller)
            if output == "labels" and table.labels is not None:
                labels = buffers[table.labels.name][:n]
                return labels.reshape(n, *labels.shape[2:]).to(torch.uint8, copy=True)
            logits = buffers[table.logits.name][:n]
            if output == "labels":
                return torch.argmax(logits, dim=1).to(torch.uint8)
            return logits.clone()
