"""Runners: one interface (activate / infer / deactivate, usable with ``with``) per backend.

* :mod:`~fcn_deploy.runners.base`: the :class:`Runner` contract and its :class:`Capabilities`;
* :mod:`~fcn_deploy.runners.registry`: one :class:`~fcn_deploy.runners.registry.BackendSpec` per
  ``--backend`` name (artifact kind, precision, factory, availability, install hint);
* :mod:`~fcn_deploy.runners.device`: the one ``--device`` parser and ``--device auto``;
* :mod:`~fcn_deploy.runners.torch_runner`, :mod:`~fcn_deploy.runners.onnxrt` (the TensorRT
  runner lives with the engines: :mod:`fcn_deploy.trt.runtime`).

:func:`open_runner` is the one way every command (``infer``, ``evaluate``, ``bench``, ``check``,
``demo``, ``serve`` and the Ray workers) gets a runner: it resolves the artifact through the chain
(:func:`fcn_deploy.chain.resolve`: ``model.pt``, ``export/``, ``engines/``, so that a user never
has to type a path), refuses a stale one, resolves the device and builds the runner from the
backend's registry entry. :func:`locate_runner` is its first half, for a driver that ships the
artifact to workers (``--ray``). Backend modules import their heavy dependencies (torch,
onnxruntime, tensorrt) only when a runner is created or activated, so ``import
fcn_deploy.runners`` needs none of them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fcn_deploy.defaults import DEFAULT_ENGINES_DIR, DEFAULT_EXPORT_DIR
from fcn_deploy.runners.base import Capabilities, Runner, TensorSpec
from fcn_deploy.runners.registry import BACKENDS, get_backend

__all__ = ["BACKENDS", "Capabilities", "Runner", "RunnerPlan", "TensorSpec", "create_runner", "locate_runner",
           "open_runner"]


@dataclass(frozen=True)
class RunnerPlan:
    """What :func:`open_runner` will open: the backend, its fresh artifact (the path as resolved), the
    device (``cpu`` or ``cuda:N``; None: not resolved yet, :meth:`open` resolves it where it runs)
    and the precision the runner is built with (``fp32`` / ``fp16`` for torch and trt, None where
    the artifact decides). Picklable: a Ray driver locates the artifact once and sends the plan
    (:meth:`absolute`) to its workers, which :meth:`open` it on their own device
    (``infer --ray``, ``evaluate --ray``)."""

    backend: str
    artifact: Path
    device: str | None
    precision: str | None

    def absolute(self) -> "RunnerPlan":
        """The same plan with an absolute artifact path (for workers in other folders or hosts)."""
        return RunnerPlan(self.backend, Path(os.path.abspath(self.artifact)), self.device, self.precision)

    def open(self, device: str | None = None, **kwargs: Any) -> Runner:
        """Create (not activate) the runner on ``device`` (default: the plan's; ``auto`` and None
        are resolved here, :func:`~fcn_deploy.runners.device.resolve_device`); ``kwargs`` go to
        the runner (``tile_hw``, ``threads``, ...)."""
        from fcn_deploy.runners.device import resolve_device

        wanted = device or self.device or "auto"
        resolved = wanted if wanted == self.device else resolve_device(self.backend, wanted)
        return get_backend(self.backend).factory(self.artifact, device=resolved, precision=self.precision, **kwargs)


def locate_runner(
    backend: str,
    model: str | os.PathLike | None = None,
    *,
    device: str | None = "auto",
    precision: str | None = None,
    export_dir: str | os.PathLike = DEFAULT_EXPORT_DIR,
    engines_dir: str | os.PathLike = DEFAULT_ENGINES_DIR,
    checkpoint: str | os.PathLike | None = None,
) -> RunnerPlan:
    """Resolve what :func:`open_runner` opens, without creating the runner (arguments as there;
    ``device=None`` leaves the device to :meth:`RunnerPlan.open`, e.g. on a Ray worker).

    Raises:
        UsageError: an unknown backend, device or precision.
        ArtifactNotFoundError: no artifact at the chain's default place (naming the command).
        StaleArtifactError: the artifact descends from a parent that changed since.
        BackendUnavailableError: ``--device auto`` for a backend that needs a GPU, on a machine
            without one (said before the artifact is looked for).
    """
    from fcn_deploy.chain import resolve
    from fcn_deploy.runners.device import resolve_device

    spec = get_backend(backend)
    device = None if device is None else resolve_device(backend, device)
    resolved = resolve(backend, model, export_dir=export_dir, engines_dir=engines_dir, precision=precision,
                       checkpoint=checkpoint)
    return RunnerPlan(backend, resolved.require_fresh(), device, resolved.precision if spec.artifact == "checkpoint" else precision)


def open_runner(
    backend: str,
    model: str | os.PathLike | None = None,
    *,
    device: str = "auto",
    precision: str | None = None,
    export_dir: str | os.PathLike = DEFAULT_EXPORT_DIR,
    engines_dir: str | os.PathLike = DEFAULT_ENGINES_DIR,
    checkpoint: str | os.PathLike | None = None,
    **kwargs: Any,
) -> Runner:
    """Create (not activate) the runner of ``backend``: resolve its artifact, refuse a stale
    one, resolve the device, build the runner.

    Args:
        backend: one of :data:`BACKENDS`.
        model: the artifact (checkpoint, ONNX or engine); default ``model.pt``,
            ``export_dir/fcn.onnx``, ``export_dir/fcn.<precision>.onnx`` or the engine in
            ``engines_dir`` that fits this GPU and TensorRT.
        device: ``auto`` (:func:`fcn_deploy.runners.device.resolve_device`: CUDA when a GPU
            and the backend's GPU runtime are present, else CPU), ``cpu``, ``cuda`` or
            ``cuda:N`` (for ``ort*``: the CPU or CUDA execution provider, unless
            ``providers=`` is passed; ``trt``: GPU N).
        precision: ``fp32``/``fp16`` for ``torch`` and ``trt``; for ``ort*`` the ONNX decides,
            so it must be None or match the backend.
        checkpoint: the checkpoint the artifact must descend from (``check``'s reference): a
            parent that cannot be found then makes the artifact stale too.
        kwargs: passed on to the runner (``tile_hw``, ``channels_last``, ``threads``, ...).

    Raises: as :func:`locate_runner`.
    """
    plan = locate_runner(backend, model, device=device, precision=precision, export_dir=export_dir,
                         engines_dir=engines_dir, checkpoint=checkpoint)
    return plan.open(**kwargs)


#: The name of :func:`open_runner` before it had its own (kept: scripts and notebooks use it).
create_runner = open_runner
