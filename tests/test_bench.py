"""``bench``: report structure, statistics, options and the CLI (fields only, never speeds)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from fcn_deploy.bench import bench, latency_stats, machine_info, parse_batch_sizes, time_runs
from fcn_deploy.cli import cli
from fcn_deploy.errors import ArtifactExistsError, UsageError

SMALL = {"tile_hw": (64, 96)}


def test_parse_batch_sizes():
    assert parse_batch_sizes("1,8,32") == (1, 8, 32)
    assert parse_batch_sizes(" 4 ") == (4,)
    for bad in ("", "1,,2", "0", "-1", "one", "1.5"):
        with pytest.raises(UsageError, match="--batch-sizes"):
            parse_batch_sizes(bad)


def test_latency_stats_on_known_times():
    stats = latency_stats([0.004, 0.001, 0.003, 0.002], batch_size=2)
    assert stats["batch_size"] == 2 and stats["runs"] == 4
    assert stats["latency_ms"] == {"min": 1.0, "p50": 2.5, "p90": 3.7, "p99": 3.97, "mean": 2.5}
    assert stats["tiles_per_s"] == pytest.approx(800.0)  # 8 tiles in 10 ms


def test_time_runs_counts_and_budget():
    calls = []
    times = time_runs(lambda: calls.append(1), warmup=2, iterations=5, max_seconds=None)
    assert len(times) == 5 and len(calls) == 7 and all(t >= 0 for t in times)
    calls.clear()
    times = time_runs(lambda: calls.append(1), warmup=0, iterations=50, max_seconds=0.0)
    assert len(times) == 3 == len(calls)  # the budget stops it after the minimum of 3 runs


def test_machine_info_fields():
    info = machine_info()
    assert info["cpu"] and info["physical_cores"] >= 1 and info["logical_cpus"] >= 1
    assert {"torch", "onnxruntime", "onnx", "numpy"} <= set(info["versions"])
    assert "gpu" in info and info["python"].count(".") == 2


def test_bench_torch_emits_all_fields(checkpoint_path, tmp_path):
    lines = []
    out = tmp_path / "bench.json"
    result = bench("torch", checkpoint_path, batch_sizes=(1, 2), warmup=1, iterations=2,
                   report=out, runner_kwargs=SMALL, echo=lines.append)
    assert result["backend"] == "torch" and result["artifact"] == str(checkpoint_path)
    assert result["device"] == "cpu" and result["precision"] == "fp32" and result["inputs"] == "host"
    assert result["tile_hw"] == [64, 96] and result["warmup"] == 1 and result["iterations"] == 2
    assert [r["batch_size"] for r in result["engine"]] == [1, 2]
    for row in result["engine"]:
        lat = row["latency_ms"]
        assert row["runs"] == 2
        assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"]
        assert row["tiles_per_s"] == pytest.approx(row["batch_size"] * 1e3 / lat["mean"], rel=1e-2)
    assert result["pipeline"] is None
    assert result["machine"]["cpu"] and result["fcn_deploy_version"] and result["created"]
    assert json.loads(out.read_text()) == result
    table = lines[0].splitlines()
    assert table[0].startswith("bench torch (") and "tiles 64x96" in table[0]
    header = next(i for i, line in enumerate(table) if line.startswith("batch"))
    assert "p99 ms" in table[header] and "tiles/s" in table[header]
    assert [line.split()[0] for line in table[header + 2:]] == ["1", "2"]
    with pytest.raises(ArtifactExistsError, match="--force"):
        bench("torch", checkpoint_path, batch_sizes=(1,), report=out, runner_kwargs=SMALL, echo=None)


def test_bench_rejects_bad_options(checkpoint_path, tmp_path):
    with pytest.raises(UsageError, match="--iterations"):
        bench("torch", checkpoint_path, iterations=0, echo=None)
    with pytest.raises(UsageError, match="--batch-sizes"):
        bench("torch", checkpoint_path, batch_sizes=(0,), echo=None)
    with pytest.raises(UsageError, match="--images .* is not a folder"):
        bench("torch", checkpoint_path, images=tmp_path / "none", echo=None)
    with pytest.raises(UsageError, match="--backend must be one of"):
        bench("caffe", echo=None)


def test_bench_pipeline_on_a_folder(checkpoint_path, tmp_path):
    from PIL import Image

    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(50, 70), (64, 96), (200, 300)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(photos / f"p{i}.png")
    (photos / "broken.jpg").write_bytes(b"not a jpeg")
    lines = []
    # tiles larger than the pipeline's default overlap (128 px)
    result = bench("torch", checkpoint_path, batch_sizes=(1, 2), warmup=0, iterations=1,
                   images=photos, runner_kwargs={"tile_hw": (160, 192)}, echo=lines.append)
    pipe = result["pipeline"]
    best = max(result["engine"], key=lambda r: r["tiles_per_s"])["batch_size"]
    assert pipe["batch_size"] == best and pipe["images"] == 3 and pipe["failed"] == 1
    assert pipe["tiles"] >= 3 and pipe["seconds"] > 0
    assert pipe["images_per_s"] == pytest.approx(3 / pipe["seconds"], rel=1e-2)
    assert pipe["tiles_per_s"] == pytest.approx(pipe["tiles"] / pipe["seconds"], rel=1e-2)
    assert "pipeline (batch " in lines[0] and "3 images" in lines[0] and "1 failed" in lines[0]
    assert pipe["engine_tiles_per_s"] == max(r["tiles_per_s"] for r in result["engine"])
    assert pipe["end_to_end_ratio"] == pytest.approx(pipe["tiles_per_s"] / pipe["engine_tiles_per_s"], rel=1e-2)
    stages = pipe["stage_seconds"]
    assert list(stages) == ["read", "decode", "tiles", "upload", "engine", "stitch", "download", "encode"]
    assert pipe["decode"] == "cpu" and stages["read"] == 0  # files are read by PIL while decoding
    assert all(stages[k] > 0 for k in ("decode", "tiles", "engine", "encode"))
    assert "end-to-end / engine-only" in lines[0] and "seconds per stage" in lines[0]
    # the run's fixed costs: before the first batch (listing, loading, first decodes), after the last
    assert 0 < pipe["first_batch_s"] and 0 < pipe["drain_s"]
    assert pipe["first_batch_s"] + pipe["drain_s"] < pipe["seconds"]
    assert f"first batch at the engine after {pipe['first_batch_s']:.3f} s" in lines[0]


def test_bench_ort_stages_and_reports(onnx_path):
    result = bench("ort", onnx_path, batch_sizes=(1,), warmup=0, iterations=1, echo=None)
    (row,) = result["engine"]
    assert row["runs"] == 1 and row["tiles_per_s"] > 0
    assert result["tile_hw"] == [320, 480] and result["inputs"] == "host"


def test_cli_bench(checkpoint_path, tmp_path):
    runner = CliRunner()
    out = tmp_path / "r.json"
    res = runner.invoke(cli, ["bench", "--backend", "torch", "--model", str(checkpoint_path),
                              "--batch-sizes", "1", "--warmup", "0", "--iterations", "1",
                              "--report", str(out)])
    assert res.exit_code == 0, res.output
    assert "tiles/s" in res.output
    report = json.loads(out.read_text())
    assert report["engine"][0]["batch_size"] == 1 and report["tile_hw"] == [320, 480]
    res = runner.invoke(cli, ["bench", "--backend", "torch", "--model", str(checkpoint_path),
                              "--batch-sizes", "1,x"])
    assert res.exit_code == 2
    assert "error: --batch-sizes must be comma-separated positive integers, not '1,x'" in res.output
    res = runner.invoke(cli, ["bench", "--backend", "torch", "--model", str(tmp_path / "no.pt")])
    assert res.exit_code == 2 and "error: checkpoint" in res.output and "no.pt not found" in res.output


def test_random_tiles_are_normalised_photos():
    from fcn_deploy.bench import random_tiles

    tiles = random_tiles(2, (32, 64), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    assert tiles.shape == (2, 3, 32, 64) and tiles.dtype == np.float32
    assert tiles.min() >= -1.0 and tiles.max() <= 1.0 and tiles.std() > 0.4


def test_bench_refuses_a_batch_that_does_not_fit_in_memory(checkpoint_path, monkeypatch):
    """issue 24: ``bench --batch-sizes 100000`` grew to 24 GB and was killed; refused in one line
    as ``infer --batch-size`` is (the same limit, fcn_deploy.infer.limits), before any tile is made."""
    monkeypatch.setattr("fcn_deploy.infer.limits.batch_memory_limit", lambda: 5 << 20)  # 64x96: 8 tiles fit
    with pytest.raises(UsageError, match=r"^--batch-sizes 20: a batch of 64x96 tiles .* use --batch-sizes 8 or less"):
        bench("torch", checkpoint_path, batch_sizes=(1, 20), warmup=0, iterations=1, echo=None,
              runner_kwargs=SMALL)
    monkeypatch.undo()
    res = CliRunner().invoke(cli, ["bench", "--backend", "torch", "--model", str(checkpoint_path),
                                   "--batch-sizes", "1,100000"])
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    assert res.output.strip().splitlines()[-1].startswith("error: --batch-sizes 100000: a batch of 320x480 tiles")


def test_bench_images_folder_without_images_is_refused(checkpoint_path, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no photo here")
    with pytest.raises(UsageError, match=r"^--images .*empty: no images found in it$"):
        bench("torch", checkpoint_path, batch_sizes=(1,), warmup=0, iterations=1, images=tmp_path / "empty",
              echo=None)
