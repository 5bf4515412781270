"""Parity thresholds: the metric table, the limits per precision, parsing ``--threshold`` and
comparing metrics with the limits. ``check`` and export's verification both use this table."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from fcn_deploy.errors import UsageError, VerificationError

# -- thresholds ------------------------------------------------------------------------------
@dataclass(frozen=True)
class MetricSpec:
    """How a thresholded metric is compared and printed."""

    label: str
    op: str  # ">=" (value must be at least the limit) or "<=" (at most; |value| for changes)
    unit: str  # "%", "points" or "" (logit units)


METRICS: dict[str, MetricSpec] = {
    "nonfinite": MetricSpec("non-finite (NaN/inf) logits", "<=", "values"),
    "agreement": MetricSpec("argmax agreement", ">=", "%"),
    "max_abs": MetricSpec("max abs logit difference", "<=", ""),
    "mean_abs": MetricSpec("mean abs logit difference", "<=", ""),
    "p99_abs": MetricSpec("p99 abs logit difference", "<=", ""),
    "cosine_min": MetricSpec("cosine similarity (worst tile)", ">=", ""),
    "miou_vs_reference": MetricSpec("mIoU vs reference", ">=", "%"),
    "miou_gt_change": MetricSpec("mIoU change vs ground truth", "<=", "points"),
}

#: Limits per precision (why these values: docs/architecture.md, "Precision and parity policy").
#: ``miou_gt_change`` is only checked when labels exist. Besides these, ``nonfinite`` must be 0
#: for every precision (:data:`ALWAYS`), and cannot be switched off.
DEFAULT_THRESHOLDS: dict[str, dict[str, float]] = {
    "fp32": {"agreement": 99.99, "max_abs": 1e-3},
    "fp16": {"agreement": 99.5, "miou_gt_change": 0.5},
    "int8": {"agreement": 99.0, "miou_gt_change": 1.0},
}
#: Limits applied whatever the precision and the overrides.
ALWAYS: dict[str, float] = {"nonfinite": 0}


def known_precisions() -> tuple[str, ...]:
    """Precisions a threshold may name: those with defaults and those of a registered backend."""
    from fcn_deploy.runners.registry import REGISTRY

    names = list(DEFAULT_THRESHOLDS)
    names += [s.precision for s in REGISTRY.values() if s.precision and s.precision not in names]
    return tuple(names)


def _check_limit(item: str, metric: str, number: float) -> None:
    """Reject a limit that would silently weaken the gate (wrong unit, impossible value)."""
    unit = METRICS[metric].unit
    if number < 0:
        raise UsageError(f"--threshold {item!r}: a limit cannot be negative")
    if unit == "%":
        if number <= 1:
            raise UsageError(f"--threshold {item!r}: {metric} is a percentage (0-100], e.g. "
                             f"{metric}=99.9; {number:g} looks like a fraction")
        if number > 100:
            raise UsageError(f"--threshold {item!r}: {metric} is a percentage and cannot exceed 100")
    if metric == "cosine_min" and number > 1:
        raise UsageError(f"--threshold {item!r}: cosine_min is a similarity in [0, 1]")


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
        choices = [m for m in METRICS if m not in ALWAYS]
        if metric not in choices:
            raise UsageError(
                f"--threshold {item!r}: unknown metric {metric!r}; choose from {', '.join(choices)}"
            )
        precision = precision.strip().lower()
        if precision not in known_precisions():
            raise UsageError(f"--threshold {item!r}: unknown precision {precision!r}; choose from "
                             f"{', '.join(known_precisions())}")
        table = limits.setdefault(precision, {})
        if value.strip().lower() == "off":
            table.pop(metric, None)
            continue
        try:
            number = float(value)
        except ValueError:
            raise UsageError(f"--threshold {item!r}: {value!r} is not a number (or 'off')") from None
        if not math.isfinite(number):
            raise UsageError(f"--threshold {item!r}: the limit must be finite")
        _check_limit(item, metric, number)
        table[metric] = number
    return limits


def _fmt(value: float, unit: str, decimals: int) -> str:
    if unit == "%":
        return f"{value:.{decimals}f}%"
    if unit == "points":
        return f"{value:.{decimals}f} points"
    if unit == "values":
        return f"{value:.0f}"
    return f"{value:.{max(decimals, 2)}e}"


def _fmt_pair(value: float, limit: float, unit: str) -> tuple[str, str, int]:
    """Format value and limit with the fewest decimals (>= 2) that tell them apart and show
    their gap as non-zero."""
    gap_unit = "points" if unit == "%" else unit
    if value == limit:  # nothing to tell apart: the fewest decimals
        return _fmt(value, unit, 2), _fmt(limit, unit, 2), 2
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
    for metric, limit in {**ALWAYS, **limits[precision]}.items():
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

