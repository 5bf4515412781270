"""TensorRT runner: a serialized engine (TensorRT 10/11 or TensorRT-RTX) executed with pycuda.

``TensorRTRunner(engine_path)`` reads nothing until :meth:`activate`, which checks the engine's
sidecar against this machine (TensorRT flavour and version, GPU compute capability, stale ONNX),
deserialises the engine, creates one execution context and one CUDA stream, and allocates device
buffers and page-locked host buffers once, for the profile's largest batch. Each ``infer`` then
copies the batch in asynchronously, ``set_input_shape`` + ``execute_async_v3`` on that stream,
copies back only the output asked for, and synchronises.

``output="labels"``: an engine built with ``--labels-output`` has a uint8 ``labels`` output
(argmax on the GPU), so only N*H*W bytes come back; otherwise the logits come back and the argmax
runs on the host. On an H200 the float32 logits of 32 tiles took 7.5 ms to copy, the uint8 labels
0.1 ms (DESIGN.md), so build with ``--labels-output`` when only masks are needed.

The CUDA context is pushed around every call, so ``infer`` may run on another thread than
``activate`` (one call at a time). The bookkeeping (binding table, buffer sizes, batch padding for
the profile) is pure and tested without a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from fcn_deploy.engine import (
    FLAVOURS,
    LABELS_OUTPUT,
    META_KEYS,
    TRT_TO_NUMPY,
    check_engine_file,
    collecting_logger,
    gc_paused,
    current_onnx_sha256,
    engine_mismatch,
    gpu_info,
    read_sidecar,
    rebuild_hint,
)
from fcn_deploy.errors import BackendUnavailableError, EngineError, InputMismatchError
from fcn_deploy.runners.base import Output, Runner, TensorSpec, argmax_labels


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

    def buffer_nbytes(self, batch: int) -> dict[str, int]:
        """Bytes each host/device buffer needs for ``batch`` tiles."""
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
    if len(inp.shape) != 4 or inp.dtype != "float32" or any(d < 0 for d in inp.shape[1:]):
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


def labels_from_output(host: np.ndarray, n: int, tile_hw: tuple[int, int]) -> np.ndarray:
    """(N, 1, H, W) engine labels (any integer type) -> (n, H, W) uint8 copy."""
    return host[:n].reshape(n, *tile_hw).astype(np.uint8, copy=True)


# --- the runner ------------------------------------------------------------------------------------
def _import_pycuda():
    try:
        import pycuda.driver as cuda
    except ImportError:
        raise BackendUnavailableError(
            "the TensorRT runner needs pycuda: pip install 'fcn-deploy[trt]' or pip install pycuda"
        ) from None
    return cuda


class TensorRTRunner(Runner):
    """Runs a TensorRT / TensorRT-RTX engine built by :func:`fcn_deploy.engine.build_engine`.

    Input float32 (N, 3, H, W) with N up to the profile's max batch; output float32 (N, C, H, W)
    logits or uint8 (N, H, W) labels.
    """

    name = "trt"

    def __init__(self, engine_path: str | Path, *, device: int = 0) -> None:
        super().__init__()
        self.engine_path = Path(engine_path)
        self.device = device
        self._cuda: Any = None
        self._ctx: Any = None
        self._runtime: Any = None
        self._engine: Any = None
        self._context: Any = None
        self._stream: Any = None
        self._table: BindingTable | None = None
        self._profile: BatchProfile | None = None
        self._host: dict[str, np.ndarray] = {}
        self._dev: dict[str, Any] = {}

    def _activate(self) -> None:
        if not self.engine_path.is_file():
            raise EngineError(f"engine {self.engine_path} not found; build one with fcn-deploy build-engine")
        sidecar = read_sidecar(self.engine_path)
        check_engine_file(self.engine_path, sidecar)
        try:
            flavour = FLAVOURS.get(sidecar["trt"]["flavour"])
            if flavour is None:
                raise EngineError(f"{self.engine_path}: unknown TensorRT flavour {sidecar['trt']['flavour']!r}")
            trt = flavour.load()
            cuda = _import_pycuda()
            machine = {
                "trt": {flavour.name: trt.__version__},
                "gpu": gpu_info(self.device),
                "gpu_error": None,
            }
            reason = engine_mismatch(sidecar, machine, onnx_sha256=current_onnx_sha256(sidecar))
        except (KeyError, TypeError) as exc:
            raise EngineError(
                f"{self.engine_path}: incomplete sidecar (missing {exc}); rebuild the engine with fcn-deploy build-engine"
            ) from None
        if reason is not None:
            raise EngineError(f"{self.engine_path.name}: {reason}; rebuild it: {rebuild_hint(sidecar)}")

        self._cuda = cuda
        self._ctx = cuda.Device(self.device).make_context()
        try:
            self._load(trt, sidecar)
        except BaseException:
            self._release()
            cuda.Context.pop()
            self._ctx.detach()
            self._ctx = None
            raise
        cuda.Context.pop()
        self.meta = {k: sidecar[k] for k in (*META_KEYS, "precision") if k in sidecar}

    @gc_paused()
    def _load(self, trt, sidecar: dict[str, Any]) -> None:
        """Deserialise, create context + stream, allocate buffers once (context current)."""
        cuda = self._cuda
        logger = collecting_logger(trt)
        self._runtime = trt.Runtime(logger)
        self._engine = self._runtime.deserialize_cuda_engine(self.engine_path.read_bytes())
        if self._engine is None:
            raise EngineError(
                f"{self.engine_path}: {sidecar['trt']['label']} {trt.__version__} cannot deserialise it "
                f"({' | '.join(logger.errors) or 'no error reported'}); rebuild it: {rebuild_hint(sidecar)}"
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
        self._stream = cuda.Stream()
        for b in table.all:
            self._host[b.name] = cuda.pagelocked_empty(b.shape_for(profile.max), np.dtype(b.dtype))
            self._dev[b.name] = cuda.mem_alloc(b.nbytes(profile.max))
            self._context.set_tensor_address(b.name, int(self._dev[b.name]))
        self._table, self._profile = table, profile
        self.input_spec = TensorSpec(table.input.name, (-1, *table.input.shape[1:]), "float32")
        self.max_batch = profile.max

    def _infer(self, tiles: np.ndarray, output: Output) -> np.ndarray:
        cuda, table = self._cuda, self._table
        n = tiles.shape[0]
        run = self._profile.run_batch(n)
        use_labels = output == "labels" and table.labels is not None
        out = table.labels if use_labels else table.logits
        host_in, host_out = self._host[table.input.name][:run], self._host[out.name][:run]
        self._ctx.push()
        try:
            host_in[:n] = tiles
            host_in[n:] = 0
            cuda.memcpy_htod_async(self._dev[table.input.name], host_in, self._stream)
            if not self._context.set_input_shape(table.input.name, table.input.shape_for(run)):
                raise EngineError(f"trt: the engine refused input shape {table.input.shape_for(run)}")
            if not self._context.execute_async_v3(stream_handle=self._stream.handle):
                raise EngineError(f"trt: execute_async_v3 failed on {self.engine_path.name}")
            cuda.memcpy_dtoh_async(host_out, self._dev[out.name], self._stream)
            self._stream.synchronize()
        finally:
            cuda.Context.pop()
        if use_labels:
            return labels_from_output(host_out, n, self.tile_hw)
        if output == "labels":
            return argmax_labels(host_out[:n])
        return host_out[:n].copy()

    def _release(self) -> None:
        """Free device memory and TensorRT objects (CUDA context current), then the context."""
        for mem in self._dev.values():
            mem.free()
        self._dev, self._host = {}, {}
        self._context = self._engine = self._runtime = self._stream = None

    def _deactivate(self) -> None:
        self._ctx.push()
        try:
            self._release()
        finally:
            self._cuda.Context.pop()
            self._ctx.detach()
            self._ctx = None
