"""Runners: one interface (activate / infer / deactivate, usable with ``with``) per backend.

Backend modules import their heavy dependencies (torch, onnxruntime, tensorrt) only when
a runner is created or activated, so ``import fcn_deploy.runners`` needs none of them.
:func:`create_runner` finds the artifact through :func:`fcn_deploy.chain.resolve` (``model.pt``,
``export/``, ``engines/``) so that a user never has to type a path, and builds the runner from the
backend's entry in :mod:`fcn_deploy.runners.registry`.
"""

from __future__ import annotations

import os
from typing import Any

from fcn_deploy.runners.base import Runner, TensorSpec
from fcn_deploy.runners.registry import BACKENDS, get_backend

__all__ = ["BACKENDS", "Runner", "TensorSpec", "create_runner"]


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

    Raises:
        StaleArtifactError: the artifact descends from a parent that changed since
            (:func:`fcn_deploy.chain.resolve`); every command refuses it the same way.
    """
    from fcn_deploy.chain import resolve
    from fcn_deploy.runners.device import resolve_device

    spec = get_backend(backend)
    device = resolve_device(backend, device)
    resolved = resolve(backend, model, export_dir=export_dir, engines_dir=engines_dir, precision=precision)
    path = resolved.require_fresh()
    return spec.factory(path, device=device, precision=resolved.precision if spec.artifact == "checkpoint" else precision,
                        **kwargs)
