"""Accuracy parity of every backend against the float32 PyTorch reference (``fcn-deploy check``).

The metrics are pure numpy and stream over batches, so memory stays bounded by one batch of
logits whatever the number of tiles:

* **max / mean absolute logit difference**: exact (float32 differences, float64 sums).
* **p99 absolute difference**: from a fixed log-spaced histogram of ``|diff|`` (256 bins per
  decade from 1e-10 to 1e6); the reported value is the upper edge of the bin holding the
  99th percentile (the ``ceil(0.99 n)``-th smallest difference), capped at the maximum. It is never
  below the exact value and at most 0.9 % above it (values under 1e-10 report as 1e-10).
* **cosine similarity**: per tile, between the flattened ``C*H*W`` logits of backend and
  reference (float64); reported as the mean and the minimum over tiles (the threshold uses the
  minimum).
* **argmax agreement**: % of pixels whose class is the same; also per tile, to find the worst.
* **mIoU vs reference**: confusion matrix with the reference prediction as the target.
* with labels: **mIoU vs ground truth** of each side (255 ignored) and the change in points
  (backend minus reference).

Pixels a tile gained by padding (images smaller than a tile) are left out of every metric.
"""

from __future__ import annotations

import contextlib
import heapq
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from fcn_deploy.errors import (
    ArtifactNotFoundError,
    BackendUnavailableError,
    EngineError,
    ExportError,
    ImageReadError,
    StaleArtifactError,
    UsageError,
    VerificationError,
)
from fcn_deploy.fileio import check_writable, write_json_atomic
from fcn_deploy.voc import IGNORE_INDEX

#: Tiles drawn by default (about 0.3 s each per backend on 2 CPU cores).
DEFAULT_MAX_TILES = 32
#: Synthetic images generated when no tile source is given.
DEFAULT_SYNTHETIC = 8

# -- p99 histogram ---------------------------------------------------------------------------
_BINS_PER_DECADE = 256
_MIN_EXP = -10
_MAX_EXP = 6
_NBINS = (_MAX_EXP - _MIN_EXP) * _BINS_PER_DECADE + 1  # bin 0 holds [0, 1e-10)


def _hist_index(absdiff: np.ndarray) -> np.ndarray:
    """Bin index of each |diff| (any shape, float) in the fixed log histogram."""
    with np.errstate(divide="ignore"):
        lg = np.log10(absdiff.astype(np.float64, copy=False))
    idx = np.floor((lg - _MIN_EXP) * _BINS_PER_DECADE) + 1
    return np.clip(np.nan_to_num(idx, neginf=0.0, posinf=_NBINS - 1), 0, _NBINS - 1).astype(np.int64)


def _bin_upper_edge(i: int) -> float:
    return 10.0 ** (_MIN_EXP + i / _BINS_PER_DECADE)


def histogram_quantile(hist: np.ndarray, q: float, max_value: float) -> float:
    """The ``ceil(q n)``-th smallest value's bin upper edge from a :func:`_hist_index` histogram."""
    n = int(hist.sum())
    if n == 0:
        return float("nan")
    rank = max(1, math.ceil(q * n))
    i = int(np.searchsorted(np.cumsum(hist), rank))
    return min(_bin_upper_edge(i), max_value)


# -- streaming accumulator -------------------------------------------------------------------
@dataclass(order=True)
class WorstTile:
    """A tile with low agreement: its index in the tile set and its disagreement mask (H, W) bool."""

    agreement: float
    index: int
    mask: np.ndarray = field(compare=False, repr=False)


class ParityAccumulator:
    """Streams batches of (reference, backend) logits and accumulates the parity metrics.

    Args:
        num_classes: C, the number of logit channels.
        keep_worst: how many lowest-agreement tiles to keep (with their disagreement masks).
    """

    def __init__(self, num_classes: int, keep_worst: int = 4) -> None:
        from fcn_deploy.metrics import ConfusionMatrix

        self.num_classes = num_classes
        self.keep_worst = keep_worst
        self.max_abs = 0.0
        self.sum_abs = 0.0
        self.count = 0  # logit values compared
        self.pixels = 0
        self.agree = 0
        self.hist = np.zeros(_NBINS, dtype=np.int64)
        self.cosines: list[float] = []
        self.tile_agreement: list[float] = []
        self.vs_reference = ConfusionMatrix(num_classes, ignore_index=IGNORE_INDEX)
        self.gt_reference = ConfusionMatrix(num_classes, ignore_index=IGNORE_INDEX)
        self.gt_backend = ConfusionMatrix(num_classes, ignore_index=IGNORE_INDEX)
        self.has_labels = False
        self._worst: list[tuple[float, int, WorstTile]] = []  # max-heap on agreement via negation

    def update(
        self,
        reference: np.ndarray,
        backend: np.ndarray,
        labels: np.ndarray | None = None,
        valid: np.ndarray | None = None,
    ) -> None:
        """Add one batch.

        Args:
            reference: (N, C, H, W) float32 reference logits.
            backend: (N, C, H, W) float32 or float16 logits of the backend, same tiles.
            labels: optional (N, H, W) uint8 ground truth (255 = ignore).
            valid: optional (N, H, W) bool, False where a tile is padding.
        """
        if reference.shape != backend.shape or reference.ndim != 4:
            raise UsageError(
                f"parity: backend logits {tuple(backend.shape)} do not match reference "
                f"{tuple(reference.shape)}"
            )
        n, c, h, w = reference.shape
        if c != self.num_classes:
            raise UsageError(f"parity: {c} logit channels, expected {self.num_classes}")
        for i in range(n):
            ref = reference[i].astype(np.float32, copy=False)
            out = backend[i].astype(np.float32, copy=False)
            m = None if valid is None else valid[i]
            if m is not None and not m.all():
                ref, out = ref[:, m], out[:, m]  # (C, K)
            self._update_logits(ref, out)
            ref_lab = np.argmax(reference[i], axis=0).astype(np.uint8)
            out_lab = np.argmax(backend[i].astype(np.float32, copy=False), axis=0).astype(np.uint8)
            same = ref_lab == out_lab
            if m is not None:
                same_valid = same[m]
                target = np.where(m, ref_lab, np.uint8(IGNORE_INDEX))
            else:
                same_valid = same.ravel()
                target = ref_lab
            npx = int(same_valid.size)
            nagree = int(same_valid.sum())
            self.pixels += npx
            self.agree += nagree
            agreement = 100.0 * nagree / npx if npx else 100.0
            self.tile_agreement.append(agreement)
            self.vs_reference.update(target, out_lab)
            if labels is not None:
                self.has_labels = True
                gt = labels[i] if m is None else np.where(m, labels[i], np.uint8(IGNORE_INDEX))
                self.gt_reference.update(gt, ref_lab)
                self.gt_backend.update(gt, out_lab)
            self._remember(agreement, ~same if m is None else (~same & m))

    def _update_logits(self, ref: np.ndarray, out: np.ndarray) -> None:
        diff = np.abs(out - ref)
        if diff.size == 0:
            return
        self.max_abs = max(self.max_abs, float(diff.max()))
        self.sum_abs += float(diff.sum(dtype=np.float64))
        self.count += diff.size
        self.hist += np.bincount(_hist_index(diff).ravel(), minlength=_NBINS)
        r, o = ref.astype(np.float64).ravel(), out.astype(np.float64).ravel()
        denom = math.sqrt(float(r @ r) * float(o @ o))
        self.cosines.append(float(r @ o) / denom if denom > 0 else (1.0 if not (r.any() or o.any()) else 0.0))

    def _remember(self, agreement: float, mask: np.ndarray) -> None:
        index = len(self.tile_agreement) - 1
        if self.keep_worst <= 0 or not mask.any():
            return
        entry = (-agreement, -index, WorstTile(agreement, index, mask))
        if len(self._worst) < self.keep_worst:
            heapq.heappush(self._worst, entry)
        elif entry[0] > self._worst[0][0]:
            heapq.heapreplace(self._worst, entry)

    def worst_tiles(self) -> list[WorstTile]:
        """Kept tiles with at least one disagreeing pixel, lowest agreement first."""
        return sorted((e[2] for e in self._worst), key=lambda t: (t.agreement, t.index))

    def result(self) -> dict[str, Any]:
        """The metrics as a JSON-ready dict (percentages in %, mIoU changes in points)."""
        res: dict[str, Any] = {
            "tiles": len(self.tile_agreement),
            "pixels": self.pixels,
            "max_abs": self.max_abs if self.count else None,
            "mean_abs": self.sum_abs / self.count if self.count else None,
            "p99_abs": histogram_quantile(self.hist, 0.99, self.max_abs) if self.count else None,
            "cosine_mean": float(np.mean(self.cosines)) if self.cosines else None,
            "cosine_min": float(np.min(self.cosines)) if self.cosines else None,
            "agreement": 100.0 * self.agree / self.pixels if self.pixels else None,
            "miou_vs_reference": _pct(self.vs_reference.compute().miou),
            "miou_gt_reference": None,
            "miou_gt_backend": None,
            "miou_gt_change": None,
        }
        if self.has_labels:
            ref, out = _pct(self.gt_reference.compute().miou), _pct(self.gt_backend.compute().miou)
            res["miou_gt_reference"], res["miou_gt_backend"] = ref, out
            res["miou_gt_change"] = None if ref is None or out is None else out - ref
        return res


def _pct(fraction: float) -> float | None:
    return None if fraction is None or math.isnan(fraction) else 100.0 * float(fraction)


# -- thresholds ------------------------------------------------------------------------------
@dataclass(frozen=True)
class MetricSpec:
    """How a thresholded metric is compared and printed."""

    label: str
    op: str  # ">=" (value must be at least the limit) or "<=" (at most; |value| for changes)
    unit: str  # "%", "points" or "" (logit units)


METRICS: dict[str, MetricSpec] = {
    "agreement": MetricSpec("argmax agreement", ">=", "%"),
    "max_abs": MetricSpec("max abs logit difference", "<=", ""),
    "mean_abs": MetricSpec("mean abs logit difference", "<=", ""),
    "p99_abs": MetricSpec("p99 abs logit difference", "<=", ""),
    "cosine_min": MetricSpec("cosine similarity (worst tile)", ">=", ""),
    "miou_vs_reference": MetricSpec("mIoU vs reference", ">=", "%"),
    "miou_gt_change": MetricSpec("mIoU change vs ground truth", "<=", "points"),
}

#: DESIGN.md's defaults. ``miou_gt_change`` is only checked when labels exist.
DEFAULT_THRESHOLDS: dict[str, dict[str, float]] = {
    "fp32": {"agreement": 99.99, "max_abs": 1e-3},
    "fp16": {"agreement": 99.5, "miou_gt_change": 0.5},
}


def parse_thresholds(overrides: list[str] | tuple[str, ...] | None) -> dict[str, dict[str, float]]:
    """DEFAULT_THRESHOLDS updated by ``PRECISION.METRIC=VALUE`` strings (``VALUE`` ``off`` drops it).

    Example: ``["fp32.max_abs=2e-3", "fp16.agreement=99.0", "fp16.miou_gt_change=off"]``.
    """
    limits = {p: dict(m) for p, m in DEFAULT_THRESHOLDS.items()}
    for item in overrides or ():
        key, sep, value = item.partition("=")
        precision, dot, metric = key.strip().partition(".")
        if not sep or not dot or not precision or not metric:
            raise UsageError(f"--threshold {item!r}: expected PRECISION.METRIC=VALUE, e.g. fp16.agreement=99.5")
        if metric not in METRICS:
            raise UsageError(
                f"--threshold {item!r}: unknown metric {metric!r}; choose from {', '.join(METRICS)}"
            )
        if not precision.isalnum():
            raise UsageError(f"--threshold {item!r}: precision must be a name like fp32 or fp16")
        table = limits.setdefault(precision.lower(), {})
        if value.strip().lower() == "off":
            table.pop(metric, None)
            continue
        try:
            number = float(value)
        except ValueError:
            raise UsageError(f"--threshold {item!r}: {value!r} is not a number (or 'off')") from None
        if not math.isfinite(number):
            raise UsageError(f"--threshold {item!r}: the limit must be finite")
        table[metric] = number
    return limits


def _fmt(value: float, unit: str, decimals: int) -> str:
    if unit == "%":
        return f"{value:.{decimals}f}%"
    if unit == "points":
        return f"{value:.{decimals}f} points"
    return f"{value:.{max(decimals, 2)}e}"


def _fmt_pair(value: float, limit: float, unit: str) -> tuple[str, str, int]:
    """Format value and limit with the fewest decimals (>= 2) that tell them apart and show
    their gap as non-zero."""
    gap_unit = "points" if unit == "%" else unit
    for d in range(2, 9):
        a, b = _fmt(value, unit, d), _fmt(limit, unit, d)
        if a != b and float(_fmt(abs(value - limit), gap_unit, d).split()[0].rstrip("%")) != 0:
            return a, b, d
    return a, b, d


@dataclass
class CheckOutcome:
    """One thresholded metric of one backend."""

    metric: str
    value: float | None
    limit: float
    passed: bool
    message: str

    def as_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "op": METRICS[self.metric].op, "value": self.value,
                "limit": self.limit, "passed": self.passed, "message": self.message}


def apply_thresholds(backend: str, precision: str, metrics: dict[str, Any],
                     limits: dict[str, dict[str, float]]) -> list[CheckOutcome]:
    """Compare ``metrics`` (from :meth:`ParityAccumulator.result`) with the limits of ``precision``.

    A metric that is ``None`` (e.g. ``miou_gt_change`` without labels) is reported as not checked
    (passed). Raises :class:`UsageError` when no limits exist for ``precision``.
    """
    if precision not in limits:
        raise UsageError(
            f"{backend}: no thresholds for precision {precision!r}; "
            f"pass e.g. --threshold {precision}.agreement=99.5"
        )
    outcomes = []
    for metric, limit in limits[precision].items():
        spec, value = METRICS[metric], metrics.get(metric)
        if value is None:
            outcomes.append(CheckOutcome(metric, None, limit, True, f"{backend}: {spec.label} not checked (no data)"))
            continue
        compared = abs(value) if spec.unit == "points" else value
        ok = compared >= limit if spec.op == ">=" else compared <= limit
        a, b, d = _fmt_pair(compared, limit, spec.unit)
        if ok:
            msg = f"{backend}: {spec.label} {a} {spec.op} {b}"
        else:
            gap = limit - compared if spec.op == ">=" else compared - limit
            gap_unit = "points" if spec.unit == "%" else spec.unit
            how = "short by" if spec.op == ">=" else "over by"
            sign = "<" if spec.op == ">=" else ">"
            msg = f"{backend}: {spec.label} {a} {sign} {b} ({how} {_fmt(gap, gap_unit, d)})"
        outcomes.append(CheckOutcome(metric, float(value), limit, ok, msg))
    return outcomes


def raise_on_failures(outcomes_by_backend: dict[str, list[CheckOutcome]]) -> None:
    """Raise :class:`VerificationError` listing every failed metric, if any."""
    failed = [o.message for outs in outcomes_by_backend.values() for o in outs if not o.passed]
    if failed:
        raise VerificationError("parity check failed: " + "; ".join(failed))


# -- the tiles every backend sees ------------------------------------------------------------
@dataclass
class TileSet:
    """The check's tiles, kept as uint8 so that many fit in memory.

    Attributes:
        rgb: (N, 3, th, tw) uint8 photo tiles (images smaller than a tile reflect-padded).
        valid: (N, th, tw) bool, False on padding.
        labels: (N, th, tw) uint8 ground truth (255 on void and padding), or None.
        names: ``image@y,x`` per tile.
        images: how many images the tiles come from.
    """

    rgb: np.ndarray
    valid: np.ndarray
    labels: np.ndarray | None
    names: list[str]
    images: int

    def __len__(self) -> int:
        return len(self.names)


def draw_tiles(samples: list[tuple[str, Any]], load, tile_hw: tuple[int, int], max_tiles: int) -> TileSet:
    """Cut up to ``max_tiles`` tiles from ``samples``, spread over the images.

    Args:
        samples: (name, handle) per image; ``load(handle)`` returns ((H, W, 3) uint8 RGB,
            (H, W) uint8 label or None), or None to skip an unreadable image.
        tile_hw: (th, tw) of the backends.
        max_tiles: at most this many tiles; each image gives at most
            ``ceil(max_tiles / len(samples))`` of its non-overlapping grid tiles, evenly chosen.
    """
    from fcn_deploy.tiling import extract_tile, plan_tiles

    if max_tiles < 1:
        raise UsageError(f"--max-tiles must be at least 1, got {max_tiles}")
    per_image = max(1, math.ceil(max_tiles / max(1, len(samples))))
    rgbs, valids, labels, names = [], [], [], []
    images = 0
    for name, handle in samples:
        if len(names) >= max_tiles:
            break
        loaded = load(handle)
        if loaded is None:  # an unreadable photo, already reported by ``load``
            continue
        rgb, label = loaded
        grid = plan_tiles(rgb.shape[0], rgb.shape[1], tile_hw, min_overlap=0)
        chw = rgb.transpose(2, 0, 1)
        picks = sorted({int(round(v)) for v in np.linspace(0, grid.count - 1, min(per_image, grid.count))})
        images += 1
        for index in picks[: max_tiles - len(names)]:
            y0, y1, x0, x1 = grid.box(index)
            valid = np.zeros(tile_hw, dtype=bool)
            valid[: y1 - y0, : x1 - x0] = True
            rgbs.append(extract_tile(chw, grid, index, pad_mode="reflect"))
            valids.append(valid)
            if label is not None:
                lab = extract_tile(label[None], grid, index, pad_mode="constant")[0]
                lab[~valid] = IGNORE_INDEX
                labels.append(lab)
            names.append(f"{name}@{y0},{x0}")
    if not names:
        raise UsageError("no tiles to check: no readable image in the tile source")
    return TileSet(np.stack(rgbs), np.stack(valids),
                   np.stack(labels) if len(labels) == len(names) else None, names, images)


# -- backends and their artifacts ------------------------------------------------------------
#: Backends ``check`` compares with the reference (``all`` expands to these).
CHECK_BACKENDS = ("ort", "ort-fp16", "trt")


@dataclass
class BackendParity:
    """Outcome for one backend: ``status`` is ``pass``, ``fail`` or ``skipped`` (with ``reason``)."""

    backend: str
    status: str = "skipped"
    reason: str | None = None
    artifact: str | None = None
    precision: str | None = None
    metrics: dict[str, Any] | None = None
    checks: list[CheckOutcome] = field(default_factory=list)
    maps: list[dict[str, Any]] = field(default_factory=list)
    inference_seconds: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "status": self.status, "reason": self.reason,
                "artifact": self.artifact, "precision": self.precision, "metrics": self.metrics,
                "checks": [c.as_dict() for c in self.checks], "disagreement_maps": self.maps,
                "inference_seconds": self.inference_seconds}


@dataclass
class ParityReport:
    """Everything ``check`` measured; :meth:`as_dict` is the JSON report."""

    reference: dict[str, Any]
    source: dict[str, Any]
    thresholds: dict[str, dict[str, float]]
    backends: list[BackendParity]

    @property
    def checked(self) -> list[BackendParity]:
        return [b for b in self.backends if b.status != "skipped"]

    @property
    def passed(self) -> bool:
        return bool(self.checked) and all(b.status == "pass" for b in self.checked)

    def as_dict(self) -> dict[str, Any]:
        from fcn_deploy import __version__

        return {"fcn_deploy_version": __version__, "passed": self.passed,
                "reference": self.reference, "source": self.source, "thresholds": self.thresholds,
                "backends": [b.as_dict() for b in self.backends]}

    def table(self) -> str:
        """The terminal table: one row per checked backend, then one line per skipped one."""
        from fcn_deploy.report import format_table

        def num(v: float | None, fmt: str) -> str:
            return "-" if v is None else format(v, fmt)

        rows = []
        for b in self.checked:
            m = b.metrics or {}
            gt = "-" if m.get("miou_gt_change") is None else (
                f"{m['miou_gt_reference']:.2f} -> {m['miou_gt_backend']:.2f} ({m['miou_gt_change']:+.2f})")
            rows.append([b.backend, b.precision or "?", num(m.get("max_abs"), ".2e"),
                         num(m.get("mean_abs"), ".2e"), num(m.get("p99_abs"), ".2e"),
                         num(m.get("cosine_min"), ".8f"), _floor_pct(m.get("agreement")),
                         num(m.get("miou_vs_reference"), ".2f"), gt, b.status.upper()])
        headers = ["backend", "prec", "max abs", "mean abs", "p99 abs", "cos min", "agree %",
                   "mIoU/ref", "mIoU gt ref -> backend", "result"]
        lines = [format_table(headers, rows)] if rows else []
        lines += [f"{b.backend}: skipped: {b.reason}" for b in self.backends if b.status == "skipped"]
        return "\n".join(lines)


def _floor_pct(value: float | None, decimals: int = 4) -> str:
    """A percentage rounded down, so that 99.99996 shows as 99.9999, never as 100.0000."""
    if value is None:
        return "-"
    return f"{math.floor(value * 10 ** decimals) / 10 ** decimals:.{decimals}f}"


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


def _onnx_staleness(path: Path, parent: Path, parent_sha: str) -> str | None:
    """Why the ONNX at ``path`` is stale w.r.t. ``parent`` (whose sha256 is ``parent_sha``), or None."""
    from fcn_deploy.artifacts import read_artifact_meta

    recorded = (read_artifact_meta(path).get("parent") or {}).get("sha256")
    if not recorded:
        return f"{path} records no parent sha256, so it cannot be matched to {parent}; export it again"
    if recorded != parent_sha:
        return (f"{path} is stale: made from a parent with sha256 {recorded[:12]}..., "
                f"but {parent} has {parent_sha[:12]}...; export it again")
    return None


def _resolve_onnx(backend: str, model: Path, model_sha: str, export_dir: Path) -> tuple[Path | None, str, str | None]:
    """(artifact, kind, reason): kind is ``ok``, ``missing`` or ``stale``."""
    fp32 = export_dir / "fcn.onnx"
    path = fp32 if backend == "ort" else export_dir / "fcn.fp16.onnx"
    if not path.is_file():
        how = f"fcn-deploy export {model}" if backend == "ort" else "fcn-deploy export --fp16"
        return None, "missing", f"{path} not found (run `{how}`)"
    reason = _onnx_staleness(fp32, model, model_sha) if fp32.is_file() else None
    if backend == "ort-fp16":
        if not fp32.is_file():
            return None, "stale", f"its parent {fp32} is missing, so {path} cannot be matched to {model}"
        if reason is None:
            from fcn_deploy.fileio import sha256_file

            reason = _onnx_staleness(path, fp32, sha256_file(fp32))
    return (None, "stale", reason) if reason else (path, "ok", None)


def _resolve_engine(model: Path, model_sha: str, export_dir: Path, engines_dir: Path) -> tuple[Path | None, str, str | None]:
    """(engine, kind, reason) like :func:`_resolve_onnx`: the engine must descend from the current
    ``export_dir/fcn.onnx``, itself exported from ``model``. Raises EngineError /
    BackendUnavailableError when no engine fits."""
    from fcn_deploy.engine import find_engine

    fp32 = export_dir / "fcn.onnx"
    if not fp32.is_file():
        return None, "missing", f"{fp32} not found, so no engine can be matched to {model} (run `fcn-deploy export {model}`)"
    reason = _onnx_staleness(fp32, model, model_sha)
    if reason:
        return None, "stale", reason
    return find_engine(engines_dir, onnx_path=fp32), "ok", None


# -- the check -------------------------------------------------------------------------------
Echo = Callable[[str], None]


def _tile_source(images, voc_root, synthetic, stack: contextlib.ExitStack, echo: Echo):
    """(samples, load, description) for :func:`draw_tiles` from exactly one source."""
    from fcn_deploy.voc import list_split, read_sample, write_synthetic_voc

    given = [n for n, v in (("--images", images), ("--voc-root", voc_root), ("--synthetic", synthetic)) if v is not None]
    if len(given) > 1:
        raise UsageError(f"give one tile source, not {' and '.join(given)}")
    if images is not None:
        from fcn_deploy.images import load_rgb
        from fcn_deploy.inputs import find_images

        if not Path(images).is_dir():
            raise UsageError(f"--images {images}: no such folder")
        paths = find_images([images])
        if not paths:
            raise UsageError(f"--images {images}: no images found in it")

        def load_photo(path):
            try:
                return load_rgb(path), None
            except ImageReadError as exc:
                echo(f"warning: skipping {exc}")
                return None

        return [(p.relative_to(images).as_posix(), p) for p in paths], load_photo, {"kind": "images", "path": str(images)}
    if voc_root is not None:
        samples = list_split(voc_root, "val")
        return [(s.name, s) for s in samples], read_sample, {"kind": "voc", "path": str(voc_root), "split": "val"}
    count = DEFAULT_SYNTHETIC if synthetic is None else int(synthetic)
    if count < 2:
        raise UsageError(f"--synthetic must be at least 2 images, got {count}")
    tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="fcn-check-"))
    voc = write_synthetic_voc(tmp, num_images=count, seed=0)
    samples = list_split(voc, "trainval")
    return [(s.name, s) for s in samples], read_sample, {"kind": "synthetic", "images": count, "seed": 0}


def _open_backends(names: list[str], wants_all: bool, model: Path, export_dir: Path, engines_dir: Path,
                   device: str, strict: bool, stack: contextlib.ExitStack) -> tuple[list[BackendParity], dict[str, Any]]:
    """Resolve, create and activate each backend; return every entry and the active runners."""
    from fcn_deploy.fileio import sha256_file
    from fcn_deploy.runners import create_runner

    model_sha = sha256_file(model)
    entries, runners, problems = [], {}, []
    for name in names:
        entry = BackendParity(name)
        entries.append(entry)
        try:
            if name == "trt":
                path, kind, reason = _resolve_engine(model, model_sha, export_dir, engines_dir)
            else:
                path, kind, reason = _resolve_onnx(name, model, model_sha, export_dir)
            if kind == "ok":
                runner = create_runner(name, path, device=device, export_dir=export_dir, engines_dir=engines_dir)
                stack.enter_context(runner)
                entry.artifact = str(path)
                entry.precision = runner.meta.get("precision")
                if entry.precision is None:
                    kind, reason = "stale", f"{entry.artifact} records no precision in its metadata"
                else:
                    runners[name] = runner
        except (ArtifactNotFoundError, BackendUnavailableError, EngineError, ExportError) as exc:
            # missing / unavailable (not built, no GPU): tolerated under ``all --strict``;
            # stale or unreadable: never
            kind = "missing" if isinstance(exc, ArtifactNotFoundError) else "unavailable"
            if isinstance(exc, (ExportError, StaleArtifactError)):
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


def _write_maps(entry: BackendParity, acc: ParityAccumulator, tiles: TileSet, folder: Path) -> None:
    from fcn_deploy.report import disagreement_map, save_png

    for rank, worst in enumerate(acc.worst_tiles(), start=1):
        name = tiles.names[worst.index]
        path = folder / f"{entry.backend}_worst{rank}_{re.sub(r'[^A-Za-z0-9.,@-]+', '_', name)}.png"
        save_png(path, disagreement_map(tiles.rgb[worst.index].transpose(1, 2, 0), worst.mask))
        entry.maps.append({"tile": name, "agreement": worst.agreement,
                           "pixels_disagreeing": int(worst.mask.sum()), "path": str(path)})


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
    ``worst`` lowest-agreement tiles of each backend get a disagreement map PNG in
    ``disagreement_dir`` (default: ``<report stem>-disagreement/`` beside the report, else
    ``check/``). ``echo`` receives the table before a failure is raised.

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
    if report is not None:
        report = check_writable(report, force)
    folder = Path(disagreement_dir) if disagreement_dir is not None else (
        report.parent / f"{report.stem}-disagreement" if report is not None else Path("check"))
    with contextlib.ExitStack() as stack:
        samples, load, source = _tile_source(images, voc_root, synthetic, stack, echo)
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
        _write_maps(entry, acc, tiles, folder)
    result = ParityReport(
        reference={"backend": "torch", "precision": "fp32", "device": "cpu", "model": str(model),
                   "inference_seconds": reference.total_inference_time},
        source=source, thresholds=limits, backends=entries)
    if report is not None:
        write_json_atomic(report, result.as_dict())
    echo(result.table())
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
