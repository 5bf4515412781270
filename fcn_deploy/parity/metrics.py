"""Parity metrics of backend logits against reference logits, streamed over batches.

Memory stays bounded by one batch of logits whatever the number of tiles:

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
* **non-finite values**: the number of NaN/inf logits of the backend (``nonfinite``); they are
  left out of the difference metrics (``max(0, nan)`` would hide them) and fail every check.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fcn_deploy.errors import UsageError
from fcn_deploy.defaults import IGNORE_INDEX

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
    # the last bin also holds every value above 1e6: its only upper bound is the maximum
    return min(_bin_upper_edge(i), max_value) if i < _NBINS - 1 else max_value


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
        self.nonfinite = 0  # NaN/inf values among the backend's logits
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
        if out.size == 0:
            return
        finite = np.isfinite(out) & np.isfinite(ref)
        if not finite.all():
            self.nonfinite += int(out.size - np.count_nonzero(finite))
            ref, out = np.where(finite, ref, 0.0), np.where(finite, out, 0.0)
        diff = np.abs(out - ref)
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
        """The metrics as a JSON-ready dict (percentages in %, mIoU changes in points;
        ``nonfinite`` counts NaN/inf logits, left out of the difference metrics)."""
        res: dict[str, Any] = {
            "tiles": len(self.tile_agreement),
            "pixels": self.pixels,
            "nonfinite": self.nonfinite,
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



def compare_logits(reference: np.ndarray, candidate: np.ndarray, keep_worst: int = 0) -> dict[str, Any]:
    """:meth:`ParityAccumulator.result` of two (N, C, H, W) logit arrays (float32 or float16) in
    one batch, plus ``tiles`` (N): what export's verification records."""
    acc = ParityAccumulator(reference.shape[1], keep_worst=keep_worst)
    acc.update(reference, candidate)
    return acc.result()
