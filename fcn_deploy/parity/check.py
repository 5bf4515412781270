"""``fcn-deploy check``: every requested backend against the float32 PyTorch reference on the CPU."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import numpy as np

from fcn_deploy.errors import (
    ArtifactNotFoundError,
    ArtifactReadError,
    BackendUnavailableError,
    EngineError,
    ExportError,
    StaleArtifactError,
    UsageError,
    VerificationError,
)
from fcn_deploy.fileio import check_output_file, write_json_atomic
from fcn_deploy.outpaths import check_distinct_paths
from fcn_deploy.parity.metrics import ParityAccumulator
from fcn_deploy.parity.report import BackendParity, ParityReport, write_maps
from fcn_deploy.parity.thresholds import (
    apply_thresholds,
    parse_thresholds,
    raise_on_failures,
)
from fcn_deploy.parity.tiles import (
    DEFAULT_MAX_TILES,
    Echo,
    TileSet,
    draw_tiles,
    tile_source,
)
from fcn_deploy.runners.registry import CHECK_BACKENDS


def parse_backends(backends: str | list[str] | tuple[str, ...]) -> tuple[list[str], bool]:
    """Expand ``--backend`` values (repeatable, comma lists, ``all``) into names; the flag says
    whether ``all`` was asked (then a backend that is simply not built is not an error under
    ``--strict``)."""
    items = [backends] if isinstance(backends, str) else list(backends)
    names: list[str] = []
    wants_all = False
    for item in items:
        for name in (p.strip().lower() for p in str(item).split(",")):
            if not name:
                continue
            if name == "all":
                wants_all = True
                names += [b for b in CHECK_BACKENDS if b not in names]
            elif name in CHECK_BACKENDS:
                if name not in names:
                    names.append(name)
            else:
                raise UsageError(f"--backend must be one of {', '.join(CHECK_BACKENDS)} or all, not {name!r}")
    if not names:
        raise UsageError("--backend: no backend given")
    return names, wants_all



def _open_backends(names: list[str], wants_all: bool, model: Path, export_dir: Path, engines_dir: Path,
                   device: str, strict: bool, stack: contextlib.ExitStack) -> tuple[list[BackendParity], dict[str, Any]]:
    """Open (:func:`~fcn_deploy.runners.open_runner`) and activate each backend; return every
    entry and the active runners."""
    from fcn_deploy.runners import open_runner

    entries, runners, problems = [], {}, []
    for name in names:
        entry = BackendParity(name)
        entries.append(entry)
        kind, reason = "ok", None
        try:
            runner = open_runner(name, device=device, export_dir=export_dir, engines_dir=engines_dir,
                                 checkpoint=model)
            stack.enter_context(runner)
            entry.artifact = str(runner.artifact)
            entry.precision = runner.meta.get("precision")
            if entry.precision is None:
                kind, reason = "stale", f"{entry.artifact} records no precision in its metadata"
            else:
                runners[name] = runner
        except (ArtifactNotFoundError, ArtifactReadError, BackendUnavailableError, EngineError, ExportError,
                StaleArtifactError) as exc:
            # missing / unavailable (not built, no GPU): tolerated under ``all --strict``;
            # stale or unreadable: never
            kind = "missing" if isinstance(exc, ArtifactNotFoundError) else "unavailable"
            if isinstance(exc, (ArtifactReadError, ExportError, StaleArtifactError)):
                kind = "stale"
            reason = str(exc)
        if name not in runners:
            entry.reason = reason
            if strict and (kind == "stale" or not wants_all):
                problems.append(f"{name}: {reason}")
    if problems:
        raise VerificationError("--strict: backends not checked: " + "; ".join(problems))
    if not runners:
        raise ArtifactNotFoundError(
            "nothing to check: " + "; ".join(f"{e.backend}: {e.reason}" for e in entries))
    return entries, runners



def check(
    backends: str | list[str] | tuple[str, ...] = ("all",),
    *,
    model: str | os.PathLike = "model.pt",
    export_dir: str | os.PathLike = "export",
    engines_dir: str | os.PathLike = "engines",
    images: str | os.PathLike | None = None,
    voc_root: str | os.PathLike | None = None,
    synthetic: int | None = None,
    thresholds: list[str] | dict[str, dict[str, float]] | None = None,
    report: str | os.PathLike | None = None,
    disagreement_dir: str | os.PathLike | None = None,
    strict: bool = False,
    batch_size: int = 4,
    max_tiles: int = DEFAULT_MAX_TILES,
    worst: int = 3,
    device: str = "auto",
    force: bool = False,
    echo: Echo | None = None,
    progress: bool = False,
) -> ParityReport:
    """Compare every requested backend with the float32 PyTorch reference on the CPU.

    The same tiles (from ``images``, the ``voc_root`` val split, or ``synthetic`` generated
    images, default 8 synthetic) go through the reference and each backend in batches of
    ``batch_size``; the metrics are those of :class:`ParityAccumulator`, the limits
    ``thresholds`` (``PRECISION.METRIC=VALUE`` overrides of :data:`DEFAULT_THRESHOLDS`, or a full
    dict) for the precision each artifact records. ``report`` gets the JSON report; the
    ``worst`` lowest-agreement tiles of each backend (tiles with a disagreeing pixel) get a
    disagreement map PNG in ``disagreement_dir`` (default: ``<report stem>-disagreement/`` beside
    the report); without either, only a failing backend's maps are written, to ``check/``, so a
    check that passes writes nothing there. ``echo`` receives the table and where the maps went
    before a failure is raised.

    Raises:
        VerificationError: a backend fails a threshold (every failure named, with its gap), or
            under ``strict`` a requested backend (or a stale one under ``all``) was skipped.
        ArtifactNotFoundError: nothing to check (every backend skipped).
    """
    echo = echo or (lambda _msg: None)
    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {batch_size}")
    limits = thresholds if isinstance(thresholds, dict) else parse_thresholds(thresholds)
    names, wants_all = parse_backends(backends)
    model, export_dir, engines_dir = Path(model), Path(export_dir), Path(engines_dir)
    if not model.is_file():
        raise ArtifactNotFoundError(f"checkpoint {model} not found (the reference); pass --model")
    from fcn_deploy.model import read_checkpoint

    read_checkpoint(model)  # the reference must be an FCN checkpoint: say so before matching artifacts to it
    check_distinct_paths({"--report": report, "--disagreement-dir": disagreement_dir}, {"--model": model})
    if report is not None:
        report = check_output_file(report, force, "--report")
    # maps go to the default ./check/ only for a failing backend; to a folder asked for (or the
    # report's) for every backend with a disagreeing pixel
    asked_for_maps = disagreement_dir is not None or report is not None
    folder = Path(disagreement_dir) if disagreement_dir is not None else (
        report.parent / f"{report.stem}-disagreement" if report is not None else Path("check"))
    with contextlib.ExitStack() as stack:
        samples, load, source = tile_source(images, voc_root, synthetic, stack, echo)
        entries, runners = _open_backends(names, wants_all, model, export_dir, engines_dir, device, strict, stack)
        tile_sizes = {tuple(r.tile_hw) for r in runners.values()}
        if len(tile_sizes) > 1:
            raise UsageError(f"backends take different tile sizes ({', '.join(f'{h}x{w}' for h, w in sorted(tile_sizes))}); "
                             "check them separately")
        tile_hw = tile_sizes.pop()
        from fcn_deploy.runners.torch_runner import TorchRunner

        reference = stack.enter_context(TorchRunner(model, device="cpu", precision="fp32", tile_hw=tile_hw))
        tiles = draw_tiles(samples, load, tile_hw, max_tiles)
        source.update(tiles=len(tiles), images_used=tiles.images, tile_hw=list(tile_hw),
                      labels=tiles.labels is not None)
        accs = {n: ParityAccumulator(reference.meta["num_classes"], keep_worst=worst) for n in runners}
        _run_batches(reference, runners, accs, tiles, batch_size, progress)
    for entry in entries:
        if entry.backend not in runners:
            continue
        acc = accs[entry.backend]
        entry.metrics = acc.result()
        entry.inference_seconds = runners[entry.backend].total_inference_time
        entry.checks = apply_thresholds(entry.backend, entry.precision, entry.metrics, limits)
        entry.status = "pass" if all(c.passed for c in entry.checks) else "fail"
        if asked_for_maps or entry.status == "fail":
            write_maps(entry, acc, tiles, folder)
    result = ParityReport(
        reference={"backend": "torch", "precision": "fp32", "device": "cpu", "model": str(model),
                   "inference_seconds": reference.total_inference_time},
        source=source, thresholds=limits, backends=entries)
    if report is not None:
        write_json_atomic(report, result.as_dict())
    echo(result.table())
    maps = [(e.backend, len(e.maps)) for e in entries if e.maps]
    if maps:
        echo(f"disagreement maps of the worst tiles ({', '.join(f'{b}: {n}' for b, n in maps)}) written to "
             f"{folder}{os.sep}")
    raise_on_failures({e.backend: e.checks for e in entries})
    echo(f"parity: {', '.join(e.backend for e in result.checked)} pass")
    return result


def _run_batches(reference, runners: dict[str, Any], accs: dict[str, ParityAccumulator], tiles: TileSet,
                 batch_size: int, progress: bool) -> None:
    """Feed the same normalised batches to the reference and every backend."""
    from tqdm import tqdm

    from fcn_deploy.images import normalize

    mean, std = reference.meta["mean"], reference.meta["std"]
    limit = min([batch_size] + [r.max_batch for r in runners.values() if r.max_batch])
    with tqdm(total=len(tiles), unit="tile", desc="check", disable=not progress, leave=False) as bar:
        for start in range(0, len(tiles), limit):
            stop = min(start + limit, len(tiles))
            x = np.stack([normalize(t.transpose(1, 2, 0), mean, std) for t in tiles.rgb[start:stop]])
            ref = reference.infer(x)
            labels = None if tiles.labels is None else tiles.labels[start:stop]
            for name, runner in runners.items():
                accs[name].update(ref, runner.infer(x), labels, tiles.valid[start:stop])
            bar.update(stop - start)
