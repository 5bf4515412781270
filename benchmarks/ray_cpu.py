"""``infer --ray`` on this machine's CPUs: images/s against single-process ``infer``.

Times, interleaved over rounds (these machines are shared and noisy):

* ``single``: :func:`fcn_deploy.infer.run_inference`, onnxruntime runner on the CPU;
* ``ray 1x2``: :func:`fcn_deploy.infer.ray.run_inference_ray`, one worker holding 2 CPUs
  (the whole machine, like ``single``);
* ``ray 2x1``: two workers of 1 CPU each.

Ray's start-up (``ray.init`` of a local 2-CPU cluster) is timed once, apart. Each ray run is
reported twice: ``run`` from the call to the manifest written (the workers' process start and
model load included) and ``steady``: from the first worker's model loaded to the last row
received (the pool's start-up excluded); for ``single`` the same two: with and without the
model load. Goal: ``ray 1x2`` steady at most 10% slower than ``single`` on 100+ tiles.
A random-weight FCN (seed 0) is exported to ONNX in a temporary folder; photos are synthetic
500x375 JPEGs (4 tiles of 320x480 each).

    .venv/bin/python benchmarks/ray_cpu.py [--images 26] [--rounds 2]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def make_photos(folder: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        coarse = rng.integers(0, 256, (375 // 24, 500 // 24, 3), dtype=np.uint8)
        Image.fromarray(coarse).resize((500, 375), Image.BILINEAR).save(folder / f"photo_{i:03d}.jpg", quality=90)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=26)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    import ray

    from fcn_deploy.infer.ray import run_inference_ray
    from fcn_deploy.export.torch_export import export_onnx
    from fcn_deploy.infer.pipeline import run_inference
    from fcn_deploy.model import FCN, save_checkpoint
    from fcn_deploy.runners import open_runner

    work = Path(tempfile.mkdtemp(prefix="ray-bench-"))
    try:
        torch.manual_seed(0)
        save_checkpoint(work / "model.pt", FCN().eval())
        onnx = work / "export" / "fcn.onnx"
        export_onnx(work / "model.pt", onnx)
        make_photos(work / "photos", args.images)
        start = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        startup = time.perf_counter() - start
        print(f"ray.init (local cluster, 2 CPUs): {startup:.2f} s", flush=True)

        results: dict[str, list[tuple[float, float]]] = {"single": [], "ray 1x2": [], "ray 2x1": []}
        tiles = 0
        for r in range(args.rounds):
            for name in results:
                out = work / f"out-{name.replace(' ', '')}-{r}"
                if name == "single":
                    t0 = time.perf_counter()
                    runner = open_runner("ort", onnx, device="cpu")
                    runner.activate()  # model load: the start-up, as a Ray worker's
                    load = time.perf_counter() - t0
                    s = run_inference([work / "photos"], out, runner=runner, progress=False)
                    runner.deactivate()
                    results[name].append((s.images / (load + s.seconds), s.images / s.seconds))
                else:
                    n_workers, cpus = (1, 2.0) if name == "ray 1x2" else (2, 1.0)
                    arrivals: list[float] = []
                    ready: list[float] = []

                    def on_row(row, arrivals=arrivals, ready=ready):
                        arrivals.append(time.time())
                        ready.append(row["ready"])

                    t0 = time.perf_counter()
                    res = run_inference_ray([work / "photos"], out, backend="ort", model=onnx, device="cpu",
                                            ray_workers=n_workers, cpus_per_worker=cpus, progress=False,
                                            on_row=on_row)
                    wall = time.perf_counter() - t0
                    s = res.summary
                    # steady: from the first worker's model loaded to the last row received
                    results[name].append((s.images / wall, s.images / (arrivals[-1] - min(ready))))
                assert s.images == args.images and not s.failed, s.format()
                tiles = s.tiles
                shutil.rmtree(out)
                print(f"round {r} {name:8s}: {results[name][-1][0]:.2f} images/s run, "
                      f"{results[name][-1][1]:.2f} steady", flush=True)
        ray.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"\n{args.images} photos 500x375, {tiles} tiles 320x480, ort on CPU, {args.rounds} rounds interleaved")
    print("| run | images/s (whole run) | images/s (steady: model load / pool start-up excluded) |")
    print("|---|---|---|")
    for name, vals in results.items():
        run = [v[0] for v in vals]
        steady = [v[1] for v in vals]
        print(f"| {name} | {min(run):.2f}-{max(run):.2f} | {min(steady):.2f}-{max(steady):.2f} |")
    single = statistics.median(v[1] for v in results["single"])
    one = statistics.median(v[1] for v in results["ray 1x2"])
    print(f"ray.init start-up: {startup:.2f} s; ray 1x2 vs single, median steady images/s: "
          f"{100 * (single - one) / single:+.1f}% overhead (negative: ray faster)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
