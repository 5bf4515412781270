"""End-to-end ``infer`` on the CPU: pipeline overhead and backend speed-up.

Times, in one process and interleaved over rounds (these machines are noisy):

* ``ort pipeline``: :func:`fcn_deploy.infer.run_inference` with the onnxruntime runner
  (decode, tiling, batching, stitching, PNG writing, all of it);
* ``ort raw``: the same runner on the very same tiles and batches, nothing around it (a);
* ``torch pipeline`` / ``torch raw``: the same with the PyTorch runner on the CPU (b).

Goals: pipeline overhead < 10% of (a); ort pipeline >= 1.5x faster than torch.
A random-weight FCN (seed 0) is exported to ONNX in a temporary folder; photos are synthetic
JPEGs of VOC-like (500x375) and larger (1024x768) sizes.

    .venv/bin/python benchmarks/infer_cpu.py [--images 16] [--large 2] [--rounds 4] [--window hann]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from fcn_deploy.images import load_rgb
from fcn_deploy.infer.pipeline import run_inference
from fcn_deploy.infer.inputs import find_images
from fcn_deploy.infer.segmenter import Segmenter
from fcn_deploy.tiling import DEFAULT_WINDOW, WINDOWS


def make_photos(folder: Path, small: int, large: int) -> list[Path]:
    rng = np.random.default_rng(0)
    sizes = [(375, 500)] * small + [(768, 1024)] * large
    for i, (h, w) in enumerate(sizes):
        coarse = rng.integers(0, 256, (h // 24, w // 24, 3), dtype=np.uint8)
        img = Image.fromarray(coarse).resize((w, h), Image.BILINEAR)
        img.save(folder / f"photo_{i:03d}.jpg", quality=90)
    return find_images([folder])


def raw_batches(runner, photos: list[Path], batch_size: int) -> list[np.ndarray]:
    """The tile batches the pipeline feeds the runner, prepared ahead of time."""
    seg = Segmenter(runner, batch_size=batch_size)
    jobs = []
    for path in photos:
        rgb = load_rgb(path)
        jobs.append((path, rgb, seg.plan(*rgb.shape[:2])))
    return [batch.tiles.copy() for batch in seg.iter_batches(jobs)]


def time_raw(runner, batches: list[np.ndarray]) -> float:
    start = time.perf_counter()
    for tiles in batches:
        runner.infer(tiles, output="logits")
    return time.perf_counter() - start


STAGES: dict[str, dict[str, float]] = {}


def time_pipeline(runner, photos_dir: Path, out: Path, batch_size: int, window: str) -> tuple[float, int, int]:
    summary = run_inference([photos_dir], out, runner=runner, batch_size=batch_size, window=window, progress=False)
    if summary.failed:
        sys.exit(f"pipeline failed on {summary.failed}")
    if runner.name not in STAGES or summary.seconds < STAGES[runner.name]["wall"]:
        STAGES[runner.name] = {"wall": summary.seconds, **summary.stages}
    return summary.seconds, summary.images, summary.tiles


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=16, help="500x375 photos")
    ap.add_argument("--large", type=int, default=2, help="1024x768 photos")
    ap.add_argument("--rounds", type=int, default=4, help="interleaved repetitions (fastest reported)")
    ap.add_argument("--torch-rounds", type=int, default=2, help="0: skip the torch runner")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--window", choices=WINDOWS, default=DEFAULT_WINDOW)
    args = ap.parse_args()

    import torch

    from fcn_deploy.export.torch_export import export_onnx
    from fcn_deploy.model import FCN, save_checkpoint
    from fcn_deploy.runners.onnxrt import OnnxRuntimeRunner
    from fcn_deploy.runners.torch_runner import TorchRunner

    with tempfile.TemporaryDirectory(prefix="fcn-bench-infer-") as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        save_checkpoint(tmp / "model.pt", FCN().eval())
        export_onnx(tmp / "model.pt", tmp / "fcn.onnx")
        photos_dir = tmp / "photos"
        photos_dir.mkdir()
        photos = make_photos(photos_dir, args.images, args.large)
        results: dict[str, list[float]] = {}
        counts: dict[str, tuple[int, int]] = {}
        for name, runner, rounds in (
            ("ort", OnnxRuntimeRunner(tmp / "fcn.onnx"), args.rounds),
            ("torch", TorchRunner(tmp / "model.pt"), args.torch_rounds),
        ):
            if rounds < 1:
                continue
            with runner:
                batches = raw_batches(runner, photos, args.batch_size)
                runner.infer(batches[0], output="logits")  # warm-up
                for r in range(rounds):
                    results.setdefault(f"{name} raw", []).append(time_raw(runner, batches))
                    secs, images, tiles = time_pipeline(
                        runner, photos_dir, tmp / f"out-{name}-{r}", args.batch_size, args.window)
                    results.setdefault(f"{name} pipeline", []).append(secs)
                    counts[name] = (images, tiles)
                    assert tiles == sum(len(b) for b in batches)

    images, tiles = counts["ort"]
    print(f"{images} images ({args.images} x 500x375, {args.large} x 1024x768), {tiles} tiles of 320x480, "
          f"batch {args.batch_size}, window {args.window}, torch threads {torch.get_num_threads()}")
    med = {k: min(v) for k, v in results.items()}  # the least disturbed run of each
    for key, secs in med.items():
        runs = ", ".join(f"{v:.2f}" for v in results[key])
        print(f"  {key:15s} {secs:7.2f} s  {images / secs:6.3f} images/s  {tiles / secs:6.2f} tiles/s  (runs: {runs})")
    for name, stages in STAGES.items():
        print(f"  {name} pipeline seconds per stage (fastest run, summed over threads): "
              + ", ".join(f"{k} {v:.2f}" for k, v in stages.items()))
    overhead = med["ort pipeline"] / med["ort raw"] - 1
    print(f"pipeline overhead vs ort raw: {100 * overhead:+.1f}% (goal < 10%)")
    if "torch pipeline" in med:
        speedup = med["torch pipeline"] / med["ort pipeline"]
        print(f"ort pipeline vs torch pipeline: {speedup:.2f}x (goal >= 1.5x); "
              f"vs torch raw: {med['torch raw'] / med['ort pipeline']:.2f}x")


if __name__ == "__main__":
    main()
