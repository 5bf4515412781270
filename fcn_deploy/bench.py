"""``fcn-deploy bench``: latency and throughput of one backend, engine alone and (optionally)
the whole ``infer`` pipeline, with the machine it ran on; or of several backends side by side
(:func:`bench_compare`, their timed calls interleaved so that load from other processes hits
them alike).

Engine alone: random photos-like tiles (uniform RGB, ImageNet-normalised) are staged once where
the runner computes (a CUDA tensor for torch, a device ``OrtValue`` with IO binding for
onnxruntime's CUDA/TensorRT providers, host memory on the CPU) and timed with
``runner.run_staged`` (synchronised); runners without ``stage`` are timed through
``runner.infer``. Timing lives here and in ``benchmarks/``; tests check fields, never speeds.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from fcn_deploy import __version__
from fcn_deploy.errors import UsageError
from fcn_deploy.fileio import check_writable, write_json_atomic
from fcn_deploy.outpaths import check_distinct_paths
from fcn_deploy.runners.base import capabilities_of

#: Installed distributions whose versions a report records (plus any ``tensorrt*``).
_VERSIONED = ("torch", "torchvision", "onnxruntime", "onnxruntime-gpu", "onnx", "numpy")


def parse_batch_sizes(text: str) -> tuple[int, ...]:
    """``"1,8,32"`` -> (1, 8, 32); anything else -> :class:`UsageError` naming the option."""
    try:
        sizes = tuple(int(part) for part in str(text).split(","))
    except ValueError:
        sizes = ()
    if not sizes or any(s < 1 for s in sizes):
        raise UsageError(f"--batch-sizes must be comma-separated positive integers, not {text!r}")
    return sizes


def machine_info() -> dict[str, Any]:
    """CPU model and cores, GPU name (when torch sees CUDA), OS, Python and library versions."""
    from fcn_deploy.runners.onnxrt import physical_cores

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.partition(":")[2].strip()
                break
    except OSError:
        pass
    gpu = None
    try:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except Exception:  # a CUDA build of torch without a usable driver
        gpu = None
    versions = {}
    for dist in importlib.metadata.distributions():
        name = (dist.metadata["Name"] or "").lower().replace("_", "-")
        if name in _VERSIONED or name.startswith("tensorrt"):
            versions[name] = dist.version
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "physical_cores": physical_cores(),
        "gpu": gpu,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": dict(sorted(versions.items())),
    }


def random_tiles(n: int, tile_hw: Sequence[int], mean, std, seed: int = 0) -> np.ndarray:
    """(n, 3, H, W) float32: uniform random RGB pixels normalised like photos."""
    from fcn_deploy.images import normalize

    rng = np.random.default_rng(seed)
    h, w = int(tile_hw[0]), int(tile_hw[1])
    return np.stack([normalize(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), mean, std) for _ in range(n)])


def latency_stats(seconds: Sequence[float], batch_size: int) -> dict[str, Any]:
    """Timed runs (s) -> runs, latency min/p50/p90/p99/mean (ms), throughput (tiles/s)."""
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return {
        "batch_size": batch_size,
        "runs": int(ms.size),
        "latency_ms": {
            "min": round(float(ms.min()), 3),
            "p50": round(float(p50), 3),
            "p90": round(float(p90), 3),
            "p99": round(float(p99), 3),
            "mean": round(float(ms.mean()), 3),
        },
        "tiles_per_s": round(batch_size * ms.size / (ms.sum() / 1e3), 2),
    }


def time_runs(
    fn: Callable[[], Any], warmup: int, iterations: int, max_seconds: float | None, min_runs: int = 3
) -> list[float]:
    """Call ``fn`` ``warmup`` times, then time up to ``iterations`` calls; stop early once
    ``max_seconds`` of timed runs have passed and at least ``min_runs`` were timed."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    for _ in range(iterations):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
        if max_seconds is not None and sum(times) >= max_seconds and len(times) >= min_runs:
            break
    return times


def time_interleaved(
    fns: Sequence[Callable[[], Any]], warmup: int, iterations: int, max_seconds: float | None, min_runs: int = 3
) -> list[list[float]]:
    """:func:`time_runs` for several functions at once, their calls interleaved (warm-up calls of
    each, then one timed call of each in turn); each stops on its own budget. Returns the
    seconds of each function's timed calls, in the order of ``fns``."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(iterations):
        running = [i for i, t in enumerate(times)
                   if max_seconds is None or sum(t) < max_seconds or len(t) < min_runs]
        if not running:
            break
        for i in running:
            start = time.perf_counter()
            fns[i]()
            times[i].append(time.perf_counter() - start)
    return times


def _check_bench_args(batch_sizes: Sequence[int], warmup: int, iterations: int) -> tuple[int, ...]:
    """The batch sizes as ints; :class:`UsageError` naming the option for impossible values."""
    sizes = tuple(int(b) for b in batch_sizes)
    if not sizes or min(sizes) < 1:
        raise UsageError(f"--batch-sizes must be positive integers, not {sizes}")
    if warmup < 0 or iterations < 1:
        raise UsageError(f"--warmup must be >= 0 and --iterations >= 1 (got {warmup}, {iterations})")
    return sizes


def _check_batch_memory(batch_sizes: Sequence[int], runner, name: str) -> None:
    """Refuse (one line, as ``infer --batch-size``: :func:`fcn_deploy.infer.limits.check_batch_size`)
    a batch size whose float32 tiles and logits do not fit, before any tile is made."""
    from fcn_deploy.infer.limits import check_batch_size

    num_classes = int(runner.meta.get("num_classes") or len(runner.meta["classes"]))
    for bs in batch_sizes:
        check_batch_size(bs, tuple(runner.tile_hw), num_classes, option="--batch-sizes")


def _check_images(images) -> None:
    """``--images``: a folder holding at least one image (as ``check --images``)."""
    if images is None:
        return
    from fcn_deploy.infer.inputs import find_images

    if not Path(images).is_dir():
        raise UsageError(f"--images {images} is not a folder")
    if not find_images([images]):
        raise UsageError(f"--images {images}: no images found in it")


def _timed_call(runner, batch: np.ndarray) -> Callable[[], Any]:
    """What a timed call runs: ``run_staged`` on inputs staged where the runner computes, else
    ``infer`` on host arrays."""
    if capabilities_of(runner).staged:
        staged = runner.stage(batch)
        return lambda: runner.run_staged(staged)
    return lambda: runner.infer(batch)


def bench_compare(
    backends: Sequence[str],
    *,
    batch_sizes: Sequence[int] = (1, 8, 32),
    warmup: int = 3,
    iterations: int = 20,
    max_seconds: float | None = 5.0,
    device: str = "auto",
    precision: str | None = None,
    report: str | os.PathLike | None = None,
    force: bool = False,
    export_dir: str | os.PathLike = "export",
    engines_dir: str | os.PathLike = "engines",
    echo: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """Benchmark several backends (their default artifacts from the chain) side by side, in one
    process, on the same random tiles, every timed call interleaved across backends.

    Returns ``{"backends": [{"backend", "artifact", "device", "precision", "engine": [rows as in
    :func:`bench`]}...], "comparison": [{"batch_size", "tiles_per_s": {backend: v},
    "vs_first": {backend: ratio to the first backend's tiles/s}}...], "tile_hw", "warmup",
    "iterations", "machine", "fcn_deploy_version", "created"}``.
    """
    import contextlib

    from fcn_deploy.runners import open_runner
    from fcn_deploy.runners.registry import get_backend

    names = list(dict.fromkeys(backends))
    if len(names) < 2:
        raise UsageError("bench_compare needs at least two different --backend values")
    batch_sizes = _check_bench_args(batch_sizes, warmup, iterations)
    if report is not None:
        report = check_writable(report, force)
    with contextlib.ExitStack() as stack:
        # --precision goes to the backends that take one (torch, trt); an ONNX decides its own
        runners = [stack.enter_context(open_runner(
            n, device=device, precision=precision if get_backend(n).precision is None else None,
            export_dir=export_dir, engines_dir=engines_dir)) for n in names]
        tile_hw = runners[0].tile_hw
        for name, runner in zip(names, runners):
            if tuple(runner.tile_hw) != tuple(tile_hw):
                raise UsageError(f"--backend {name} has {runner.tile_hw[0]}x{runner.tile_hw[1]} tiles, "
                                 f"{names[0]} {tile_hw[0]}x{tile_hw[1]}: compare artifacts of one export")
            if runner.max_batch is not None and max(batch_sizes) > runner.max_batch:
                raise UsageError(f"--batch-sizes {max(batch_sizes)}: this {name} artifact takes at most {runner.max_batch}")
            _check_batch_memory(batch_sizes, runner, name)
        meta = runners[0].meta
        tiles = random_tiles(max(batch_sizes), tile_hw, meta["mean"], meta["std"])
        rows: list[list[dict[str, Any]]] = [[] for _ in runners]
        for bs in batch_sizes:
            batch = np.ascontiguousarray(tiles[:bs])
            times = time_interleaved([_timed_call(r, batch) for r in runners], warmup, iterations, max_seconds)
            for i, t in enumerate(times):
                rows[i].append(latency_stats(t, bs))
        per_backend = [
            {"backend": name, "artifact": str(r.artifact),
             "device": r.device, "precision": r.meta.get("precision"), "engine": engine}
            for name, r, engine in zip(names, runners, rows)
        ]
    comparison = []
    for j, bs in enumerate(batch_sizes):
        speeds = {b["backend"]: b["engine"][j]["tiles_per_s"] for b in per_backend}
        first = speeds[names[0]]
        comparison.append({"batch_size": bs, "tiles_per_s": speeds,
                           "vs_first": {n: round(v / first, 3) if first else None for n, v in speeds.items()}})
    result = {"backends": per_backend, "comparison": comparison, "tile_hw": list(tile_hw), "warmup": warmup,
              "iterations": iterations, "machine": machine_info(), "fcn_deploy_version": __version__,
              "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    if echo is not None:
        echo(format_comparison(result))
    if report is not None:
        write_json_atomic(report, result)
    return result


def format_comparison(result: dict[str, Any]) -> str:
    """The terminal table of a :func:`bench_compare` result: tiles/s of every backend side by
    side per batch size, each with its ratio to the first backend, then p50 latencies."""
    from fcn_deploy.report import format_table

    m = result["machine"]
    h, w = result["tile_hw"]
    backends = result["backends"]
    lines = [
        "bench " + " vs ".join(f"{b['backend']} ({b['artifact']}, {b['precision']}, {b['device']})" for b in backends)
        + f", tiles {h}x{w}, calls interleaved",
        f"machine: {m['cpu']}, {m['physical_cores']} cores" + (f", {m['gpu']}" if m["gpu"] else ""),
        "",
    ]
    first = backends[0]["backend"]
    header = ["batch"] + [f"{b['backend']} tiles/s" for b in backends] + [f"x {first}"]
    rows = []
    for j, c in enumerate(result["comparison"]):
        ratios = " / ".join(f"{c['vs_first'][b['backend']]:.2f}" for b in backends[1:])
        rows.append([str(c["batch_size"])] + [f"{c['tiles_per_s'][b['backend']]:.2f}" for b in backends] + [ratios])
    lines.append(format_table(header, rows))
    lines.append("p50 ms: " + "; ".join(
        f"{b['backend']} " + ", ".join(f"b{r['batch_size']} {r['latency_ms']['p50']:.1f}" for r in b["engine"])
        for b in backends))
    return "\n".join(lines)


def bench(
    backend: str,
    model: str | os.PathLike | None = None,
    *,
    batch_sizes: Sequence[int] = (1, 8, 32),
    warmup: int = 3,
    iterations: int = 20,
    max_seconds: float | None = 5.0,
    device: str = "auto",
    precision: str | None = None,
    images: str | os.PathLike | None = None,
    decode: str = "cpu",
    report: str | os.PathLike | None = None,
    force: bool = False,
    export_dir: str | os.PathLike = "export",
    engines_dir: str | os.PathLike = "engines",
    runner_kwargs: dict[str, Any] | None = None,
    echo: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """Benchmark ``backend`` and return the report (also written to ``report`` as JSON).

    Args:
        backend, model, device, precision, export_dir, engines_dir, runner_kwargs: as for
            :func:`fcn_deploy.runners.open_runner`.
        batch_sizes: tiles per call, each timed separately.
        warmup: untimed calls before each batch size's timed runs.
        iterations: timed calls per batch size (fewer once ``max_seconds`` of them have run,
            but at least 3), so that slow CPU batches stay bounded.
        images: a folder of photos: also time the whole ``infer`` pipeline on it (outputs
            go to a temporary folder), at the batch size of best engine throughput, and report
            end-to-end tiles/s and images/s, their ratio to the engine alone, and seconds per
            stage (summed over threads, so overlapping stages add up to more than the wall
            time; on CUDA see :class:`~fcn_deploy.tiling.StageClock` for what each measures);
            ``decode`` as :func:`~fcn_deploy.infer.run_inference`'s.
        report: JSON path, written atomically (``force`` to overwrite).
        echo: where the table goes (None: silent).

    Returns:
        ``{"backend", "artifact", "device", "precision", "tile_hw", "inputs", "warmup",
        "iterations", "engine": [{"batch_size", "runs", "latency_ms": {"min", "p50", "p90",
        "p99", "mean"}, "tiles_per_s"}...], "pipeline": {"batch_size", "images", "failed",
        "tiles", "seconds", "images_per_s", "tiles_per_s", "engine_tiles_per_s",
        "end_to_end_ratio" (pipeline / engine tiles/s), "stage_seconds": {decode, tiles, upload,
        engine, stitch, download, encode}} | None, "machine": {...},
        "fcn_deploy_version", "created"}``.
    """
    from fcn_deploy.runners import open_runner

    batch_sizes = _check_bench_args(batch_sizes, warmup, iterations)
    _check_images(images)
    if decode != "cpu" and images is None:
        raise UsageError("--decode applies to the pipeline run of --images")
    check_distinct_paths({"--report": report}, {"--model": model, "--images": images})
    if report is not None:
        report = check_writable(report, force)
    runner = open_runner(
        backend, model, device=device, precision=precision, export_dir=export_dir,
        engines_dir=engines_dir, **(runner_kwargs or {}),
    )
    with runner:
        too_big = [b for b in batch_sizes if runner.max_batch is not None and b > runner.max_batch]
        if too_big:
            raise UsageError(f"--batch-sizes {too_big[0]}: this {backend} artifact takes at most {runner.max_batch}")
        _check_batch_memory(batch_sizes, runner, backend)
        tiles = random_tiles(max(batch_sizes), runner.tile_hw, runner.meta["mean"], runner.meta["std"])
        staged_ok = capabilities_of(runner).staged
        engine = []
        for bs in batch_sizes:
            fn = _timed_call(runner, np.ascontiguousarray(tiles[:bs]))
            engine.append(latency_stats(time_runs(fn, warmup, iterations, max_seconds), bs))
        result: dict[str, Any] = {
            "backend": backend,
            "artifact": str(runner.artifact),
            "device": runner.device,
            "precision": runner.meta.get("precision"),
            "tile_hw": list(runner.tile_hw),
            "inputs": "device" if staged_ok and runner.device.startswith("cuda") else "host",
            "warmup": warmup,
            "iterations": iterations,
            "engine": engine,
            "pipeline": None,
        }
        if images is not None:
            best = max(engine, key=lambda r: r["tiles_per_s"])
            result["pipeline"] = _bench_pipeline(runner, Path(images), best["batch_size"], best["tiles_per_s"], decode)
    result["machine"] = machine_info()
    result["fcn_deploy_version"] = __version__
    result["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    if echo is not None:
        echo(format_report(result))
    if report is not None:
        write_json_atomic(report, result)
    return result


#: Pipeline stages in the order an image meets them (see :class:`fcn_deploy.tiling.StageClock`).
STAGES = ("read", "decode", "tiles", "upload", "engine", "stitch", "download", "encode")


def _bench_pipeline(runner, images: Path, batch_size: int, engine_tiles_per_s: float,
                    decode: str = "cpu") -> dict[str, Any]:
    """Run the whole ``infer`` pipeline over ``images`` into a temporary folder; compare its
    tiles/s with the engine alone at the same batch size; seconds per stage. A warm-up run on
    the first two images comes first (untimed, as the engine's warm-up calls): one-time costs
    such as the JPEG decoder's set-up or a first batch shape are not counted."""
    from fcn_deploy.infer.pipeline import run_inference
    from fcn_deploy.infer.inputs import collect_inputs

    with tempfile.TemporaryDirectory(prefix="fcn-bench-") as out:
        first = [item.path for item in collect_inputs([images])[0][:2]]
        if first:
            run_inference(first, Path(out) / "warmup", runner=runner, batch_size=batch_size, progress=False,
                          decode=decode)
        summary = run_inference([images], Path(out) / "run", runner=runner, batch_size=batch_size, progress=False,
                                decode=decode)
    stages = {k: round(summary.stages.get(k, 0.0), 3) for k in STAGES}
    return {
        "batch_size": batch_size,
        "decode": decode,
        "images": summary.images,
        "failed": len(summary.failed),
        "tiles": summary.tiles,
        "seconds": round(summary.seconds, 3),
        "images_per_s": round(summary.images_per_s, 3),
        "tiles_per_s": round(summary.tiles_per_s, 2),
        "engine_tiles_per_s": engine_tiles_per_s,
        "end_to_end_ratio": round(summary.tiles_per_s / engine_tiles_per_s, 4) if engine_tiles_per_s else None,
        "stage_seconds": stages,
        "first_batch_s": round(summary.first_batch_s, 4),
        "drain_s": round(summary.drain_s, 4),
    }


def format_report(result: dict[str, Any]) -> str:
    """The terminal table of a :func:`bench` result."""
    from fcn_deploy.report import format_table

    m = result["machine"]
    h, w = result["tile_hw"]
    lines = [
        f"bench {result['backend']} ({result['artifact']}), {result['precision']}, "
        f"{result['device']}, tiles {h}x{w}, {result['inputs']} inputs",
        f"machine: {m['cpu']}, {m['physical_cores']} cores" + (f", {m['gpu']}" if m["gpu"] else ""),
        "",
    ]
    rows = [
        [str(r["batch_size"]), str(r["runs"]),
         *(f"{r['latency_ms'][k]:.2f}" for k in ("min", "p50", "p90", "p99")), f"{r['tiles_per_s']:.1f}"]
        for r in result["engine"]
    ]
    lines.append(format_table(["batch", "runs", "min ms", "p50 ms", "p90 ms", "p99 ms", "tiles/s"], rows))
    p = result["pipeline"]
    if p is not None:
        lines.append(
            f"pipeline (batch {p['batch_size']}): {p['images']} images ({p['tiles']} tiles), "
            f"{p['failed']} failed, {p['seconds']:.2f} s, {p['images_per_s']:.2f} images/s, "
            f"{p['tiles_per_s']:.1f} tiles/s"
        )
        ratio = p.get("end_to_end_ratio")
        if ratio is not None:
            lines.append(f"end-to-end / engine-only: {p['tiles_per_s']:.1f} / {p['engine_tiles_per_s']:.1f} "
                         f"tiles/s = {100 * ratio:.1f}%")
        lines.append(f"first batch at the engine after {p['first_batch_s']:.3f} s; after the last one "
                     f"{p['drain_s']:.3f} s to the end (stitching, writes)")
        stages = p.get("stage_seconds") or {}
        if stages:
            lines.append("seconds per stage (summed over threads): "
                         + ", ".join(f"{k} {v:.2f}" for k, v in stages.items()))
    return "\n".join(lines)
