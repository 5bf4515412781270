"""Segmentation metrics from a confusion matrix (pure numpy; torch tensors are accepted too).

Modelled on torchvision's ``references/segmentation/utils.ConfusionMatrix``: rows are the
target class, columns the predicted class. Target pixels equal to ``ignore_index`` (255, VOC's
void borders) or outside ``[0, num_classes)`` are left out of every metric.

* pixel accuracy = trace / total;
* class accuracy = mean over classes present in the target of (correct / target pixels);
* IoU of class k = TP / (TP + FP + FN), NaN when k is absent from both target and prediction;
* mIoU = mean of the IoUs that are not NaN.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from fcn_deploy.errors import UsageError


def _as_numpy(x: Any) -> np.ndarray:
    """A numpy view of a numpy array or a (possibly CUDA) torch tensor."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


@dataclass(frozen=True)
class SegMetrics:
    """Metrics of one confusion matrix; fractions in [0, 1], NaN where undefined."""

    pixel_acc: float
    class_acc: float
    iou: list[float]
    miou: float

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready dict (``pixel_acc``, ``class_acc``, ``iou``, ``miou``); NaN becomes None."""
        def clean(v: float) -> float | None:
            return None if math.isnan(v) else float(v)

        d = asdict(self)
        return {k: [clean(x) for x in v] if isinstance(v, list) else clean(v) for k, v in d.items()}


class ConfusionMatrix:
    """Accumulates a (num_classes, num_classes) int64 confusion matrix over batches."""

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        if num_classes < 1:
            raise UsageError(f"num_classes must be positive, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        #: (K, K) int64, rows = target class, columns = predicted class.
        self.matrix = np.zeros((num_classes, num_classes), dtype=np.int64)

    def update(self, target: Any, pred: Any) -> None:
        """Count pixels of ``target`` (class ids, any integer dtype) against ``pred`` (class ids
        in ``[0, num_classes)``), both of the same shape (any shape, numpy or torch)."""
        t, p = _as_numpy(target), _as_numpy(pred)
        if t.shape != p.shape:
            raise UsageError(f"target shape {t.shape} differs from prediction shape {p.shape}")
        t, p = t.reshape(-1).astype(np.int64), p.reshape(-1).astype(np.int64)
        keep = (t >= 0) & (t < self.num_classes) & (t != self.ignore_index)
        t, p = t[keep], p[keep]
        if p.size and (p.min() < 0 or p.max() >= self.num_classes):
            raise UsageError(
                f"predicted class ids must be in [0, {self.num_classes}), got {p.min()}..{p.max()}"
            )
        n = self.num_classes
        self.matrix += np.bincount(n * t + p, minlength=n * n).reshape(n, n)

    def merge(self, other: "ConfusionMatrix") -> "ConfusionMatrix":
        """Add ``other``'s counts into this matrix (same class count); return self."""
        if other.num_classes != self.num_classes:
            raise UsageError(f"cannot merge {other.num_classes} classes into {self.num_classes}")
        self.matrix += other.matrix
        return self

    def compute(self) -> SegMetrics:
        """Pixel accuracy, mean class accuracy, per-class IoU and mIoU of the counts so far."""
        h = self.matrix.astype(np.float64)
        tp, target_px, pred_px = np.diag(h), h.sum(1), h.sum(0)
        total = h.sum()
        with np.errstate(divide="ignore", invalid="ignore"):
            pixel_acc = tp.sum() / total if total else math.nan
            per_class_acc = np.where(target_px > 0, tp / target_px, np.nan)
            union = target_px + pred_px - tp
            iou = np.where(union > 0, tp / union, np.nan)
        present = ~np.isnan(per_class_acc)
        iou_present = ~np.isnan(iou)
        return SegMetrics(
            pixel_acc=float(pixel_acc),
            class_acc=float(per_class_acc[present].mean()) if present.any() else math.nan,
            iou=[float(v) for v in iou],
            miou=float(iou[iou_present].mean()) if iou_present.any() else math.nan,
        )
