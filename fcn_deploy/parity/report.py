"""``check``'s outcome: one :class:`BackendParity` per backend, the :class:`ParityReport` (JSON
and terminal table) and the disagreement maps of the worst tiles."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fcn_deploy.parity.metrics import ParityAccumulator
from fcn_deploy.parity.thresholds import CheckOutcome
from fcn_deploy.parity.tiles import TileSet

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



def write_maps(entry: BackendParity, acc: ParityAccumulator, tiles: TileSet, folder: Path) -> None:
    """Disagreement map PNGs of the worst tiles of ``acc`` in ``folder``, listed in ``entry.maps``:
    the tile (H, W) on top, below it a caption with the count of disagreeing pixels."""
    from fcn_deploy.report import DISAGREE_COLOR, disagreement_map, save_png, with_caption

    for rank, worst in enumerate(acc.worst_tiles(), start=1):
        name = tiles.names[worst.index]
        path = folder / f"{entry.backend}_worst{rank}_{re.sub(r'[^A-Za-z0-9.,@-]+', '_', name)}.png"
        n, total = int(worst.mask.sum()), int(worst.mask.size)
        caption = [f"{n:,} of {total:,} pixels ({100 * n / total:.2f}%) disagree: {entry.backend} vs PyTorch fp32",
                   f"tile {name} (worst {rank}); photo dimmed, disagreeing pixels in magenta"]
        save_png(path, with_caption(disagreement_map(tiles.rgb[worst.index].transpose(1, 2, 0), worst.mask),
                                    caption, swatch=DISAGREE_COLOR))
        entry.maps.append({"tile": name, "agreement": worst.agreement,
                           "pixels_disagreeing": int(worst.mask.sum()), "path": str(path)})


