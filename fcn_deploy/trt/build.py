"""Build a TensorRT engine (TensorRT 10/11 or TensorRT-RTX) from an fcn-deploy ONNX export.

One recipe serves every flavour: the ONNX is parsed into a *strongly typed* network (required by
TensorRT 11, which removed ``BuilderFlag.FP16``; opted into on TensorRT 10 and TensorRT-RTX), so
an FP16 engine comes from the FP16 ONNX of :func:`fcn_deploy.export.convert_fp16` (float32 IO,
FP16 inside; made or remade beside the FP32 export when absent or stale), an FP32 engine from
the FP32 export, with TF32 switched off (it moved 0.1% of argmax pixels on an H200, see
docs/architecture.md), and an INT8 engine from the calibrated QDQ ONNX of ``export --int8``
(:mod:`fcn_deploy.export.int8`; explicit quantization: the Q/DQ scales type every int8 tensor, no
``BuilderFlag.INT8``, which TensorRT 11 and TensorRT-RTX do not have). The INT8 ONNX cannot be
made here (calibration needs real images): it must exist beside the FP32 export and be fresh.
The engine is written with its sidecar (:mod:`fcn_deploy.trt.sidecar`).
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from fcn_deploy import __version__
from fcn_deploy.errors import ArtifactNotFoundError, EngineError, StaleArtifactError, UsageError
from fcn_deploy.fileio import check_writable, write_bytes_atomic, write_json_atomic
from fcn_deploy.trt.flavour import TRT_TO_NUMPY, collecting_logger, gc_paused, resolve_flavour
from fcn_deploy.trt.sidecar import (
    ENGINE_FORMAT,
    ENGINE_FORMAT_VERSION,
    LABELS_OUTPUT,
    META_KEYS,
    PRECISIONS,
    cc_tag,
    engine_filename,
    gpu_info,
    sidecar_path,
)

log = logging.getLogger(__name__)


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
    from fcn_deploy.chain import fp16_onnx_path
    from fcn_deploy.export.fp16 import convert_fp16

    fp16 = fp16_onnx_path(onnx_path)
    if fp16.is_file():
        try:
            if read_artifact_meta(fp16)["parent"]["sha256"] == onnx_sha:
                return fp16, False
            log.info("%s is stale (made from another %s); regenerating it", fp16, onnx_path.name)
        except (FcnDeployError, KeyError, TypeError) as exc:
            log.warning("regenerating unreadable %s: %s", fp16, exc)
    return convert_fp16(onnx_path, fp16, force=True), True


def _int8_onnx(onnx_path: Path) -> Path:
    """The INT8 child ``<stem>.int8.onnx`` of an FP32 export; it must exist and descend from the
    export as it is now (it is never made here: calibration needs real images)."""
    from fcn_deploy.chain import int8_onnx_path, onnx_staleness

    int8 = int8_onnx_path(onnx_path)
    make = f"fcn-deploy export <checkpoint> -o {onnx_path} --int8 --voc-root DIR (or --calib PHOTOS)"
    if not int8.is_file():
        raise ArtifactNotFoundError(f"INT8 ONNX {int8} not found (calibration needs real images); make it with `{make}`")
    reason = onnx_staleness(int8, onnx_path, parent_required=True)
    if reason:
        raise StaleArtifactError(reason)
    return int8


def _check_build_args(precision, workspace_mib, min_batch, opt_batch, max_batch) -> None:
    if precision not in PRECISIONS:
        raise UsageError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise UsageError(
            f"--min-batch {min_batch} <= --opt-batch {opt_batch} <= --max-batch {max_batch} must hold (all >= 1)"
        )
    if workspace_mib is not None and workspace_mib < 1:
        raise UsageError(f"--workspace must be at least 1 MiB, not {workspace_mib}")


def _check_not_inputs(onnx_path: Path, output: Path, timing_cache) -> None:
    """Refuse an engine ``output`` (or its sidecar) that is the ONNX, one of its children or
    their sidecars, or the timing cache: an output never replaces an input (before any work)."""
    from fcn_deploy.artifacts import sidecar_path as onnx_sidecar
    from fcn_deploy.chain import fp16_onnx_path, int8_onnx_path
    from fcn_deploy.outpaths import check_distinct_paths

    inputs: dict[str, Path] = {}
    for role, path in (("the input ONNX", onnx_path), ("the FP16 ONNX", fp16_onnx_path(onnx_path)),
                       ("the INT8 ONNX", int8_onnx_path(onnx_path))):
        inputs[role] = path
        inputs[f"the sidecar of {role}"] = onnx_sidecar(path)
    check_distinct_paths({"-o": output, "the engine's sidecar": sidecar_path(output),
                          "--timing-cache": timing_cache}, inputs)


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
            ``precision="fp16"`` and it is absent or stale; its INT8 child ``<stem>.int8.onnx``
            must exist and be fresh for ``precision="int8"``), or an FP16 / INT8 ONNX directly.
        output: engine path; default ``engines_dir/<name showing precision, flavour, target>``.
        precision: ``"fp16"``, ``"fp32"`` or ``"int8"``; every network is strongly typed, IO
            stays float32.
        flavour: ``"auto"``, ``"tensorrt"`` or ``"rtx"``.
        workspace_mib: workspace memory-pool limit (MiB); TensorRT's default when ``None``.
        min_batch, opt_batch, max_batch: optimisation profile of a dynamic batch dimension.
        timing_cache: file read before and written after the build (flavours that support one).
        labels_output: also output ``labels``, uint8 (N, 1, H, W) class indices.
        force: overwrite an existing engine.
    """
    _check_build_args(precision, workspace_mib, min_batch, opt_batch, max_batch)
    if output is not None:
        _check_not_inputs(Path(onnx_path), Path(output), timing_cache)
    flv, trt = resolve_flavour(flavour)
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise ArtifactNotFoundError(f"ONNX {onnx_path} not found; run fcn-deploy export first")
    from fcn_deploy.artifacts import parent_ref, read_artifact_meta
    from fcn_deploy.chain import onnx_staleness

    meta = read_artifact_meta(onnx_path)
    derived = meta.get("precision") if meta.get("precision") in ("fp16", "int8") else None
    if derived is not None and precision != derived:
        raise UsageError(f"{onnx_path} is an {derived.upper()} ONNX; pass --{derived} or give the FP32 export")
    if derived == "int8" and (meta.get("calibration") or {}).get("symmetric") is False:
        raise UsageError(f"{onnx_path} is the CPU-only INT8 ONNX (uint8 activations with zero points, which "
                         "TensorRT refuses); build from the symmetric <stem>.int8.onnx of `export --int8`")
    if derived == "int8":
        reason = onnx_staleness(onnx_path)  # against the FP32 export it records, when that exists
        if reason:
            raise StaleArtifactError(reason)
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
    if derived is not None:
        build_from, parent, source = onnx_path, given, dict(meta["parent"])
    elif precision == "int8":
        build_from = _int8_onnx(onnx_path)
        parent, source = parent_ref(build_from), given
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
