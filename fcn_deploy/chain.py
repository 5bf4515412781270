"""The artifact chain in one place: where each backend's artifact lives and whether it is stale.

::

    model.pt (checkpoint) --export--> export/fcn.onnx (fp32) --export --fp16--> export/fcn.fp16.onnx
                                              |         |---export --int8 (calibrated)--> export/fcn.int8.onnx
                                              +--build-engine [--int8]--> engines/*.engine (+ .engine.json)

Every derived ONNX is named ``<stem>.<precision>.onnx`` beside the fp32 export
(:func:`derived_onnx_path`). Every artifact records the sha256 of its parent (ONNX: metadata
``parent``; engine: sidecar ``parent``/``source``).

Staleness (see docs/architecture.md, "The artifact chain"): an artifact is **stale** when the
sha256 it records for its parent differs from the parent file as it is now. The parent is looked
for where the chain puts it: the checkpoint the caller names (``check --model``), else the path
the artifact records; for a derived ONNX, the fp32 ``<stem>.onnx`` beside it, else the recorded
path. **A parent that is absent does not make an artifact stale** (a user who received only the
ONNX can run it), unless the caller named the checkpoint the whole chain must descend from
(``check``, whose reference is that checkpoint): then a link that cannot be verified is reported
as stale. A stale artifact is refused by every command with :class:`StaleArtifactError` and the
command that rebuilds it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from fcn_deploy.defaults import DEFAULT_CHECKPOINT, DEFAULT_ENGINES_DIR, DEFAULT_EXPORT_DIR, ONNX_NAME
from fcn_deploy.errors import ArtifactNotFoundError, FcnDeployError, StaleArtifactError, UsageError



def derived_onnx_path(onnx_path: str | os.PathLike, precision: str) -> Path:
    """The ``precision`` variant beside an fp32 ONNX: ``export/fcn.onnx`` -> ``export/fcn.fp16.onnx``
    (``fp32`` returns ``onnx_path`` itself)."""
    onnx_path = Path(onnx_path)
    if precision == "fp32":
        return onnx_path
    return onnx_path.with_name(f"{onnx_path.stem}.{precision}.onnx")


def fp16_onnx_path(onnx_path: str | os.PathLike) -> Path:
    """``<stem>.fp16.onnx`` beside the fp32 ONNX (what ``export --fp16`` writes)."""
    return derived_onnx_path(onnx_path, "fp16")


def int8_onnx_path(onnx_path: str | os.PathLike) -> Path:
    """``<stem>.int8.onnx`` beside the fp32 ONNX (``export --int8``, the ``ort-int8`` artifact)."""
    return derived_onnx_path(onnx_path, "int8")


def int8_cpu_onnx_path(onnx_path: str | os.PathLike) -> Path:
    """``<stem>.int8-cpu.onnx`` beside the fp32 ONNX (``export --int8-cpu``, the ``ort-int8-cpu``
    artifact: uint8 activations, for onnxruntime's CPU provider only; TensorRT cannot build it)."""
    return derived_onnx_path(onnx_path, "int8-cpu")


def fp32_sibling(onnx_path: str | os.PathLike) -> Path:
    """The fp32 ONNX a derived one sits beside: ``export/fcn.fp16.onnx`` -> ``export/fcn.onnx``."""
    onnx_path = Path(onnx_path)
    return onnx_path.with_name(onnx_path.name.split(".")[0] + ".onnx")


@dataclass(frozen=True)
class Resolved:
    """Which artifact a backend uses and whether it may be used.

    Attributes:
        backend: the backend name.
        path: the artifact (checkpoint, ONNX or engine).
        kind: ``checkpoint``, ``onnx`` or ``engine``.
        precision: the precision the artifact runs at (None where the runner decides).
        stale: None, or one line naming the artifact, its changed parent and the rebuild command.
    """

    backend: str
    path: Path
    kind: str
    precision: str | None
    stale: str | None = None

    def require_fresh(self) -> Path:
        """The path, or :class:`StaleArtifactError` with :attr:`stale`."""
        if self.stale:
            raise StaleArtifactError(self.stale)
        return self.path


def _rebuild_command(path: Path, meta: dict, parent: Path) -> str:
    precision = meta.get("precision") or "fp32"
    if precision == "fp32":
        return f"fcn-deploy export {parent} -o {path} --force"
    flag = precision
    if precision == "int8" and (meta.get("calibration") or {}).get("symmetric") is False:
        flag = "int8-cpu"
    calib = " --voc-root DIR (or --calib PHOTOS)" if precision == "int8" else ""  # needs real images
    return f"fcn-deploy export <checkpoint> -o {fp32_sibling(path)} --{flag}{calib} --force"


def onnx_staleness(path: str | os.PathLike, parent: str | os.PathLike | None = None, *,
                   parent_required: bool = False) -> str | None:
    """Why the fcn-deploy ONNX at ``path`` is stale, or None.

    Args:
        path: an existing ONNX with fcn-deploy metadata.
        parent: where its parent is (default: the path its metadata records).
        parent_required: an absent parent, or no recorded parent sha256, is reported as a reason
            (else it is not stale).
    """
    from fcn_deploy.artifacts import read_artifact_meta
    from fcn_deploy.fileio import sha256_file

    path = Path(path)
    meta = read_artifact_meta(path)
    recorded = meta.get("parent") or {}
    parent = Path(parent) if parent is not None else (Path(recorded["path"]) if recorded.get("path") else None)
    if parent is None or not parent.is_file():
        if parent_required:
            where = parent if parent is not None else "its parent"
            return f"{path} cannot be matched to its parent: {where} not found"
        return None
    if not recorded.get("sha256"):
        return (f"{path} records no parent sha256, so it cannot be matched to {parent}; export it again"
                if parent_required else None)
    current = sha256_file(parent)
    if recorded["sha256"] != current:
        rebuild = _rebuild_command(path, meta, parent)
        old = recorded["sha256"][:12]
        source = Path(recorded["path"]) if recorded.get("path") else None
        if source is None or _same_file(source, parent):
            return (f"{path} is stale: {parent} has changed since it was made from it (sha256 {old} then, "
                    f"{current[:12]} now); rebuild it: {rebuild}")
        # the caller names another parent than the one it was made from (check --model OTHER)
        use = ""
        if meta.get("precision") == "fp32" and source.is_file() and sha256_file(source) == recorded["sha256"]:
            use = f"to use it, name {source} as its checkpoint (check: --model {source}); "
        return (f"{path} is stale for {parent}: it was made from {source} (sha256 {old}), not from {parent} "
                f"({current[:12]}); {use}to make it from {parent}: {rebuild}")
    return None


def _same_file(a: Path, b: Path) -> bool:
    from fcn_deploy.outpaths import same_file

    return same_file(a, b)


def resolve(
    backend: str,
    model: str | os.PathLike | None = None,
    *,
    export_dir: str | os.PathLike = DEFAULT_EXPORT_DIR,
    engines_dir: str | os.PathLike = DEFAULT_ENGINES_DIR,
    precision: str | None = None,
    checkpoint: str | os.PathLike | None = None,
) -> Resolved:
    """The artifact of ``backend`` and its staleness verdict.

    Args:
        backend: a name of :data:`fcn_deploy.runners.registry.BACKENDS`.
        model: an explicit artifact; default: the chain's place for it (``model.pt``,
            ``export_dir/fcn.onnx``, ``export_dir/fcn.<precision>.onnx``, the fitting engine in
            ``engines_dir``). An explicit artifact that does not exist is returned as is (the
            runner reports it when activated).
        precision: ``torch``/``trt`` precision; for ONNX backends it must be None or the backend's.
        checkpoint: the checkpoint the chain must descend from (``check``'s reference); then a
            parent that cannot be found makes the artifact stale.

    Raises:
        UsageError: unknown backend or a precision the backend's artifact does not have.
        ArtifactNotFoundError: no artifact at the default place (the message names the command).
        EngineError / StaleArtifactError / BackendUnavailableError: from the engine search.
    """
    from fcn_deploy.runners.registry import get_backend

    spec = get_backend(backend)
    export_dir, engines_dir = Path(export_dir), Path(engines_dir)
    if spec.artifact == "checkpoint":
        path = Path(model) if model is not None else DEFAULT_CHECKPOINT
        if model is None and not path.is_file():
            raise ArtifactNotFoundError(f"checkpoint {path} not found; run `{spec.build_command}` first")
        return Resolved(backend, path, "checkpoint", precision or "fp32")
    if spec.artifact == "onnx":
        return _resolve_onnx(spec, model, export_dir, precision, checkpoint)
    return _resolve_engine(spec, model, export_dir, engines_dir, precision, checkpoint)


def _resolve_onnx(spec, model, export_dir: Path, precision, checkpoint) -> Resolved:
    own = spec.precision
    if precision not in (None, own):
        from fcn_deploy.runners.registry import backend_for

        other = backend_for("onnx", precision)
        hint = f"; use --backend {other} for {precision}" if other else ""
        raise UsageError(f"--backend {spec.name} runs the {own} ONNX{hint}")
    fp32 = export_dir / ONNX_NAME
    tag = spec.onnx_tag or own
    path = Path(model) if model is not None else derived_onnx_path(fp32, tag)
    if not path.is_file():
        if model is not None:
            return Resolved(spec.name, path, "onnx", own)
        label = "ONNX model" if own == "fp32" else f"{tag.upper()} ONNX model"
        raise ArtifactNotFoundError(f"{label} {path} not found; run `{_build_hint(spec, checkpoint, fp32)}` first")
    required = checkpoint is not None
    try:
        if own == "fp32":
            reason = onnx_staleness(path, checkpoint, parent_required=required)
        else:
            parent = fp32_sibling(path)
            reason = onnx_staleness(path, parent if parent.is_file() else None, parent_required=required)
            if reason is None and parent.is_file():
                reason = onnx_staleness(parent, checkpoint, parent_required=required)
    except FcnDeployError:
        if model is not None:  # an explicit foreign ONNX: the runner says what is wrong with it
            return Resolved(spec.name, path, "onnx", own)
        raise
    return Resolved(spec.name, path, "onnx", own, reason)


def _build_hint(spec, checkpoint, fp32: Path) -> str:
    """The backend's build command with the paths of this call: ``checkpoint`` for model.pt and
    ``-o fp32`` when the export folder is not the default one (e.g. the demo's)."""
    command = spec.build_command
    if checkpoint is not None:
        command = command.replace(" model.pt", f" {checkpoint}", 1)
    if command.startswith("fcn-deploy export ") and fp32 != Path(DEFAULT_EXPORT_DIR) / ONNX_NAME:
        head, sep, options = command.partition(" --")
        command = f"{head} -o {fp32}{sep}{options}"
    return command


def _resolve_engine(spec, model, export_dir: Path, engines_dir: Path, precision, checkpoint) -> Resolved:
    """An explicit engine is checked against its sidecar's ONNX by the runner; the default one is
    the engine :func:`fcn_deploy.trt.sidecar.find_engine` picks: it refuses (StaleArtifactError) an
    engine built from an older version of the ONNX its sidecar names (or of ``export_dir/fcn.onnx``
    when a ``checkpoint`` is named, after that ONNX was matched to the checkpoint)."""
    from fcn_deploy.trt.sidecar import find_engine

    if model is not None:
        return Resolved(spec.name, Path(model), "engine", precision)
    fp32 = export_dir / ONNX_NAME
    if checkpoint is not None:
        if not fp32.is_file():
            raise ArtifactNotFoundError(
                f"{fp32} not found, so no engine can be matched to {checkpoint} (run `fcn-deploy export {checkpoint}`)")
        reason = onnx_staleness(fp32, checkpoint, parent_required=True)
        if reason:
            return Resolved(spec.name, fp32, "engine", precision, reason)
    onnx_path = fp32 if checkpoint is not None else None  # else: the ONNX each sidecar names
    path = find_engine(engines_dir, precision=precision, onnx_path=onnx_path)
    return Resolved(spec.name, path, "engine", precision)
