"""TensorRT engines: build (TensorRT 10/11 or TensorRT-RTX), name, describe in a JSON sidecar, select.

One recipe serves every flavour: the ONNX is parsed into a *strongly typed* network (required by
TensorRT 11, which removed ``BuilderFlag.FP16``; opted into on TensorRT 10 and TensorRT-RTX), so
an FP16 engine comes from the FP16 ONNX of :func:`fcn_deploy.export.convert_fp16` (float32 IO,
FP16 inside) and an FP32 engine from the FP32 export, with TF32 switched off (it moved 0.1% of
argmax pixels on an H200, see DESIGN.md).

Everything that differs between ``tensorrt`` and ``tensorrt_rtx_bindings`` lives in
:class:`TrtFlavour`. Engine selection (:func:`engine_mismatch`) is a pure function of the sidecar
and a "machine facts" dict, so it is tested without a GPU.

Sidecar ``<engine>.json`` (``format`` "fcn-deploy-engine")::

    {"format", "format_version", "engine", "engine_sha256", "precision",
     "trt": {"flavour", "label", "version"},
     "target": {"portable", "compute_capabilities": ["8.6", ...], "gpu": name or null},
     "io": {"inputs": [{"name", "shape", "dtype"}], "outputs": [...]},   # -1 = dynamic batch
     "profile": {"input", "min", "opt", "max"}, "labels_output": "labels" or null,
     "parent": {"path", "sha256"},    # the ONNX the engine was parsed from
     "source": {"path", "sha256"},    # the FP32 export it descends from (== parent for fp32)
     "build": {"seconds", "workspace_mib", "tf32", "timing_cache"},
     "classes", "colormap", "mean", "std", "tile_hw", "num_classes", "fcn_deploy_version"}
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import importlib
import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Iterable, Iterator

from fcn_deploy import __version__
from fcn_deploy.errors import (
    ArtifactNotFoundError,
    BackendUnavailableError,
    EngineError,
    StaleArtifactError,
    UsageError,
)
from fcn_deploy.fileio import check_writable, sha256_file, write_bytes_atomic, write_json_atomic

log = logging.getLogger(__name__)

ENGINE_FORMAT = "fcn-deploy-engine"
ENGINE_FORMAT_VERSION = 1
#: Name of the optional uint8 class-index output appended at build time (``labels_output=True``).
LABELS_OUTPUT = "labels"
#: Artifact metadata copied from the ONNX into every sidecar.
META_KEYS = ("classes", "colormap", "mean", "std", "tile_hw", "num_classes")
PRECISIONS = ("fp16", "fp32")
#: numpy dtype name of each TensorRT ``DataType`` member name (types numpy lacks are absent).
TRT_TO_NUMPY = {
    "FLOAT": "float32",
    "HALF": "float16",
    "INT8": "int8",
    "UINT8": "uint8",
    "INT32": "int32",
    "INT64": "int64",
    "BOOL": "bool",
}


# --- flavours ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrtFlavour:
    """One TensorRT Python package and what it can do; the only place the two APIs differ.

    Attributes:
        name: ``"tensorrt"`` or ``"rtx"`` (the ``--trt`` value and the sidecar's flavour).
        module: import name of the Python bindings.
        label: human name used in messages.
        tag: file-name prefix before the version (``trt-10.13.0``, ``trt-rtx-1.7.1``).
        extra: the pip extra that installs it.
        portable: builds ahead of time on the CPU for a set of compute capabilities
            (TensorRT-RTX); otherwise the engine is built on, and only runs on, the GPU at hand.
        supports_timing_cache: honours ``IBuilderConfig.set_timing_cache`` (TensorRT-RTX turned
            timing-cache calls into no-ops in 1.2).
    """

    name: str
    module: str
    label: str
    tag: str
    extra: str
    portable: bool
    supports_timing_cache: bool

    @property
    def needs_gpu_to_build(self) -> bool:
        return not self.portable

    @property
    def install_hint(self) -> str:
        return f"pip install 'fcn-deploy[{self.extra}]'"

    def load(self) -> ModuleType:
        """Import the bindings; :class:`BackendUnavailableError` with the install line if absent."""
        try:
            return importlib.import_module(self.module)
        except (ImportError, OSError) as exc:
            raise BackendUnavailableError(
                f"{self.label} is not installed or does not load ({exc}); {self.install_hint}"
            ) from None

    def default_targets(self, trt: ModuleType) -> list[str]:
        """Compute capabilities ("8.6", ...) a default ahead-of-time build covers; [] if not portable.

        TensorRT-RTX documents its default targets as Ampere and later; Turing (SM75) only when
        asked for explicitly. The list is read from the installed ``ComputeCapability`` enum.
        """
        if not self.portable:
            return []
        names = [n for n in trt.ComputeCapability.__members__ if re.fullmatch(r"SM\d{2,3}", n)]
        return [f"{n[2:-1]}.{n[-1]}" for n in names if n != "SM75"]


FLAVOURS: dict[str, TrtFlavour] = {
    "tensorrt": TrtFlavour("tensorrt", "tensorrt", "TensorRT", "trt", "trt", False, True),
    "rtx": TrtFlavour("rtx", "tensorrt_rtx_bindings", "TensorRT-RTX", "trt-rtx", "rtx", True, False),
}


def resolve_flavour(choice: str = "auto") -> tuple[TrtFlavour, ModuleType]:
    """``"auto"`` prefers full TensorRT when importable, else TensorRT-RTX; returns (flavour, module)."""
    if choice == "auto":
        for flavour in FLAVOURS.values():
            try:
                return flavour, flavour.load()
            except BackendUnavailableError:
                continue
        raise BackendUnavailableError(
            "neither TensorRT nor TensorRT-RTX is installed: "
            f"{FLAVOURS['tensorrt'].install_hint} (builds on an NVIDIA GPU) or "
            f"{FLAVOURS['rtx'].install_hint} (builds portable engines, no GPU needed)"
        )
    if choice not in FLAVOURS:
        raise UsageError(f"--trt must be auto, tensorrt or rtx, not {choice!r}")
    flavour = FLAVOURS[choice]
    return flavour, flavour.load()


def short_version(version: str) -> str:
    """``"10.13.0.35"`` -> ``"10.13.0"`` (the part shown in file names)."""
    return ".".join(version.split(".")[:3])


# --- machine facts (impure) ----------------------------------------------------------------------
def gpu_info(device: int = 0) -> dict[str, str]:
    """Name and compute capability ("8.9") of CUDA device ``device``, via pycuda.

    Raises :class:`BackendUnavailableError` when pycuda is missing or there is no such device.
    """
    try:
        import pycuda.driver as cuda
    except ImportError:
        raise BackendUnavailableError(
            "pycuda is not installed (needed to find the GPU): pip install 'fcn-deploy[trt]' "
            "or pip install pycuda"
        ) from None
    try:
        cuda.init()
        count = cuda.Device.count()
    except cuda.Error as exc:
        raise BackendUnavailableError(f"no usable CUDA driver: {exc}") from None
    if count == 0:
        raise BackendUnavailableError("no CUDA device found")
    if not 0 <= device < count:
        raise UsageError(f"--device {device} does not exist; this machine has {count} CUDA device(s)")
    dev = cuda.Device(device)
    major, minor = dev.compute_capability()
    return {"name": dev.name(), "compute_capability": f"{major}.{minor}"}


def machine_facts(device: int = 0, flavours: Iterable[str] | None = None) -> dict[str, Any]:
    """What engine selection needs to know about this machine.

    Returns ``{"trt": {flavour: version or None}, "gpu": {"name", "compute_capability"} or None,
    "gpu_error": why no GPU is known, or None}``.
    """
    versions: dict[str, str | None] = {}
    for name in flavours if flavours is not None else FLAVOURS:
        try:
            versions[name] = FLAVOURS[name].load().__version__
        except BackendUnavailableError:
            versions[name] = None
    try:
        gpu, error = gpu_info(device), None
    except BackendUnavailableError as exc:
        gpu, error = None, str(exc)
    return {"trt": versions, "gpu": gpu, "gpu_error": error}


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
        precision: ``"fp16"``/``"fp32"`` when the caller wants one, else any.
        onnx_sha256: sha256 of the current ONNX (FP32 export or its FP16 child); an engine built
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
    engines FP16 beats FP32, a GPU-specific build beats a portable one, then the newest wins.

    Raises :class:`EngineError` listing every engine and why it does not fit
    (:class:`StaleArtifactError` when one of them only fails for descending from an old ONNX).
    """
    if precision is not None and precision not in PRECISIONS:
        raise UsageError(f"precision must be fp16 or fp32, not {precision!r}")
    engines_dir = Path(engines_dir)
    engines = sorted(engines_dir.glob("*.engine")) if engines_dir.is_dir() else []
    if not engines:
        raise EngineError(
            f"no engine in {engines_dir}/; build one with: fcn-deploy build-engine --{precision or 'fp16'}"
        )
    machine = machine if machine is not None else machine_facts()
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
            rank = (sidecar["precision"] == "fp16", not sidecar["target"]["portable"], engine.stat().st_mtime)
            fitting.append((rank, engine))
        else:
            reasons.append(f"{engine.name}: {reason}")
            stale = stale or reason.startswith(STALE)
    if fitting:
        return max(fitting, key=lambda item: item[0])[1]
    gpu = machine.get("gpu")
    here = f"{gpu['name']} {cc_tag(gpu['compute_capability'])}" if gpu else f"no GPU: {machine.get('gpu_error')}"
    raise (StaleArtifactError if stale else EngineError)(
        f"no engine in {engines_dir}/ fits this machine ({here}): " + "; ".join(reasons)
        + "; build one here with: fcn-deploy build-engine --fp16"
    )


# --- building ------------------------------------------------------------------------------------
@dataclass
class EngineReport:
    """What :func:`build_engine` wrote."""

    engine: Path
    sidecar: Path
    meta: dict[str, Any]
    seconds: float
    fp16_onnx: Path | None = None
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        io = self.meta["io"]
        lines = [
            f"wrote {self.engine} ({self.engine.stat().st_size / 2**20:.1f} MiB) and {self.sidecar.name}",
            f"  {self.meta['trt']['label']} {self.meta['trt']['version']}, {self.meta['precision']}, "
            f"targets {'/'.join(cc_tag(c) for c in self.meta['target']['compute_capabilities'])}"
            f"{' (portable)' if self.meta['target']['portable'] else ''}, built in {self.seconds:.1f} s",
        ]
        for kind in ("inputs", "outputs"):
            for t in io[kind]:
                lines.append(f"  {kind[:-1]:6s} {t['name']} {t['dtype']} {t['shape']}")
        if self.fp16_onnx is not None:
            lines.append(f"  FP16 ONNX {self.fp16_onnx} written")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Collect garbage first, then keep Python's cyclic collector off while TensorRT runs
    (a context manager, also usable as a decorator: ``@gc_paused()``).

    TensorRT calls back into Python (the logger) while it holds internal locks. A collection
    triggered inside such a callback can free a builder left over from an earlier build, whose
    destructor waits on that same lock: seen as a deadlock inside ``createInferBuilder`` on
    TensorRT-RTX 1.7 when a failed build's objects were still waiting for the collector.
    """
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def collecting_logger(trt: ModuleType):
    """A TensorRT ``ILogger`` that keeps errors (for our messages) and forwards warnings to logging."""

    class _Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg: str) -> None:
            if severity in (trt.ILogger.Severity.ERROR, trt.ILogger.Severity.INTERNAL_ERROR):
                self.errors.append(msg)
            elif severity == trt.ILogger.Severity.WARNING:
                log.warning("%s", msg)

    return _Logger()


def _parse_onnx(trt: ModuleType, builder, logger, onnx_path: Path):
    """Parse ``onnx_path`` into a strongly typed network; EngineError listing every parser error."""
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = []
        for i in range(parser.num_errors):
            e = parser.get_error(i)
            where = f"node {e.node()} {e.node_name()!r} ({e.node_operator()})" if e.node() >= 0 else "model"
            errors.append(f"[{e.code().name}] {where}: {e.desc()}")
        raise EngineError(
            f"{onnx_path}: the {len(errors)} ONNX parser error(s): " + " | ".join(errors or logger.errors)
        )
    if network.num_inputs == 0 or network.num_outputs == 0:
        raise EngineError(f"{onnx_path}: parsed to a network without inputs or outputs (not an FCN ONNX)")
    return network, parser


def _tensor_info(tensor) -> dict[str, Any]:
    dtype = tensor.dtype.name
    return {"name": tensor.name, "shape": list(tensor.shape), "dtype": TRT_TO_NUMPY.get(dtype, dtype)}


def _add_labels_output(trt: ModuleType, network) -> None:
    """Append argmax over classes as output ``labels``: uint8 (N, 1, H, W).

    TopK(MAX, k=1) over axis 1 yields int32 indices; a cast makes them uint8 so that a batch of
    32 tiles moves 4.9 MB to the host instead of 413 MB of float32 logits.
    """
    logits = network.get_output(0)
    topk = network.add_topk(logits, op=trt.TopKOperation.MAX, k=1, axes=1 << 1)
    cast = network.add_cast(topk.get_output(1), trt.DataType.UINT8)
    labels = cast.get_output(0)
    labels.name = LABELS_OUTPUT
    network.mark_output(labels)


def _fp16_onnx(onnx_path: Path, onnx_sha: str) -> tuple[Path, bool]:
    """The FP16 child of an FP32 export, (re)made when absent or stale; returns (path, written)."""
    from fcn_deploy.artifacts import read_artifact_meta
    from fcn_deploy.errors import FcnDeployError
    from fcn_deploy.export import convert_fp16, fp16_output_path

    fp16 = fp16_output_path(onnx_path)
    if fp16.is_file():
        try:
            if read_artifact_meta(fp16)["parent"]["sha256"] == onnx_sha:
                return fp16, False
            log.info("%s is stale (made from another %s); regenerating it", fp16, onnx_path.name)
        except (FcnDeployError, KeyError, TypeError) as exc:
            log.warning("regenerating unreadable %s: %s", fp16, exc)
    return convert_fp16(onnx_path, fp16, force=True), True


def _check_build_args(precision, workspace_mib, min_batch, opt_batch, max_batch) -> None:
    if precision not in PRECISIONS:
        raise UsageError(f"precision must be fp16 or fp32, not {precision!r}")
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise UsageError(
            f"--min-batch {min_batch} <= --opt-batch {opt_batch} <= --max-batch {max_batch} must hold (all >= 1)"
        )
    if workspace_mib is not None and workspace_mib < 1:
        raise UsageError(f"--workspace must be at least 1 MiB, not {workspace_mib}")


@gc_paused()
def build_engine(
    onnx_path: str | Path = "export/fcn.onnx",
    output: str | Path | None = None,
    *,
    precision: str = "fp16",
    flavour: str = "auto",
    engines_dir: str | Path = "engines",
    workspace_mib: int | None = None,
    min_batch: int = 1,
    opt_batch: int = 8,
    max_batch: int = 32,
    timing_cache: str | Path | None = None,
    labels_output: bool = False,
    force: bool = False,
) -> EngineReport:
    """Build a TensorRT engine from an fcn-deploy ONNX export and write it with its sidecar.

    Args:
        onnx_path: the FP32 export (its FP16 child ``<stem>.fp16.onnx`` is made beside it when
            ``precision="fp16"`` and it is absent or stale), or an FP16 ONNX directly.
        output: engine path; default ``engines_dir/<name showing precision, flavour, target>``.
        precision: ``"fp16"`` or ``"fp32"``; both networks are strongly typed, IO stays float32.
        flavour: ``"auto"``, ``"tensorrt"`` or ``"rtx"``.
        workspace_mib: workspace memory-pool limit (MiB); TensorRT's default when ``None``.
        min_batch, opt_batch, max_batch: optimisation profile of a dynamic batch dimension.
        timing_cache: file read before and written after the build (flavours that support one).
        labels_output: also output ``labels``, uint8 (N, 1, H, W) class indices.
        force: overwrite an existing engine.
    """
    _check_build_args(precision, workspace_mib, min_batch, opt_batch, max_batch)
    flv, trt = resolve_flavour(flavour)
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise ArtifactNotFoundError(f"ONNX {onnx_path} not found; run fcn-deploy export first")
    from fcn_deploy.artifacts import parent_ref, read_artifact_meta

    meta = read_artifact_meta(onnx_path)
    if meta.get("precision") == "fp16" and precision != "fp16":
        raise UsageError(f"{onnx_path} is an FP16 ONNX; pass --fp16 or give the FP32 export")
    if flv.portable:
        target = {"portable": True, "compute_capabilities": flv.default_targets(trt), "gpu": None}
    else:
        gpu = gpu_info(0)
        target = {"portable": False, "compute_capabilities": [gpu["compute_capability"]], "gpu": gpu["name"]}
    if output is None:
        stem = onnx_path.name.split(".")[0]
        output = Path(engines_dir) / engine_filename(stem, precision, flv, trt.__version__, target)
    output = check_writable(output, force)
    side = sidecar_path(output)

    given = parent_ref(onnx_path)
    fp16_written = None
    if meta.get("precision") == "fp16":
        build_from, parent, source = onnx_path, given, dict(meta["parent"])
    elif precision == "fp16":
        build_from, written = _fp16_onnx(onnx_path, given["sha256"])
        fp16_written = build_from if written else None
        parent, source = parent_ref(build_from), given
    else:
        build_from, parent, source = onnx_path, given, given
    notes: list[str] = []

    logger = collecting_logger(trt)
    builder = trt.Builder(logger)
    # the parser holds the weights the network points to: keep it alive until the build is done
    network, _parser = _parse_onnx(trt, builder, logger, build_from)
    if network.num_inputs != 1:
        raise EngineError(f"{build_from}: expected one input, the network has {network.num_inputs}")
    if labels_output:
        _add_labels_output(trt, network)
    inp = network.get_input(0)
    in_shape = list(inp.shape)
    if len(in_shape) != 4 or any(d < 0 for d in in_shape[1:]):
        raise EngineError(f"{build_from}: input {inp.name} has shape {in_shape}, expected (N, 3, H, W)")

    config = builder.create_builder_config()
    if workspace_mib is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mib << 20)
    if precision == "fp32":
        config.clear_flag(trt.BuilderFlag.TF32)
    tf32 = bool(config.get_flag(trt.BuilderFlag.TF32))
    if in_shape[0] < 0:
        shapes = [[b, *in_shape[1:]] for b in (min_batch, opt_batch, max_batch)]
        profile = builder.create_optimization_profile()
        profile.set_shape(inp.name, *shapes)
        config.add_optimization_profile(profile)
    else:
        shapes = [in_shape] * 3
        notes.append(f"the ONNX batch is fixed at {in_shape[0]}; batch options ignored")
    cache_path = Path(timing_cache) if timing_cache is not None else None
    if cache_path is not None and not flv.supports_timing_cache:
        notes.append(f"{flv.label} has no timing cache; --timing-cache ignored")
        cache_path = None
    if cache_path is not None:
        try:
            cached = cache_path.read_bytes() if cache_path.exists() else b""
        except OSError as exc:
            raise UsageError(f"--timing-cache {cache_path}: cannot read it ({exc.strerror})") from None
        cache = config.create_timing_cache(cached)
        config.set_timing_cache(cache, ignore_mismatch=False)

    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - start
    if serialized is None:
        raise EngineError(
            f"{flv.label} could not build an engine from {build_from}: "
            + (" | ".join(logger.errors) or "no error reported")
        )
    engine_bytes = bytes(serialized)
    if cache_path is not None:
        write_bytes_atomic(cache_path, bytes(config.get_timing_cache().serialize()))

    sidecar = {
        "format": ENGINE_FORMAT,
        "format_version": ENGINE_FORMAT_VERSION,
        "engine": output.name,
        "engine_sha256": hashlib.sha256(engine_bytes).hexdigest(),
        "precision": precision,
        "trt": {"flavour": flv.name, "label": flv.label, "version": trt.__version__},
        "target": target,
        "io": {
            "inputs": [_tensor_info(network.get_input(i)) for i in range(network.num_inputs)],
            "outputs": [_tensor_info(network.get_output(i)) for i in range(network.num_outputs)],
        },
        "profile": {"input": inp.name, "min": shapes[0], "opt": shapes[1], "max": shapes[2]},
        "labels_output": LABELS_OUTPUT if labels_output else None,
        "parent": parent,
        "source": source,
        "build": {
            "seconds": round(seconds, 3),
            "workspace_mib": workspace_mib,
            "tf32": tf32,
            "timing_cache": str(cache_path) if cache_path is not None else None,
        },
        **{k: meta[k] for k in META_KEYS if k in meta},
        "fcn_deploy_version": __version__,
    }
    write_bytes_atomic(output, engine_bytes)
    write_json_atomic(side, sidecar)
    return EngineReport(output, side, sidecar, seconds, fp16_written, notes)
