"""The engine's JSON sidecar, this machine's facts, and which engine fits (pure where it can be).

Sidecar ``<engine>.json`` (``format`` "fcn-deploy-engine")::

    {"format", "format_version", "engine", "engine_sha256", "precision",
     "trt": {"flavour", "label", "version"},
     "target": {"portable", "compute_capabilities": ["8.6", ...], "gpu": name or null},
     "io": {"inputs": [{"name", "shape", "dtype"}], "outputs": [...]},   # -1 = dynamic batch
     "profile": {"input", "min", "opt", "max"}, "labels_output": "labels" or null,
     "parent": {"path", "sha256"},    # the ONNX the engine was parsed from (fp16/int8: <stem>.<p>.onnx)
     "source": {"path", "sha256"},    # the FP32 export it descends from (== parent for fp32)
     "build": {"seconds", "workspace_mib", "tf32", "timing_cache"},
     "classes", "colormap", "mean", "std", "tile_hw", "num_classes", "fcn_deploy_version"}

Engine selection (:func:`engine_mismatch`, :func:`find_engine`) is a function of the sidecar and a
"machine facts" dict (:func:`machine_facts`), so it is tested without a GPU. The GPU is found
through torch (the runner's buffers and stream are torch's, so torch seeing the GPU is what
matters); a machine without one gets one line that says so and suggests ``--backend ort``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterable

from fcn_deploy.errors import (
    ArtifactNotFoundError,
    BackendUnavailableError,
    EngineError,
    StaleArtifactError,
    UsageError,
)
from fcn_deploy.fileio import sha256_file
from fcn_deploy.trt.flavour import FLAVOURS, TrtFlavour, short_version

ENGINE_FORMAT = "fcn-deploy-engine"
ENGINE_FORMAT_VERSION = 1
#: Name of the optional uint8 class-index output appended at build time (``labels_output=True``).
LABELS_OUTPUT = "labels"
#: Artifact metadata copied from the ONNX into every sidecar.
META_KEYS = ("classes", "colormap", "mean", "std", "tile_hw", "num_classes")
PRECISIONS = ("fp16", "fp32", "int8")
#: Which precision :func:`find_engine` prefers when none is asked for: FP16, then FP32; an INT8
#: engine (calibrated, larger accuracy cost: docs/architecture.md) only when it is the one that fits.
PREFERENCE = {"fp16": 2, "fp32": 1, "int8": 0}


# --- machine facts (impure) ----------------------------------------------------------------------
def no_gpu_reason() -> str | None:
    """Why torch sees no CUDA device (``None`` when it sees one)."""
    import torch

    try:
        if torch.cuda.is_available():
            return None
    except Exception as exc:  # noqa: BLE001 - a broken driver install raises here on some builds
        return " ".join(str(exc).split())
    if torch.version.cuda is None:
        return "this PyTorch is a CPU-only build"
    try:
        torch.cuda.init()
    except Exception as exc:  # noqa: BLE001 - e.g. "Found no NVIDIA driver on your system. ..."
        return "torch sees no CUDA device: " + str(exc).strip().split(". ")[0].rstrip(".")
    return "torch sees no CUDA device"


def no_gpu_message(reason: str | None) -> str:
    """The one line for ``--backend trt`` on a machine without an NVIDIA GPU."""
    return (
        f"no NVIDIA GPU on this machine ({reason or 'torch sees no CUDA device'}): TensorRT engines "
        "run only on an NVIDIA GPU; use --backend ort to run the ONNX with onnxruntime on the CPU"
    )


def gpu_info(device: int = 0) -> dict[str, str]:
    """Name and compute capability ("8.9") of CUDA device ``device``, as torch sees it.

    Raises :class:`BackendUnavailableError` (:func:`no_gpu_message`) when there is no NVIDIA GPU,
    :class:`UsageError` when ``device`` is not one of them.
    """
    reason = no_gpu_reason()
    if reason is not None:
        raise BackendUnavailableError(no_gpu_message(reason))
    import torch

    count = torch.cuda.device_count()
    if not 0 <= device < count:
        raise UsageError(f"--device cuda:{device} does not exist; this machine has {count} CUDA device(s)")
    major, minor = torch.cuda.get_device_capability(device)
    return {"name": torch.cuda.get_device_name(device), "compute_capability": f"{major}.{minor}"}


def machine_facts(device: int = 0, flavours: Iterable[str] | None = None) -> dict[str, Any]:
    """What engine selection needs to know about this machine.

    Returns ``{"trt": {flavour: version or None}, "gpu": {"name", "compute_capability"} or None,
    "gpu_error": why no GPU is known (:func:`no_gpu_reason`), or None}``.
    """
    versions: dict[str, str | None] = {}
    for name in flavours if flavours is not None else FLAVOURS:
        try:
            versions[name] = FLAVOURS[name].load().__version__
        except BackendUnavailableError:
            versions[name] = None
    reason = no_gpu_reason()
    gpu = gpu_info(device) if reason is None else None
    return {"trt": versions, "gpu": gpu, "gpu_error": reason}


# --- naming and sidecars (pure) ------------------------------------------------------------------
def cc_tag(compute_capability: str) -> str:
    """``"8.9"`` -> ``"sm_89"``."""
    return "sm_" + compute_capability.replace(".", "")


def target_tag(target: dict[str, Any]) -> str:
    """File-name part naming where an engine runs: ``portable`` or ``sm90-NVIDIA_H100``."""
    if target["portable"]:
        return "portable"
    gpu = re.sub(r"[^A-Za-z0-9]+", "_", target.get("gpu") or "").strip("_")
    sm = cc_tag(target["compute_capabilities"][0]).replace("_", "")
    return f"{sm}-{gpu}" if gpu else sm


def engine_filename(stem: str, precision: str, flavour: TrtFlavour, version: str, target: dict) -> str:
    """E.g. ``fcn.fp16.trt-rtx-1.7.1.portable.engine``, ``fcn.fp32.trt-10.13.0.sm90-NVIDIA_H100.engine``."""
    return f"{stem}.{precision}.{flavour.tag}-{short_version(version)}.{target_tag(target)}.engine"


def sidecar_path(engine_path: str | Path) -> Path:
    engine_path = Path(engine_path)
    return engine_path.with_name(engine_path.name + ".json")


def read_sidecar(engine_path: str | Path) -> dict[str, Any]:
    """The sidecar of ``engine_path``; :class:`EngineError` if missing, unreadable or foreign."""
    path = sidecar_path(engine_path)
    try:
        sidecar = json.loads(path.read_text())
    except FileNotFoundError:
        raise EngineError(
            f"{engine_path} has no sidecar {path.name}; rebuild it with fcn-deploy build-engine"
        ) from None
    except (OSError, ValueError) as exc:
        raise EngineError(f"cannot read engine sidecar {path}: {exc}") from None
    if not isinstance(sidecar, dict) or sidecar.get("format") != ENGINE_FORMAT:
        raise EngineError(f"{path} is not an fcn-deploy engine sidecar")
    return sidecar


def check_engine_file(engine_path: str | Path, sidecar: dict[str, Any]) -> None:
    """EngineError when the engine's bytes are not the ones its sidecar describes (truncated, replaced)."""
    engine_path = Path(engine_path)
    if sha256_file(engine_path) != sidecar.get("engine_sha256"):
        raise EngineError(
            f"{engine_path} is not the engine its sidecar describes (truncated, or replaced since "
            f"the build); rebuild it: {rebuild_hint(sidecar)}"
        )


def rebuild_hint(sidecar: dict[str, Any]) -> str:
    """The command that rebuilds the engine a sidecar describes, on this machine."""
    source = sidecar.get("source", {}).get("path", "export/fcn.onnx")
    flavour = sidecar.get("trt", {}).get("flavour", "auto")
    return f"fcn-deploy build-engine {source} --{sidecar.get('precision', 'fp16')} --trt {flavour} --force"


#: Prefix of the :func:`engine_mismatch` reason of an engine that fits but descends from an old ONNX.
STALE = "stale: "


def engine_mismatch(
    sidecar: dict[str, Any],
    machine: dict[str, Any],
    *,
    precision: str | None = None,
    onnx_sha256: str | None = None,
) -> str | None:
    """Why the engine a sidecar describes cannot be used here, or ``None`` when it fits.

    Args:
        sidecar: the engine's sidecar dict.
        machine: :func:`machine_facts` output.
        precision: ``"fp16"``/``"fp32"``/``"int8"`` when the caller wants one, else any.
        onnx_sha256: sha256 of the current ONNX (FP32 export or its FP16/INT8 child); an engine built
            from another one is stale.
    """
    if sidecar.get("format_version") != ENGINE_FORMAT_VERSION:
        return f"sidecar format version {sidecar.get('format_version')}, expected {ENGINE_FORMAT_VERSION}"
    if precision is not None and sidecar["precision"] != precision:
        return f"{sidecar['precision']} engine, {precision} asked for"
    trt = sidecar["trt"]
    flavour = FLAVOURS.get(trt["flavour"])
    if flavour is None:
        return f"unknown TensorRT flavour {trt['flavour']!r}"
    installed = machine["trt"].get(flavour.name)
    if installed is None:
        return f"built with {flavour.label} {trt['version']}, which is not installed ({flavour.install_hint})"
    if installed != trt["version"]:
        return f"built with {flavour.label} {trt['version']}, this machine has {installed}"
    gpu = machine.get("gpu")
    if gpu is None:
        return "no GPU to run it on"
    target = sidecar["target"]
    if gpu["compute_capability"] not in target["compute_capabilities"]:
        built = "/".join(cc_tag(c) for c in target["compute_capabilities"])
        kind = "portable build" if target["portable"] else target.get("gpu") or "another GPU"
        return f"built for {built} ({kind}), this GPU is {cc_tag(gpu['compute_capability'])} ({gpu['name']})"
    if onnx_sha256 is not None and onnx_sha256 not in (
        sidecar["parent"]["sha256"],
        sidecar["source"]["sha256"],
    ):
        return (
            f"{STALE}built from an ONNX with sha256 {sidecar['source']['sha256'][:12]}, "
            f"the current one is {onnx_sha256[:12]}"
        )
    return None


def current_onnx_sha256(sidecar: dict[str, Any], onnx_path: str | Path | None = None) -> str | None:
    """sha256 of ``onnx_path``, or of the FP32 export the sidecar names if that file exists."""
    path = Path(onnx_path) if onnx_path is not None else Path(sidecar["source"]["path"])
    if not path.is_file():
        if onnx_path is not None:
            raise ArtifactNotFoundError(f"ONNX {path} not found")
        return None
    return sha256_file(path)


def find_engine(
    engines_dir: str | Path = "engines",
    *,
    precision: str | None = None,
    onnx_path: str | Path | None = None,
    machine: dict[str, Any] | None = None,
) -> Path:
    """The engine in ``engines_dir`` that fits this machine and the current ONNX.

    Fits = its flavour and version are installed, this GPU's compute capability is one it was
    built for, its precision is ``precision`` (if given) and it descends from ``onnx_path`` (if
    given; else from the export its sidecar names, when that file still exists). Among fitting
    engines FP16 beats FP32 beats INT8 (:data:`PREFERENCE`), then a GPU-specific build beats a portable one, then the newest
    (modification time) wins, then the first by file name.

    Raises :class:`BackendUnavailableError` when this machine has no NVIDIA GPU (no engine can run
    here, whatever ``engines_dir`` holds), else :class:`EngineError` listing every engine and why
    it does not fit (:class:`StaleArtifactError` when one of them only fails for descending from
    an old ONNX).
    """
    if precision is not None and precision not in PRECISIONS:
        raise UsageError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    machine = machine if machine is not None else machine_facts()
    gpu = machine.get("gpu")
    if gpu is None:
        # building again would give the same engine, which cannot run here either
        raise BackendUnavailableError(no_gpu_message(machine.get("gpu_error")))
    engines_dir = Path(engines_dir)
    engines = sorted(engines_dir.glob("*.engine")) if engines_dir.is_dir() else []
    if not engines:
        raise EngineError(
            f"no engine in {engines_dir}/; build one with: fcn-deploy build-engine --{precision or 'fp16'}"
        )
    shas: dict[str, str | None] = {}
    fitting: list[tuple[tuple, Path]] = []
    reasons: list[str] = []
    stale = False
    for engine in engines:
        try:
            sidecar = read_sidecar(engine)
            key = str(onnx_path) if onnx_path is not None else sidecar["source"]["path"]
            if key not in shas:
                shas[key] = current_onnx_sha256(sidecar, onnx_path)
            reason = engine_mismatch(sidecar, machine, precision=precision, onnx_sha256=shas[key])
        except EngineError as exc:
            reason = str(exc)
        except (KeyError, TypeError) as exc:
            reason = f"incomplete sidecar (missing {exc})"
        if reason is None:
            rank = (PREFERENCE.get(sidecar["precision"], -1), not sidecar["target"]["portable"], engine.stat().st_mtime)
            fitting.append((rank, engine))
        else:
            reasons.append(f"{engine.name}: {reason}")
            stale = stale or reason.startswith(STALE)
    if fitting:
        best = max(rank for rank, _ in fitting)
        return min(engine for rank, engine in fitting if rank == best)  # ties: first by name
    here = f"{gpu['name']} {cc_tag(gpu['compute_capability'])}"
    raise (StaleArtifactError if stale else EngineError)(
        f"no engine in {engines_dir}/ fits this machine ({here}): " + "; ".join(reasons)
        + f"; build one here with: fcn-deploy build-engine --{precision or 'fp16'}"
    )
