"""``fcn-deploy serve`` under load on this machine's CPUs, against offline ``infer`` on the same
photos in the same run.

1. Offline: ``fcn-deploy infer`` in its own process (onnxruntime on the CPU, ``--batch-size 8``)
   on the photos: images/s from its summary line (model load excluded).
2. The server (:func:`fcn_deploy.serve.command.start`: a private local Ray cluster, one model
   replica, batches of 8 tiles across requests), warmed by one pass over the photos, then a bounded
   asynchronous HTTP client (aiohttp, at most C requests open) at concurrency 1, 4 and 16 over
   the photos: throughput (images/s from the first request sent to the last answer), latency
   p50/p90/p99 and errors by status; every mask is checked against offline infer's bytes.
3. ``--kill``: at concurrency 4, the model replica's process is killed (SIGKILL) mid-load: the
   statuses of the requests in flight and the time until the server answers 200 again.
4. Offline again (the machine is shared: the ratio uses the mean of both offline runs).

Goal: at saturating concurrency (16) serving throughput >= 85% of offline infer's images/s.
Photos: synthetic JPEGs of mixed sizes (100x150 to 768x1024: 1 to 12 tiles of 320x480); a
random-weight FCN (seed 0) exported to ONNX in a temporary folder.

    .venv/bin/python benchmarks/serve_load.py [--photos 24] [--requests 48] [--kill] [--out benchmarks/results/serve_load_cpu.txt]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

SIZES = [(375, 500), (500, 375), (240, 320), (480, 640), (333, 500), (768, 1024), (100, 150), (320, 480)]


def make_photos(folder: Path, n: int) -> list[Path]:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        h, w = SIZES[i % len(SIZES)]
        coarse = rng.integers(0, 256, (max(2, h // 24), max(2, w // 24), 3), dtype=np.uint8)
        path = folder / f"photo_{i:03d}.jpg"
        Image.fromarray(coarse).resize((w, h), Image.BILINEAR).save(path, quality=90)
        paths.append(path)
    return paths


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


async def load(url: str, bodies: list[bytes], masks: list[bytes] | None, concurrency: int, total: int,
               timeout_s: float = 120.0, on_start=None) -> dict:
    """``total`` POSTs of ``bodies`` (cycled) with at most ``concurrency`` open at once."""
    import aiohttp

    latencies: list[float] = []
    statuses: Counter = Counter()
    wrong = 0
    next_index = 0

    async def worker(session):
        nonlocal next_index, wrong
        while next_index < total:
            i = next_index
            next_index += 1
            body = bodies[i % len(bodies)]
            t0 = time.perf_counter()
            try:
                async with session.post(url, data=body, headers={"Content-Type": "image/jpeg"}) as res:
                    data = await res.read()
                    statuses[res.status] += 1
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                statuses[type(exc).__name__] += 1
                continue
            latencies.append(time.perf_counter() - t0)
            if res.status == 200 and masks is not None and data != masks[i % len(bodies)]:
                wrong += 1

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:
        start = time.perf_counter()
        tasks = [asyncio.ensure_future(worker(session)) for _ in range(concurrency)]
        if on_start is not None:
            await on_start()
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - start
    ok = statuses.get(200, 0)
    return {"concurrency": concurrency, "requests": total, "ok": ok, "seconds": wall, "images_per_s": ok / wall,
            "p50_ms": 1000 * percentile(latencies, 50), "p90_ms": 1000 * percentile(latencies, 90),
            "p99_ms": 1000 * percentile(latencies, 99), "statuses": {str(k): v for k, v in sorted(statuses.items(), key=str)},
            "masks_differing_from_infer": wrong}


def offline(photos_dir: Path, onnx: Path, out: Path, batch: int) -> dict:
    """``fcn-deploy infer`` as a user runs it (its own process), images/s from its summary line
    (the run without the model load)."""
    import re
    import subprocess

    cmd = [sys.executable, "-m", "fcn_deploy", "infer", str(photos_dir), "-o", str(out), "--backend", "ort",
           "--model", str(onnx), "--device", "cpu", "--batch-size", str(batch)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    found = re.search(r"(\d+) images segmented, 0 failed.*?(\d+) tiles in ([\d.]+) s \(([\d.]+) images/s", done.stdout)
    assert found, done.stdout + done.stderr
    images, tiles, seconds, rate = found.groups()
    return {"images": int(images), "tiles": int(tiles), "seconds": float(seconds), "images_per_s": float(rate)}


def descendants(root: int) -> list[int]:
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parents[int(entry)] = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    found, todo = [], [root]
    while todo:
        parent = todo.pop()
        kids = [p for p, pp in parents.items() if pp == parent]
        found += kids
        todo += kids
    return found


def process_of(title: str) -> int | None:
    """The pid of this process's Ray descendant whose title starts with ``title``."""
    for pid in descendants(os.getpid()):
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode().startswith(title):
                return pid
        except OSError:
            continue
    return None


async def kill_stage(url: str, base: str, bodies: list[bytes], settings) -> dict:
    """Concurrency 4; the model replica SIGKILLed 2 s in; the time until a request is answered 200."""
    import aiohttp

    victim = process_of("ray::ServeReplica:fcn-deploy:SegmentModel")
    info: dict = {"victim_pid": victim}

    async def kill():
        await asyncio.sleep(2.0)
        info["killed_at"] = time.perf_counter()
        os.kill(victim, signal.SIGKILL)

    result = await load(url, bodies, None, 4, 16, timeout_s=settings.timeout_s + 30, on_start=kill)
    async with aiohttp.ClientSession() as session:
        while True:
            async with session.post(url, data=bodies[6], headers={"Content-Type": "image/jpeg"}) as res:
                await res.read()
                if res.status == 200:
                    break
            await asyncio.sleep(0.2)
    info["recovered_s"] = time.perf_counter() - info.pop("killed_at")
    info["statuses"] = result["statuses"]
    info["max_latency_ms"] = result["p99_ms"]
    info["new_pid"] = process_of("ray::ServeReplica:fcn-deploy:SegmentModel")
    return info


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--photos", type=int, default=24)
    parser.add_argument("--requests", type=int, default=48, help="requests at concurrency 4 and 16 (1: --photos)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--kill", action="store_true", help="also kill the model replica under load")
    parser.add_argument("--out", type=Path, help="write the summary (and <out>.json) here")
    args = parser.parse_args()

    import torch

    from fcn_deploy.export.torch_export import export_onnx
    from fcn_deploy.model import FCN, save_checkpoint
    from fcn_deploy.serve import ServeSettings
    from fcn_deploy.serve.command import start

    work = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    torch.manual_seed(0)
    save_checkpoint(work / "model.pt", FCN().eval())
    onnx = work / "export" / "fcn.onnx"
    export_onnx(work / "model.pt", onnx)
    paths = make_photos(work / "photos", args.photos)
    bodies = [p.read_bytes() for p in paths]
    lines = [f"# benchmarks/serve_load.py --photos {args.photos} --requests {args.requests}"
             f"{' --kill' if args.kill else ''}, {time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs "
             f"({platform.processor() or platform.machine()}), ort on CPU, batch {args.batch_size}"]

    def say(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    results: dict = {"offline": [], "serve": [], "kill": None}
    results["offline"].append(offline(work / "photos", onnx, work / "infer-1", args.batch_size))
    say(f"offline infer (before): {results['offline'][-1]['images_per_s']:.3f} images/s, "
        f"{results['offline'][-1]['tiles']} tiles")
    masks = [(work / "infer-1" / (p.stem + ".png")).read_bytes() for p in paths]

    settings = ServeSettings(backend="ort", model=str(onnx), device="cpu", port=args.port, batch_size=args.batch_size,
                             max_ongoing=16, max_queued=64, timeout_s=120.0)
    t0 = time.perf_counter()
    server = start(settings)
    say(f"server ready in {time.perf_counter() - t0:.1f} s (Ray cluster start, Serve, replica warm-up)")
    url = f"{server.url}/v1/segment"
    try:
        asyncio.run(load(url, bodies, masks, 4, len(bodies)))  # warm: every image size once
        for c in (1, 4, 16):
            r = asyncio.run(load(url, bodies, masks, c, len(bodies) if c == 1 else args.requests))
            results["serve"].append(r)
            say(f"serve c={c:2d}: {r['images_per_s']:.3f} images/s, p50 {r['p50_ms']:.0f} ms, p90 {r['p90_ms']:.0f} ms, "
                f"p99 {r['p99_ms']:.0f} ms, statuses {r['statuses']}, masks != infer: {r['masks_differing_from_infer']}")
        if args.kill:
            k = asyncio.run(kill_stage(url, server.url, bodies, server.settings))
            results["kill"] = k
            say(f"killed the model replica (pid {k['victim_pid']}) under load at c=4: statuses {k['statuses']}, "
                f"slowest answer {k['max_latency_ms']:.0f} ms (p99), answered 200 again {k['recovered_s']:.1f} s "
                f"after the kill (new replica pid {k['new_pid']})")
    finally:
        server.close()
    results["offline"].append(offline(work / "photos", onnx, work / "infer-2", args.batch_size))
    say(f"offline infer (after): {results['offline'][-1]['images_per_s']:.3f} images/s")
    base = statistics.mean(r["images_per_s"] for r in results["offline"])
    top = results["serve"][-1]["images_per_s"]
    say(f"ratio at c=16: {top:.3f} / {base:.3f} = {100 * top / base:.1f}% of offline infer's images/s "
        f"(goal >= 85%)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")
        args.out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
