"""The backend registry: one :class:`BackendSpec` per ``--backend`` name.

A spec says what the backend runs (artifact kind and precision), how to build its runner, whether
it can run here and what to install when it cannot. ``open_runner``, the CLI's ``--backend``
choices and ``check``'s backend list all come from :data:`REGISTRY`; adding a backend is one entry
(``ort-int8`` is the last one added).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from fcn_deploy.errors import UsageError
from fcn_deploy.runners.ortimport import ORT_INSTALL_HINT


def _installed(*modules: str) -> bool:
    for name in modules:
        try:
            if importlib.util.find_spec(name) is not None:
                return True
        except (ImportError, ValueError):
            continue
    return False


def _torch_factory(path: Path, *, device: str, precision: str | None, **kwargs: Any):
    from fcn_deploy.runners.torch_runner import TorchRunner

    return TorchRunner(path, device=device, precision=precision or "fp32", **kwargs)


def _ort_factory(name: str) -> Callable[..., Any]:
    def make(path: Path, *, device: str, precision: str | None, **kwargs: Any):
        from fcn_deploy.runners.device import device_index, is_cuda
        from fcn_deploy.runners.onnxrt import OnnxRuntimeRunner

        if is_cuda(device):
            kwargs.setdefault("providers", ("cuda",))
            kwargs.setdefault("device_id", device_index(device))
        runner = OnnxRuntimeRunner(path, **kwargs)
        runner.name = name
        return runner

    return make


def _trt_factory(path: Path, *, device: str, precision: str | None, **kwargs: Any):
    from fcn_deploy.trt.runtime import TensorRTRunner

    # TensorRT runs on a GPU: "cuda:N" picks which; "cpu" is refused unless a fake TensorRT is
    # passed (``trt=``: the tests' recording fake runs on host tensors)
    return TensorRTRunner(path, device=device, **kwargs)


@dataclass(frozen=True)
class BackendSpec:
    """One backend.

    Attributes:
        name: the ``--backend`` value.
        precision: the precision of its artifact (``fp32``, ``fp16``, ``int8``), or None when
            the runner takes ``--precision`` (torch, trt).
        artifact: ``checkpoint``, ``onnx`` or ``engine``; for ``onnx`` the file is
            :func:`fcn_deploy.chain.derived_onnx_path` of ``export/fcn.onnx`` and ``precision``.
        factory: ``factory(path, device=..., precision=..., **runner_kwargs)`` -> an inactive Runner.
        modules: top-level modules of which one must be importable for the backend to run.
        install_hint: what to install when none is.
        build_command: the command that makes its default artifact.
        checked: whether ``check`` compares it with the PyTorch reference (torch *is* the reference).
        onnx_tag: for ``onnx``, the name tag of its file when it is not the precision
            (``int8-cpu``: ``export/fcn.int8-cpu.onnx``, an int8 variant).
    """

    name: str
    precision: str | None
    artifact: str
    factory: Callable[..., Any]
    modules: tuple[str, ...]
    install_hint: str
    build_command: str
    checked: bool = True
    onnx_tag: str | None = None

    def available(self) -> str | None:
        """None when the backend's Python packages are installed, else why not (with the hint).
        (A GPU, CUDA provider or fitting engine is checked when the runner is activated.)"""
        if _installed(*self.modules):
            return None
        return f"--backend {self.name} needs {' or '.join(self.modules)}, which is not installed; {self.install_hint}"


REGISTRY: dict[str, BackendSpec] = {
    spec.name: spec
    for spec in (
        BackendSpec("torch", None, "checkpoint", _torch_factory, ("torch",),
                    "pip install fcn-deploy", "fcn-deploy train -o model.pt", checked=False),
        BackendSpec("ort", "fp32", "onnx", _ort_factory("ort"), ("onnxruntime",),
                    ORT_INSTALL_HINT, "fcn-deploy export model.pt"),
        BackendSpec("ort-fp16", "fp16", "onnx", _ort_factory("ort-fp16"), ("onnxruntime",),
                    ORT_INSTALL_HINT, "fcn-deploy export model.pt --fp16"),
        BackendSpec("ort-int8", "int8", "onnx", _ort_factory("ort-int8"), ("onnxruntime",),
                    ORT_INSTALL_HINT, "fcn-deploy export model.pt --int8 --voc-root DIR (or --calib PHOTOS)"),
        # CPU only: uint8 activations (onnxruntime fuses every conv); TensorRT refuses its zero points
        BackendSpec("ort-int8-cpu", "int8", "onnx", _ort_factory("ort-int8-cpu"), ("onnxruntime",),
                    ORT_INSTALL_HINT, "fcn-deploy export model.pt --int8-cpu --voc-root DIR (or --calib PHOTOS)",
                    onnx_tag="int8-cpu"),
        BackendSpec("trt", None, "engine", _trt_factory, ("tensorrt", "tensorrt_rtx", "tensorrt_rtx_bindings"),
                    "pip install 'fcn-deploy[trt]' (TensorRT) or 'fcn-deploy[rtx]'",
                    "fcn-deploy build-engine --fp16"),
    )
}

#: Backend names, in the order the CLI lists them.
BACKENDS: tuple[str, ...] = tuple(REGISTRY)
#: Backends ``check`` compares with the reference (``all`` expands to these).
CHECK_BACKENDS: tuple[str, ...] = tuple(n for n, s in REGISTRY.items() if s.checked)


def get_backend(name: str) -> BackendSpec:
    """The spec of ``name``; :class:`UsageError` naming the valid ones otherwise."""
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        raise UsageError(f"--backend must be one of {', '.join(BACKENDS)}, not {name!r}") from None


def backend_for(artifact: str, precision: str) -> str | None:
    """The backend running an ``artifact`` of ``precision`` (e.g. ``onnx``, ``fp16`` -> ``ort-fp16``)."""
    return next((s.name for s in REGISTRY.values() if s.artifact == artifact and s.precision == precision), None)
