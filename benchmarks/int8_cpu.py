"""CPU speed of ort-int8 vs ort fp32 vs torch fp32 (tiles/s), interleaved, in one run.

Usage: python benchmarks/int8_cpu.py WORKDIR [--rounds 5] [--batch-sizes 1,4] [--out results.json]
WORKDIR is a `fcn-deploy demo --workdir` folder (model.pt, export/fcn.onnx, data/). The int8
ONNX is the chain's export/fcn.int8.onnx when present and fresh (``fcn-deploy export --int8``),
else it is made from export/fcn.onnx (minmax, 32 tiles of the train split) in a temporary folder;
``ort-int8-u8`` is the same calibration with asymmetric uint8 activations (the form of
``export --int8-cpu`` / ``--backend ort-int8-cpu``), which onnxruntime's CPU kernels fuse
completely but TensorRT cannot build.
``fcn-deploy bench --backend ort --backend ort-int8`` gives the registry backends' side-by-side
numbers; this script adds the u8 variant and the reason: how many convolutions onnxruntime's
optimiser fused into QLinearConv in each graph (``--ops-only`` prints just that).

Each round runs every backend in turn (3 calls per batch size after one warm-up call) so that
load from other processes on a shared machine hits all of them alike; the table gives the
min / median / max tiles/s over rounds and the per-round speed-up ratios.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np


def cpu_flags() -> list[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), [])
    return sorted(f for f in flags if any(k in f for k in ("vnni", "amx", "avx512f", "avx2")))


def optimized_ops(path: Path) -> dict[str, int]:
    """Op counts of the graph onnxruntime's CPU provider runs (optimisation level "all")."""
    import collections

    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.optimized_model_filepath = str(Path(tmp) / "opt.onnx")
        ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        model = onnx.load(opts.optimized_model_filepath)
    counts = collections.Counter(n.op_type for n in model.graph.node)
    keep = ("QLinearConv", "Conv", "FusedConv", "ConvTranspose", "QuantizeLinear", "DequantizeLinear", "Relu", "Transpose")
    return {k: counts.get(k, 0) for k in keep}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("workdir", type=Path)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=3)
    ap.add_argument("--batch-sizes", default="1,4")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--ops-only", action="store_true", help="Only the optimised graphs' op counts.")
    args = ap.parse_args()
    import onnx

    from fcn_deploy.artifacts import embed_meta, meta_from_model
    from fcn_deploy.export.int8 import TileCalibrationReader, calibration_tiles, export_int8, quantize_qdq
    from fcn_deploy.runners import open_runner

    voc = args.workdir / "data" / "VOCdevkit" / "VOC2012"
    onnx_path = args.workdir / "export" / "fcn.onnx"
    batches = [int(b) for b in args.batch_sizes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        from fcn_deploy.chain import int8_onnx_path, onnx_staleness

        int8 = int8_onnx_path(onnx_path)
        if not int8.is_file() or onnx_staleness(int8, onnx_path, parent_required=True):
            int8 = export_int8(onnx_path, Path(tmp) / "fcn.int8.onnx", voc_root=voc, calib_tiles=32, verify=False).path
        fp32 = onnx.load(onnx_path)
        meta = meta_from_model(fp32)
        tiles, _, _ = calibration_tiles(meta["tile_hw"], voc_root=voc, tiles=32)
        reader = TileCalibrationReader(tiles.rgb, meta["mean"], meta["std"], "image", 4)
        u8, _ = quantize_qdq(fp32, reader, symmetric_activations=False)
        embed_meta(u8, {**meta, "precision": "int8"})
        u8_path = Path(tmp) / "fcn.int8-u8.onnx"
        onnx.save(u8, u8_path)
        ops = {name: optimized_ops(p) for name, p in (("ort-fp32", onnx_path), ("ort-int8", int8), ("ort-int8-u8", u8_path))}
        for name, counts in ops.items():
            print(f"{name:12s} optimised graph: " + ", ".join(f"{k} {v}" for k, v in counts.items() if v))
        if args.ops_only:
            return
        runners = {
            "torch-fp32": open_runner("torch", args.workdir / "model.pt"),
            "ort-fp32": open_runner("ort", onnx_path),
            "ort-int8": open_runner("ort", int8),
            "ort-int8-u8": open_runner("ort", u8_path),
        }
        for r in runners.values():
            r.activate()
        h, w = meta["tile_hw"]
        x = np.random.default_rng(0).standard_normal((max(batches), 3, h, w)).astype(np.float32)
        speeds = {(n, b): [] for n in runners for b in batches}
        for _ in range(args.rounds):
            for b in batches:
                for name, r in runners.items():
                    r.infer(x[:b], output="labels")
                    t0 = time.perf_counter()
                    for _ in range(args.calls):
                        r.infer(x[:b], output="labels")
                    speeds[name, b].append(b * args.calls / (time.perf_counter() - t0))
        for r in runners.values():
            r.deactivate()
    print(f"CPU: {platform.processor() or platform.machine()}, flags {' '.join(cpu_flags())}; "
          f"ort threads {runners['ort-fp32'].meta.get('threads')}; tile {h}x{w}; {args.rounds} rounds x {args.calls} calls")
    rows = []
    for b in batches:
        for name in runners:
            v = speeds[name, b]
            ratio = lambda other: [a / o for a, o in zip(v, speeds[other, b])]  # noqa: E731
            row = {"backend": name, "batch": b, "tiles_s": [round(s, 3) for s in v],
                   "vs_ort_fp32": [round(q, 3) for q in ratio("ort-fp32")],
                   "vs_torch_fp32": [round(q, 3) for q in ratio("torch-fp32")]}
            rows.append(row)
            print(f"batch {b:2d} {name:12s} tiles/s {min(v):6.2f} / {np.median(v):6.2f} / {max(v):6.2f}   "
                  f"x ort-fp32 {min(row['vs_ort_fp32']):.2f}-{max(row['vs_ort_fp32']):.2f}   "
                  f"x torch-fp32 {min(row['vs_torch_fp32']):.2f}-{max(row['vs_torch_fp32']):.2f}")
    if args.out:
        args.out.write_text(json.dumps({"cpu_flags": cpu_flags(), "optimized_ops": ops, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
