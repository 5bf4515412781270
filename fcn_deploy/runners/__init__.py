"""Runners: one interface (activate / infer / deactivate, usable with ``with``) per backend.

Backend modules import their heavy dependencies (torch, onnxruntime, tensorrt, pycuda) only when
a runner is created or activated, so ``import fcn_deploy.runners`` needs none of them.
:func:`create_runner` resolves the default artifact chain (``model.pt``, ``export/``,
``engines/``) so that a user never has to type a path.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from fcn_deploy.errors import ArtifactNotFoundError, UsageError
from fcn_deploy.runners.base import Runner, TensorSpec

#: Backend names accepted by :func:`create_runner` and ``--backend``.
BACKENDS = ("torch", "ort", "ort-fp16", "trt")

#: Default checkpoint path of the ``torch`` backend.
DEFAULT_CHECKPOINT = "model.pt"

__all__ = ["BACKENDS", "DEFAULT_CHECKPOINT", "Runner", "TensorSpec", "create_runner"]


def _existing(path: Path, what: str, how: str) -> Path:
    if not path.is_file():
        raise ArtifactNotFoundError(f"{what} {path} not found; run `{how}` first")
    return path


def create_runner(
    backend: str,
    model: str | os.PathLike | None = None,
    *,
    device: str = "auto",
    precision: str | None = None,
    export_dir: str | os.PathLike = "export",
    engines_dir: str | os.PathLike = "engines",
    **kwargs: Any,
) -> Runner:
    """Create (not activate) the runner of ``backend``.

    Args:
        backend: one of :data:`BACKENDS`.
        model: the artifact (checkpoint, ONNX or engine); default ``model.pt``,
            ``export_dir/fcn.onnx``, ``export_dir/fcn.fp16.onnx`` or the engine in ``engines_dir``
            that fits this GPU and TensorRT.
        device: ``auto`` (:func:`fcn_deploy.runners.device.resolve_device`: CUDA when a GPU
            and the backend's GPU runtime are present, else CPU), ``cpu``, ``cuda`` or
            ``cuda:N`` (for ``ort*``: the CPU or CUDA execution provider, unless
            ``providers=`` is passed; ``trt`` always uses GPU N, default 0).
        precision: ``fp32``/``fp16`` for ``torch`` and ``trt``; for ``ort*`` the ONNX decides,
            so it must be None or match the backend.
        kwargs: passed on to the runner (``tile_hw``, ``channels_last``, ``threads``, ...).
    """
    from fcn_deploy.runners.device import resolve_device

    device = resolve_device(backend, device)
    export_dir, engines_dir = Path(export_dir), Path(engines_dir)
    if backend == "torch":
        path = Path(model) if model is not None else _existing(
            Path(DEFAULT_CHECKPOINT), "checkpoint", "fcn-deploy train -o model.pt"
        )
        from fcn_deploy.runners.torch_runner import TorchRunner

        return TorchRunner(path, device=device, precision=precision or "fp32", **kwargs)
    if backend in ("ort", "ort-fp16"):
        own = "fp16" if backend == "ort-fp16" else "fp32"
        if precision not in (None, own):
            other = "ort-fp16" if precision == "fp16" else "ort"
            raise UsageError(f"--backend {backend} runs the {own} ONNX; use --backend {other} for {precision}")
        if model is not None:
            path = Path(model)
        elif backend == "ort":
            path = _existing(export_dir / "fcn.onnx", "ONNX model", "fcn-deploy export model.pt")
        else:
            path = _existing(export_dir / "fcn.fp16.onnx", "FP16 ONNX model", "fcn-deploy export model.pt --fp16")
        from fcn_deploy.runners.onnxrt import OnnxRuntimeRunner

        if device.startswith("cuda"):
            kwargs.setdefault("providers", ("cuda",))
            kwargs.setdefault("device_id", int(device.partition(":")[2] or 0))
        runner = OnnxRuntimeRunner(path, **kwargs)
        runner.name = backend
        return runner
    if backend == "trt":
        from fcn_deploy.engine import find_engine
        from fcn_deploy.runners.tensorrt import TensorRTRunner

        path = Path(model) if model is not None else find_engine(engines_dir, precision=precision)
        # TensorRT always runs on a GPU; "cuda:N" picks which (default 0, also for "cpu").
        return TensorRTRunner(path, device=int(device.partition(":")[2] or 0), **kwargs)
    raise UsageError(f"--backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
