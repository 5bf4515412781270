"""The tile assembler on the CPU: numpy path vs torch path (CPU tensors), same work.

Times cutting + normalising the tiles into batches and stitching (window-weighted averaging,
argmax) for synthetic images, with precomputed float32 logits standing in for the runner (the
runner is not timed). Interleaved over rounds; medians reported. This decides what
``make_assembler("auto")`` picks on the CPU.

    .venv/bin/python benchmarks/assembler_cpu.py [--rounds 3] [--classes 21] [--batch 8] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from fcn_deploy.tiling import ImageJob, NumpyAssembler, TorchAssembler, plan_tiles
from fcn_deploy.defaults import IMAGENET_MEAN, IMAGENET_STD, TILE_HW


def run(asm, images, logits) -> float:
    jobs = [ImageJob(i, rgb, plan_tiles(*rgb.shape[:2], TILE_HW)) for i, rgb in enumerate(images)]
    start = time.perf_counter()
    done = 0
    for batch in asm.batches(jobs):
        result = logits[: len(batch.keys)]
        done += len(asm.add(batch, result, "logits"))
    assert done == len(images)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--classes", type=int, default=21)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (768, 1024, 3), dtype=np.uint8) for _ in range(4)]
    images.append(rng.integers(0, 256, (3000, 4000, 3), dtype=np.uint8))
    tiles = sum(plan_tiles(*im.shape[:2], TILE_HW).count for im in images)
    logits = rng.standard_normal((args.batch, args.classes, *TILE_HW), dtype=np.float32)
    asms = {
        "numpy": (NumpyAssembler(TILE_HW, args.batch, IMAGENET_MEAN, IMAGENET_STD), logits),
        "torch": (TorchAssembler(TILE_HW, args.batch, IMAGENET_MEAN, IMAGENET_STD, device="cpu"),
                  torch.from_numpy(logits)),
    }
    times: dict[str, list[float]] = {k: [] for k in asms}
    for _ in range(args.rounds):
        for name, (asm, lg) in asms.items():
            times[name].append(run(asm, images, lg))
    print(f"{len(images)} images, {tiles} tiles, {args.classes} classes, batch {args.batch}, "
          f"torch threads {torch.get_num_threads()}")
    med = {k: statistics.median(v) for k, v in times.items()}
    for name, t in med.items():
        print(f"  {name:6s} median {t:.3f} s ({tiles / t:.1f} tiles/s), runs {[round(x, 3) for x in times[name]]}")
    print(f"  torch / numpy time: {med['torch'] / med['numpy']:.2f}x")


if __name__ == "__main__":
    main()
