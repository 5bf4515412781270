"""onnxruntime vs PyTorch runners on this CPU, plus the two onnxruntime choices they rest on.

1. Logits of 320x480 tiles at batch 1/2/4: OnnxRuntimeRunner vs TorchRunner (tiles/s, ratio).
2. onnxruntime intra-op threads: 1 vs the physical cores (the runner's default).
3. Labels: ArgMax appended to the graph (the runner's default) vs numpy's argmax on logits.

Random-weight FCN (seed 0), exported to a temporary folder. The variants of each section run
interleaved (round robin, after one warm-up call each) and medians are compared, because other
processes on a shared machine shift absolute times; read the ratios.

    .venv/bin/python benchmarks/runners_cpu.py [--batch-sizes 1,2,4] [--reps 5] [--report out.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from fcn_deploy.bench import machine_info, parse_batch_sizes, random_tiles
from fcn_deploy.export.torch_export import export_onnx
from fcn_deploy.model import FCN, save_checkpoint
from fcn_deploy.runners.onnxrt import OnnxRuntimeRunner, physical_cores
from fcn_deploy.runners.torch_runner import TorchRunner
from fcn_deploy.defaults import IMAGENET_MEAN, IMAGENET_STD, TILE_HW


def interleaved(fns: dict[str, Callable[[], object]], reps: int) -> dict[str, float]:
    """Median seconds per call of each function, calls alternating between them."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", default="1,2,4")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--report", type=Path)
    args = parser.parse_args()
    sizes = parse_batch_sizes(args.batch_sizes)
    cores = physical_cores()
    results: dict = {"machine": machine_info(), "torch_threads": torch.get_num_threads()}
    print(f"{results['machine']['cpu']}, {cores} physical cores, torch threads {torch.get_num_threads()}")

    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        ckpt = Path(tmp) / "model.pt"
        save_checkpoint(ckpt, FCN().eval())
        onnx_path = export_onnx(ckpt, Path(tmp) / "fcn.onnx", verify=False).path
        tiles = random_tiles(max(sizes + (4,)), TILE_HW, IMAGENET_MEAN, IMAGENET_STD)

        print("\n1. logits, ORT vs torch (median ms per call, tiles/s)")
        print("batch  torch ms  ort ms  torch t/s  ort t/s  ort/torch speed")
        results["ort_vs_torch"] = []
        with TorchRunner(ckpt) as ref, OnnxRuntimeRunner(onnx_path) as ort:
            for bs in sizes:
                x = tiles[:bs]
                med = interleaved({"torch": lambda: ref.infer(x), "ort": lambda: ort.infer(x)}, args.reps)
                ratio = med["torch"] / med["ort"]
                results["ort_vs_torch"].append({"batch_size": bs, "ms": {k: v * 1e3 for k, v in med.items()}, "ratio": ratio})
                print(f"{bs:5d}  {med['torch'] * 1e3:8.1f}  {med['ort'] * 1e3:6.1f}  "
                      f"{bs / med['torch']:9.2f}  {bs / med['ort']:7.2f}  {ratio:15.2f}")

        print(f"\n2. ORT intra-op threads, 1 vs {cores} (median ms per call of logits)")
        results["ort_threads"] = []
        with OnnxRuntimeRunner(onnx_path, threads=1) as one, OnnxRuntimeRunner(onnx_path, threads=cores) as all_:
            for bs in sizes[:2]:
                x = tiles[:bs]
                med = interleaved({"1": lambda: one.infer(x), str(cores): lambda: all_.infer(x)}, args.reps)
                speedup = med["1"] / med[str(cores)]
                results["ort_threads"].append({"batch_size": bs, "ms": {k: v * 1e3 for k, v in med.items()}, "speedup": speedup})
                print(f"batch {bs}: 1 thread {med['1'] * 1e3:.1f} ms, {cores} threads "
                      f"{med[str(cores)] * 1e3:.1f} ms, speed-up {speedup:.2f}x")

        print("\n3. ORT labels: ArgMax in the graph vs numpy argmax (median ms per call)")
        results["ort_labels"] = []
        with OnnxRuntimeRunner(onnx_path) as graph, OnnxRuntimeRunner(onnx_path, argmax_in_graph=False) as plain:
            for bs in (1, 4):
                x = tiles[:bs]
                med = interleaved({"graph": lambda: graph.infer(x, "labels"),
                                   "numpy": lambda: plain.infer(x, "labels")}, args.reps)
                speedup = med["numpy"] / med["graph"]
                results["ort_labels"].append({"batch_size": bs, "ms": {k: v * 1e3 for k, v in med.items()}, "speedup": speedup})
                print(f"batch {bs}: graph {med['graph'] * 1e3:.1f} ms, numpy {med['numpy'] * 1e3:.1f} ms, "
                      f"graph faster by {speedup:.2f}x")
    if args.report:
        args.report.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
