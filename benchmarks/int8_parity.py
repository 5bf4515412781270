"""INT8 parity vs the fp32 PyTorch reference, per calibration method and tile count.

Usage: python benchmarks/int8_parity.py WORKDIR [--out results.json]
WORKDIR is a `fcn-deploy demo --workdir` folder (model.pt, export/fcn.onnx, data/). Calibration
tiles come from its VOC *train* split, parity tiles from its *val* split (the `check --voc-root`
tiles), so no tile is both. Metrics are those of `fcn-deploy check` (fcn_deploy.parity).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from fcn_deploy.images import normalize
from fcn_deploy.parity.metrics import ParityAccumulator
from fcn_deploy.parity.tiles import draw_tiles
from fcn_deploy.export.int8 import export_int8
from fcn_deploy.runners import open_runner
from fcn_deploy.voc import list_split, read_sample

CONFIGS = [("minmax", 8), ("minmax", 16), ("minmax", 32), ("percentile", 8), ("percentile", 32),
           ("entropy", 16), ("entropy", 32)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("workdir", type=Path)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--max-tiles", type=int, default=32)
    ap.add_argument("--configs", help="e.g. minmax:8,entropy:32 (default: all)")
    args = ap.parse_args()
    voc = args.workdir / "data" / "VOCdevkit" / "VOC2012"
    onnx_path = args.workdir / "export" / "fcn.onnx"
    configs = CONFIGS if not args.configs else [(m, int(n)) for m, n in (c.split(":") for c in args.configs.split(","))]
    with open_runner("torch", args.workdir / "model.pt") as ref_runner:
        meta = ref_runner.meta
        tiles = draw_tiles([(s.name, s) for s in list_split(voc, "val")], read_sample, tuple(meta["tile_hw"]), args.max_tiles)
        x = np.stack([normalize(t.transpose(1, 2, 0), meta["mean"], meta["std"]) for t in tiles.rgb])
        ref = np.concatenate([ref_runner.infer(x[i:i + 4]) for i in range(0, len(x), 4)])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method, n in configs:
            out = Path(tmp) / f"fcn.{method}{n}.int8.onnx"
            t0 = time.perf_counter()
            report = export_int8(onnx_path, out, voc_root=voc, calib_tiles=n, calib_method=method, verify=False)
            seconds = time.perf_counter() - t0
            acc = ParityAccumulator(meta["num_classes"])
            with open_runner("ort", out) as runner:
                for i in range(0, len(x), 4):
                    acc.update(ref[i:i + 4], runner.infer(x[i:i + 4]), tiles.labels[i:i + 4], tiles.valid[i:i + 4])
            res = acc.result()
            row = {"method": method, "calib_tiles": report.meta["calibration"]["tiles"], "calib_seconds": round(seconds, 1),
                   **{k: res[k] for k in ("tiles", "agreement", "miou_vs_reference", "miou_gt_reference",
                                          "miou_gt_backend", "miou_gt_change", "max_abs", "mean_abs", "cosine_min")}}
            rows.append(row)
            print(f"{method:10s} {row['calib_tiles']:3d} tiles: agreement {res['agreement']:.3f}%  mIoU gt "
                  f"{res['miou_gt_reference']:.2f} -> {res['miou_gt_backend']:.2f} ({res['miou_gt_change']:+.2f} points)  "
                  f"mIoU vs ref {res['miou_vs_reference']:.2f}%  mean abs {res['mean_abs']:.3f}  ({seconds:.0f} s)", flush=True)
    if args.out:
        args.out.write_text(json.dumps({"parity_tiles": len(tiles), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
