"""onnxruntime runner: an exported ONNX (float32 or FP16 with float32 IO) on the CPU, CUDA or
TensorRT execution provider.

``OnnxRuntimeRunner("export/fcn.onnx")`` builds the session in :meth:`activate`. The input
spec (name, (N|-1, 3, H, W), float32) is read from the graph; the metadata (classes, colormap,
mean, std, tile_hw, precision, ...) from the ONNX's ``metadata_props``
(:func:`fcn_deploy.artifacts.meta_from_model`, the same dict as the JSON sidecar).

Labels: a copy of the graph gets ``ArgMax(axis=1) -> Cast(uint8)`` appended in memory as a
second output, so ``output="labels"`` returns (N, H, W) uint8 without handing the logits back
(measured faster than numpy's argmax on the CPU, see ``benchmarks/runners_cpu.py``; on the CUDA
EP it keeps the logits on the GPU). Host-to-host calls use ``session.run``: with host inputs and
outputs IO binding would make the same copies. :meth:`stage` / :meth:`run_staged` use IO
binding with device-resident ``OrtValue`` s on CUDA, for benchmarks of the engine alone.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from fcn_deploy.errors import (
    ArtifactNotFoundError,
    BackendUnavailableError,
    ExportError,
    InputMismatchError,
    UsageError,
    first_line,
)
from fcn_deploy.runners.base import Output, Runner, TensorSpec, argmax_labels

#: Short provider names accepted on the command line -> onnxruntime execution providers.
PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
_SHORT = {v: k for k, v in PROVIDERS.items()}


def physical_cores() -> int:
    """Physical CPU cores this process may use: its affinity mask, hyper-threads counted once
    (from /proc/cpuinfo), capped by a cgroup v2 CPU quota."""
    try:
        allowed = set(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        allowed = set(range(os.cpu_count() or 1))
    cores = set()
    try:
        for block in Path("/proc/cpuinfo").read_text().split("\n\n"):
            fields = {k.strip(): v.strip() for k, _, v in (ln.partition(":") for ln in block.splitlines())}
            if fields.get("processor", "").isdigit() and int(fields["processor"]) in allowed:
                cores.add((fields.get("physical id"), fields.get("core id", "p" + fields["processor"])))
    except OSError:
        pass
    count = len(cores) or len(allowed) or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            count = min(count, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return count


def _dims(value_info) -> list[int | str]:
    """Dims of a graph input/output: ints where static, the symbol (or "?") where dynamic."""
    shape = value_info.type.tensor_type.shape
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in shape.dim]


def _describe(value_info) -> str:
    import onnx

    elem = value_info.type.tensor_type.elem_type
    dtype = onnx.helper.tensor_dtype_to_np_dtype(elem).name if elem else "non-tensor"
    return f"{value_info.name} {dtype} ({','.join(str(d) for d in _dims(value_info))})"


def provider_list(names: Iterable[str], device_id: int = 0) -> list:
    """onnxruntime ``providers=`` argument for short provider names, CPU appended as fallback.

    The CUDA provider gets ``use_tf32=0``: its default (TF32 convolutions) moved 0.11% of argmax
    pixels and gave max abs logit differences of 1.1e-2 on an H200 (``fcn-deploy check``,
    2026-11-26), far outside the fp32 parity thresholds; the fp32 reference never uses TF32.
    """
    names = tuple(names)
    result: list = []
    for name in names:
        if name == "cpu":
            result.append(PROVIDERS[name])
        elif name == "cuda":
            result.append((PROVIDERS[name], {"device_id": device_id, "use_tf32": 0}))
        else:
            result.append((PROVIDERS[name], {"device_id": device_id}))
    if "cpu" not in names:
        result.append(PROVIDERS["cpu"])
    return result


class OnnxRuntimeRunner(Runner):
    """Runs an ONNX model with onnxruntime.

    Args:
        onnx_path: the ONNX file (input float32 (N, 3, H, W), output logits (N, C, H, W)).
        providers: short names in priority order: ``cpu``, ``cuda``, ``tensorrt`` (the CPU
            provider is always appended as fallback for unsupported nodes).
        threads: intra-op threads; default: the physical cores this process may use.
        device_id: the GPU the CUDA / TensorRT providers use.
        argmax_in_graph: compute labels with an ArgMax node appended to the graph (default)
            rather than numpy's argmax on returned logits.
    """

    name = "ort"

    def __init__(
        self,
        onnx_path: str | os.PathLike,
        *,
        providers: Iterable[str] | str = ("cpu",),
        threads: int | None = None,
        argmax_in_graph: bool = True,
        device_id: int = 0,
    ) -> None:
        super().__init__()
        self.path = Path(onnx_path)
        if isinstance(providers, str):
            providers = providers.split(",")
        self.providers = tuple(p.strip().lower() for p in providers if p.strip())
        unknown = [p for p in self.providers if p not in PROVIDERS]
        if unknown or not self.providers:
            raise UsageError(
                f"--providers: unknown {', '.join(map(repr, unknown)) or 'empty list'}; "
                f"choose from {', '.join(PROVIDERS)}"
            )
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise UsageError(f"--threads must be a positive integer, not {threads!r}")
        self.threads = threads
        self.argmax_in_graph = argmax_in_graph
        self._session: Any = None
        self._logits_name = ""
        self._labels_name: str | None = None
        self._device_id = int(device_id)

    # -- lifecycle -----------------------------------------------------------------------
    def _activate(self) -> None:
        import onnx
        import onnxruntime as ort

        if not self.path.is_file():
            raise ArtifactNotFoundError(f"ONNX model {self.path} not found")
        available = ort.get_available_providers()
        missing = [p for p in self.providers if PROVIDERS[p] not in available]
        if missing:
            have = ", ".join(_SHORT.get(p, p) for p in available)
            raise BackendUnavailableError(
                f"onnxruntime {ort.__version__} here has no {', '.join(PROVIDERS[p] for p in missing)} "
                f"(available: {have}); pip install 'fcn-deploy[gpu]' (onnxruntime-gpu) "
                "on a machine with CUDA to use it"
            )
        try:
            model = onnx.load(str(self.path))
        except Exception as exc:  # DecodeError, missing external data, ...
            raise ExportError(f"{self.path} is not a readable ONNX model: {first_line(exc)}") from None
        spec = self._check_io(model)
        from fcn_deploy.artifacts import meta_from_model

        meta = dict(meta_from_model(model, str(self.path)))
        classes = _dims(model.graph.output[0])[1]
        if isinstance(classes, int) and classes != meta.get("num_classes", classes):
            raise ExportError(
                f"{self.path}: the graph outputs {classes} classes but its metadata says {meta['num_classes']}"
            )
        self._labels_name = None
        logits_elem = model.graph.output[0].type.tensor_type.elem_type
        if self.argmax_in_graph and logits_elem == onnx.TensorProto.FLOAT:
            self._labels_name = _append_argmax(model, self._logits_name)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        threads = self.threads or physical_cores()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        providers = provider_list(self.providers, self._device_id)
        try:
            self._session = ort.InferenceSession(model.SerializeToString(), options, providers=providers)
        except Exception as exc:  # onnxruntime's Fail / InvalidGraph / NotImplemented
            raise ExportError(f"onnxruntime cannot load {self.path}: {first_line(exc)}") from None
        self.input_spec = spec
        self.max_batch = spec.shape[0] if spec.shape[0] > 0 else None
        meta["tile_hw"] = [spec.shape[2], spec.shape[3]]
        meta["providers"] = list(self.providers)
        meta["threads"] = threads
        self.meta = meta

    def _check_io(self, model) -> TensorSpec:
        """Check the graph is image float32 (N,3,H,W) -> logits (N,C,H,W); return the input spec."""
        import onnx

        graph = model.graph
        initializers = {t.name for t in graph.initializer}
        inputs = [i for i in graph.input if i.name not in initializers]
        if len(inputs) != 1:
            raise InputMismatchError(
                f"{self.path}: has {len(inputs)} inputs ({', '.join(_describe(i) for i in inputs)}), "
                "expected one float32 (N,3,H,W) image"
            )
        inp = inputs[0]
        dims = _dims(inp)
        if (
            inp.type.tensor_type.elem_type != onnx.TensorProto.FLOAT
            or len(dims) != 4
            or dims[1] != 3
            or not all(isinstance(d, int) and d > 0 for d in dims[2:])
        ):
            raise InputMismatchError(
                f"{self.path}: input is {_describe(inp)}, expected float32 (N,3,H,W) with fixed H and W"
            )
        if not graph.output:
            raise ExportError(f"{self.path}: the graph has no output")
        out = graph.output[0]
        out_dims = _dims(out)
        if out.type.tensor_type.elem_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16) or (
            len(out_dims) != 4 or out_dims[2:] != dims[2:]
        ):
            raise ExportError(
                f"{self.path}: output is {_describe(out)}, expected logits float32 or float16 "
                f"(N,C,{dims[2]},{dims[3]})"
            )
        self._logits_name = out.name
        batch = dims[0] if isinstance(dims[0], int) and dims[0] > 0 else -1
        return TensorSpec(inp.name, (batch, 3, dims[2], dims[3]), "float32")

    def _deactivate(self) -> None:
        self._session = None

    # -- inference -----------------------------------------------------------------------
    def _infer(self, tiles: np.ndarray, output: Output) -> np.ndarray:
        feed = {self.input_spec.name: tiles}
        if output == "labels":
            if self._labels_name is not None:
                return self._session.run([self._labels_name], feed)[0]
            return argmax_labels(self._session.run([self._logits_name], feed)[0])
        return self._session.run([self._logits_name], feed)[0]

    def _on_gpu(self) -> bool:
        return self._session.get_providers()[0] != "CPUExecutionProvider"

    def stage(self, tiles: np.ndarray):
        """Validate ``tiles`` and place them where the first provider computes.

        On CPU this is the array itself; on the CUDA / TensorRT providers an IO binding with
        the input in a device ``OrtValue`` and the logits bound to device memory, so that
        :meth:`run_staged` times the engine without host copies.
        """
        tiles = self.check_input(tiles)
        if not self._on_gpu():
            return tiles
        import onnxruntime as ort

        binding = self._session.io_binding()
        value = ort.OrtValue.ortvalue_from_numpy(tiles, "cuda", self._device_id)
        binding.bind_ortvalue_input(self.input_spec.name, value)
        binding.bind_output(self._logits_name, "cuda", self._device_id)
        return binding, value

    def run_staged(self, staged) -> None:
        """One run on :meth:`stage`-d input; returns when the outputs are ready."""
        if isinstance(staged, np.ndarray):
            self._session.run([self._logits_name], {self.input_spec.name: staged})
            return
        binding, _ = staged
        self._session.run_with_iobinding(binding)
        binding.synchronize_outputs()


def _append_argmax(model, logits: str) -> str:
    """Append ``ArgMax(axis=1, keepdims=0) -> Cast(uint8)`` after ``logits`` to ``model``
    (in place) as a new graph output; return its name. First maximum wins, as numpy's."""
    from onnx import TensorProto, helper

    taken = {name for node in model.graph.node for name in node.output}
    taken |= {v.name for v in model.graph.input} | {v.name for v in model.graph.output}
    labels = "labels"
    while labels in taken or labels + "_int64" in taken:
        labels = "_" + labels
    model.graph.node.extend([
        helper.make_node("ArgMax", [logits], [labels + "_int64"], axis=1, keepdims=0),
        helper.make_node("Cast", [labels + "_int64"], [labels], to=TensorProto.UINT8),
    ])
    model.graph.output.append(helper.make_tensor_value_info(labels, TensorProto.UINT8, None))
    return labels


