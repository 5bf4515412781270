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
outputs IO binding would make the same copies.

Device tensors (CUDA provider): ``runner.infer(tensor)`` with a float32 ``torch.Tensor`` on
:attr:`OnnxRuntimeRunner.device` binds it as the input with IO binding (``bind_input`` with
its ``data_ptr()``) and the requested output to a torch CUDA tensor, runs on one non-default
torch stream handed to the provider as ``user_compute_stream``, without the provider's
end-of-run synchronisation, and orders that stream after the caller's current stream (input
ready) and the caller's stream after it (output read after). The CUDA provider's options are
configurable (``cuda_options``: ``cudnn_conv_algo_search``, ``prefer_nhwc``,
``cudnn_conv_use_max_workspace``, ``enable_cuda_graph``, ...); with ``enable_cuda_graph`` the
input and outputs live in fixed buffers of the fixed batch (the graph replays fixed addresses
and shapes) and each call copies in and out of them. :meth:`stage` / :meth:`run_staged` time
the engine alone on device-resident inputs for benchmarks.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from fcn_deploy.errors import (
    ArtifactNotFoundError,
    BackendUnavailableError,
    ArtifactReadError,
    InputMismatchError,
    UsageError,
    first_line,
)
from fcn_deploy.runners.base import Capabilities, Output, Runner, TensorSpec, argmax_labels

#: Short provider names accepted on the command line -> onnxruntime execution providers.
PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
_SHORT = {v: k for k, v in PROVIDERS.items()}

#: CUDA provider options the runner sets itself (the shared torch stream).
_OWN_CUDA_OPTIONS = ("user_compute_stream", "has_user_compute_stream")


def parse_cuda_options(text: str | Mapping[str, Any] | None) -> dict[str, str]:
    """``"key=value,key=value"`` (or a mapping) -> CUDA provider options as strings, e.g.
    ``"cudnn_conv_algo_search=HEURISTIC,prefer_nhwc=1"``. onnxruntime checks the names and
    values when the session is created."""
    if text is None:
        return {}
    if isinstance(text, Mapping):
        items = [(str(k), v) for k, v in text.items()]
    else:
        items = []
        for part in (p.strip() for p in str(text).split(",")):
            if not part:
                continue
            key, eq, value = part.partition("=")
            if not eq or not key.strip():
                raise UsageError(f"CUDA provider option {part!r} is not key=value")
            items.append((key.strip(), value.strip()))
    options = {}
    for key, value in items:
        if key in _OWN_CUDA_OPTIONS:
            raise UsageError(f"CUDA provider option {key} is set by the runner (its torch stream)")
        options[key] = str(int(value)) if isinstance(value, bool) else str(value)
    return options


def _flag(value: Any) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes", "on")


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


def provider_list(names: Iterable[str], device_id: int = 0, cuda_options: Mapping[str, Any] | None = None) -> list:
    """onnxruntime ``providers=`` argument for short provider names, CPU appended as fallback.

    The CUDA provider gets ``use_tf32=0``: its default (TF32 convolutions) moved 0.11% of argmax
    pixels and gave max abs logit differences of 1.1e-2 on an H200 (``fcn-deploy check``,
    2026-11-26), far outside the fp32 parity thresholds; the fp32 reference never uses TF32.
    ``cuda_options`` are added to (and override) the CUDA provider's options.
    """
    names = tuple(names)
    result: list = []
    for name in names:
        if name == "cpu":
            result.append(PROVIDERS[name])
        elif name == "cuda":
            result.append((PROVIDERS[name], {"device_id": device_id, "use_tf32": 0, **dict(cuda_options or {})}))
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
        cuda_options: extra CUDA provider options (mapping or ``"key=value,..."``), e.g.
            ``cudnn_conv_algo_search`` (EXHAUSTIVE, HEURISTIC, DEFAULT), ``prefer_nhwc``,
            ``cudnn_conv_use_max_workspace``, ``enable_cuda_graph``.
        max_batch: largest batch accepted; with ``enable_cuda_graph`` and a dynamic-batch ONNX,
            the fixed batch every call is padded to.
        profile: file prefix for onnxruntime's per-node profile (JSON, written on deactivate;
            its path is then :attr:`profile_file`).
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
        cuda_options: Mapping[str, Any] | str | None = None,
        max_batch: int | None = None,
        profile: str | os.PathLike | None = None,
    ) -> None:
        super().__init__(onnx_path)
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
        self.cuda_options = parse_cuda_options(cuda_options)
        if max_batch is not None and (not isinstance(max_batch, int) or max_batch < 1):
            raise UsageError(f"max_batch must be a positive integer, not {max_batch!r}")
        self._max_batch_arg = max_batch
        self.cuda_graph = self.providers[0] == "cuda" and _flag(self.cuda_options.get("enable_cuda_graph", 0))
        self.profile = None if profile is None else str(profile)
        self.profile_file: str | None = None
        #: ``cuda:N`` when the first provider runs on GPU N (tensor inputs are wanted there).
        self.device = f"cuda:{self._device_id}" if self.providers[0] != "cpu" else "cpu"
        self._torch: Any = None
        self._stream: Any = None  # torch CUDA stream shared with the CUDA provider
        self._run_options: Any = None
        self._static: dict[str, Any] = {}  # CUDA graph: fixed input/output buffers
        self._static_binding: Any = None

    @property
    def capabilities(self) -> Capabilities:  # type: ignore[override]
        """Device tensors stay on the GPU with the CUDA provider (IO bound to torch's memory on a
        shared stream); the CPU and TensorRT providers take them through the host. Every
        provider can stage inputs for bench (an IO binding on the TensorRT provider)."""
        return Capabilities(device_tensors=self.providers[0] == "cuda", staged=True)

    # -- lifecycle -----------------------------------------------------------------------
    def _activate(self) -> None:
        import onnx
        import onnxruntime as ort

        if not self.artifact.is_file():
            raise ArtifactNotFoundError(f"ONNX model {self.artifact} not found")
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
            model = onnx.load(str(self.artifact))
        except Exception as exc:  # DecodeError, missing external data, ...
            raise ArtifactReadError(f"{self.artifact} is not a readable ONNX model: {first_line(exc)}") from None
        spec = self._check_io(model)
        from fcn_deploy.artifacts import check_normalization, meta_from_model

        meta = dict(check_normalization(meta_from_model(model, str(self.artifact)), str(self.artifact), required=True))
        classes = _dims(model.graph.output[0])[1]
        if isinstance(classes, int) and classes != meta.get("num_classes", classes):
            raise ArtifactReadError(
                f"{self.artifact}: the graph outputs {classes} classes but its metadata says {meta['num_classes']}"
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
        if self.profile:
            options.enable_profiling = True
            options.profile_file_prefix = self.profile
        self.max_batch = spec.shape[0] if spec.shape[0] > 0 else self._max_batch_arg
        if self.cuda_graph and not self.max_batch:
            raise UsageError(
                f"enable_cuda_graph needs a fixed batch: {self.artifact} has a dynamic batch; "
                "pass max_batch (every call is padded to it) or export with --batch"
            )
        cuda_options = dict(self.cuda_options)
        if self.providers[0] == "cuda":
            cuda_options.update(self._open_stream())
        providers = provider_list(self.providers, self._device_id, cuda_options)
        try:
            self._session = ort.InferenceSession(model.SerializeToString(), options, providers=providers)
        except Exception as exc:  # onnxruntime's Fail / InvalidGraph / NotImplemented
            self._stream = None
            extra = f" with CUDA options {self.cuda_options}" if self.cuda_options else ""
            raise ArtifactReadError(f"onnxruntime cannot load {self.artifact}{extra}: {first_line(exc)}") from None
        self.input_spec = spec
        self._logits_dtype = "float16" if logits_elem == onnx.TensorProto.FLOAT16 else "float32"
        self._num_classes = int(meta.get("num_classes") or classes)
        if self._stream is not None:
            self._run_options = ort.RunOptions()
            # the caller's stream waits for ours (see _infer_tensor), no blocking at run end
            self._run_options.add_run_config_entry("disable_synchronize_execution_providers", "1")
            if self.cuda_graph:
                self._bind_static()
        meta["tile_hw"] = [spec.shape[2], spec.shape[3]]
        meta["providers"] = list(self.providers)
        meta["threads"] = threads
        if self.cuda_options:
            meta["cuda_options"] = dict(self.cuda_options)
        self.meta = meta

    def _open_stream(self) -> dict[str, str]:
        """Create the torch CUDA stream the provider computes on; its provider options.

        Without a CUDA build of torch the provider keeps its own stream and tensor inputs go
        through the host (the numpy path)."""
        try:
            import torch

            if not torch.cuda.is_available():
                return {}
        except ImportError:
            return {}
        self._torch = torch
        self._stream = torch.cuda.Stream(device=self.device)
        return {"has_user_compute_stream": "1", "user_compute_stream": str(self._stream.cuda_stream)}

    def _output_shape(self, name: str, n: int) -> tuple[int, ...]:
        th, tw = self.tile_hw
        return (n, th, tw) if name == self._labels_name else (n, self._num_classes, th, tw)

    def _output_dtype(self, name: str) -> str:
        return "uint8" if name == self._labels_name else self._logits_dtype

    def _bind(self, binding, name: str, tensor, is_input: bool = False) -> None:
        """Bind a contiguous torch CUDA tensor to input or output ``name`` by its pointer."""
        dtype = np.dtype(str(tensor.dtype).removeprefix("torch."))
        args = (name, "cuda", self._device_id, dtype, tuple(tensor.shape), tensor.data_ptr())
        (binding.bind_input if is_input else binding.bind_output)(*args)

    def _bind_static(self) -> None:
        """CUDA graph mode: fixed input and output buffers of the fixed batch, bound once."""
        torch, batch = self._torch, self.max_batch
        with torch.cuda.device(self.device):
            image = torch.zeros((batch, 3, *self.tile_hw), dtype=torch.float32, device=self.device)
            self._static = {self.input_spec.name: image}
            for name in filter(None, (self._logits_name, self._labels_name)):
                dtype = getattr(torch, self._output_dtype(name))
                self._static[name] = torch.empty(self._output_shape(name, batch), dtype=dtype, device=self.device)
        binding = self._session.io_binding()
        for name, tensor in self._static.items():
            self._bind(binding, name, tensor, is_input=name == self.input_spec.name)
        self._static_binding = binding

    def _check_io(self, model) -> TensorSpec:
        """Check the graph is image float32 (N,3,H,W) -> logits (N,C,H,W); return the input spec."""
        import onnx

        graph = model.graph
        initializers = {t.name for t in graph.initializer}
        inputs = [i for i in graph.input if i.name not in initializers]
        if len(inputs) != 1:
            raise InputMismatchError(
                f"{self.artifact}: has {len(inputs)} inputs ({', '.join(_describe(i) for i in inputs)}), "
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
                f"{self.artifact}: input is {_describe(inp)}, expected float32 (N,3,H,W) with fixed H and W"
            )
        if not graph.output:
            raise ArtifactReadError(f"{self.artifact}: the graph has no output")
        out = graph.output[0]
        out_dims = _dims(out)
        if out.type.tensor_type.elem_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16) or (
            len(out_dims) != 4 or out_dims[2:] != dims[2:]
        ):
            raise ArtifactReadError(
                f"{self.artifact}: output is {_describe(out)}, expected logits float32 or float16 "
                f"(N,C,{dims[2]},{dims[3]})"
            )
        self._logits_name = out.name
        batch = dims[0] if isinstance(dims[0], int) and dims[0] > 0 else -1
        return TensorSpec(inp.name, (batch, 3, dims[2], dims[3]), "float32")

    def _deactivate(self) -> None:
        if self._stream is not None:
            self._stream.synchronize()
        if self.profile and self._session is not None:
            self.profile_file = self._session.end_profiling()
        self._session = self._run_options = self._static_binding = None
        self._static = {}
        self._stream = None

    # -- inference -----------------------------------------------------------------------
    def _infer_tensor(self, tiles, output: Output):
        """float32 (B, 3, H, W) CUDA tensor -> logits (B, C, H, W) or labels (B, H, W) uint8 on
        the same GPU, computed on the runner's stream, ordered after the caller's current
        stream, which is made to wait for the result."""
        if self._stream is None:  # CPU / TensorRT provider: through the host
            return super()._infer_tensor(tiles, output)
        torch = self._torch
        labels = output == "labels"
        name = self._labels_name if labels and self._labels_name else self._logits_name
        caller = torch.cuda.current_stream(tiles.device)
        stream = self._stream
        stream.wait_stream(caller)  # the input (and memory the caller freed) is ready
        n = tiles.shape[0]
        with torch.cuda.stream(stream):
            if self.cuda_graph:
                image = self._static[self.input_spec.name]
                image[:n].copy_(tiles)
                self._session.run_with_iobinding(self._static_binding, self._run_options)
                result = self._static[name][:n].clone()  # the next replay overwrites the buffer
            else:
                result = torch.empty(
                    self._output_shape(name, n), dtype=getattr(torch, self._output_dtype(name)), device=tiles.device
                )
                binding = self._session.io_binding()
                self._bind(binding, self.input_spec.name, tiles, is_input=True)
                self._bind(binding, name, result)
                self._session.run_with_iobinding(binding, self._run_options)
            if labels and name != self._labels_name:  # float16 logits graph: argmax here
                result = torch.argmax(result, dim=1).to(torch.uint8)
        caller.wait_stream(stream)  # the caller reads the result after the run
        tiles.record_stream(stream)  # the caching allocator keeps both until their streams pass
        result.record_stream(caller)
        return result

    def _infer(self, tiles: np.ndarray, output: Output) -> np.ndarray:
        if self.cuda_graph:  # the graph replays fixed device buffers: go through them
            torch = self._torch
            with torch.cuda.device(self.device):
                result = self._infer_tensor(torch.from_numpy(tiles).to(self.device), output)
                return result.cpu().numpy()
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

        On CPU this is the array itself; on the CUDA provider with the shared torch stream a
        CUDA tensor (:meth:`run_staged` then runs the device-tensor path); on the TensorRT
        provider an IO binding with the input in a device ``OrtValue`` and the logits bound
        to device memory, so that :meth:`run_staged` times the engine without host copies.
        """
        tiles = self.check_input(tiles)
        if not self._on_gpu():
            return tiles
        if self._stream is not None:
            return self._torch.from_numpy(tiles).to(self.device)
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
        if self._stream is not None:
            with self._torch.cuda.device(self.device):
                self.infer(staged)
                self._torch.cuda.current_stream(self.device).synchronize()
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


