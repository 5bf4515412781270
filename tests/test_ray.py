"""``infer --ray`` / ``evaluate --ray`` on a real local Ray cluster (2 CPUs, one per module).

Needs the ``ray`` extra (CI installs it: Makefile EXTRAS); the last tests simulate its absence.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from fcn_deploy.infer.pipeline import run_inference
from fcn_deploy.runners.torch_runner import TorchRunner

SMALL = (64, 96)  # tile of the runners here: small photos, fast tiles
OVERLAP = 32


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray", reason="the 'ray' extra (CI installs it)")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _photo(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(2, h // 16), max(2, w // 16), 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((w, h), Image.BILINEAR))


def _photos(root, n: int, hw=(50, 80)):
    names = []
    for i in range(n):
        rel = f"sub/p{i:02d}.png" if i % 3 == 0 else f"p{i:02d}.jpg"
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_photo(hw[0] + i, hw[1], seed=i)).save(path)
        names.append(rel.rsplit(".", 1)[0] + ".png")
    return sorted(names)


def _ray_infer(paths, out, checkpoint, **kw):
    from fcn_deploy.infer.ray import run_inference_ray

    kw.setdefault("ray_workers", 2)
    return run_inference_ray(paths, out, backend="torch", model=checkpoint, device="cpu", overlap=OVERLAP,
                             runner_options={"tile_hw": SMALL}, progress=False, **kw)


def _masks(out) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*.png") if not p.name.startswith("."))


def _manifest(out) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def test_ray_masks_equal_single_process_and_a_corrupt_file_is_reported_once(ray_cluster, checkpoint_path, tmp_path):
    photos = tmp_path / "in"
    names = _photos(photos, 6)
    odd = os.fsdecode(b"p\xff06")  # a name that is no UTF-8 (issue 24, defect 5: a traceback before)
    Image.fromarray(_photo(56, 80, seed=6)).save(photos / f"{odd}.jpg")
    names = sorted([*names, f"{odd}.png"])
    (photos / "corrupt.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    runner = TorchRunner(checkpoint_path, tile_hw=SMALL)
    # one tile per call on both sides: see test_evaluate_ray_equals_single_process
    single = run_inference([photos], tmp_path / "single", runner=runner, overlap=OVERLAP, batch_size=1,
                           progress=False)
    result = _ray_infer([photos], tmp_path / "ray", checkpoint_path, batch_size=1)
    summary = result.summary
    assert (summary.images, summary.skipped, summary.tiles) == (single.images, 0, single.tiles) == (7, 0, single.tiles)
    assert _masks(tmp_path / "ray") == _masks(tmp_path / "single") == names
    for name in names:
        assert (tmp_path / "ray" / name).read_bytes() == (tmp_path / "single" / name).read_bytes(), name
    assert [os.path.basename(p) for p, _ in summary.failed] == ["corrupt.jpg"]  # once, by name
    assert "corrupt.jpg" in summary.failed[0][1]
    rows = _manifest(tmp_path / "ray")
    assert [r["input"] for r in rows] == sorted(r["input"] for r in rows)
    assert len(rows) == 8 and {r["status"] for r in rows} == {"ok", "failed"}
    bad = [r for r in rows if r["status"] == "failed"]
    assert len(bad) == 1 and "corrupt.jpg" in bad[0]["error"] and bad[0]["input"].endswith("corrupt.jpg")
    for r in rows:
        assert set(r) == {"input", "output", "status", "error", "tiles", "seconds", "worker", "device"}
        assert r["device"] == "cpu" and ":" in r["worker"]
        if r["status"] == "ok":
            assert r["error"] is None and r["tiles"] >= 1 and os.path.isfile(r["output"])
    assert summary.format().startswith("7 images segmented, 1 failed, 0 skipped")


def test_a_killed_worker_is_replaced_and_every_image_masked_once(ray_cluster, checkpoint_path, tmp_path):
    photos = tmp_path / "in"
    names = _photos(photos, 12, hw=(30, 40))
    killed: list[int] = []

    def kill_first_worker(row):
        if not killed:
            killed.append(row["pid"])
            os.kill(row["pid"], signal.SIGKILL)

    result = _ray_infer([photos], tmp_path / "out", checkpoint_path, images_per_batch=2, slow_s=0.15,
                        on_row=kill_first_worker)
    assert killed
    assert result.summary.images == 12 and not result.summary.failed
    assert _masks(tmp_path / "out") == names  # every image has its mask, once
    rows = _manifest(tmp_path / "out")
    assert len(rows) == 12 and len({r["input"] for r in rows}) == 12
    assert all(r["status"] == "ok" for r in rows)
    pids = {int(r["worker"].rsplit(":", 1)[1]) for r in rows}
    # the killed actor held a batch (Ray Data queues batches per actor): its replacement redid it
    assert len(pids - set(killed)) == 2, f"no replacement of worker {killed[0]}: {sorted(pids)}"
    with pytest.raises(ProcessLookupError):
        os.kill(killed[0], 0)  # it really died


def test_skip_existing_after_an_interrupted_driver_redoes_nothing_finished(ray_cluster, checkpoint_path, tmp_path):
    photos = tmp_path / "in"
    names = _photos(photos, 8, hw=(30, 40))
    out = tmp_path / "out"
    seen: list[str] = []

    class DriverDied(Exception):
        pass

    def die_after_three(row):
        seen.append(row["input"])
        if len(seen) == 3:
            raise DriverDied()

    with pytest.raises(DriverDied):
        _ray_infer([photos], out, checkpoint_path, images_per_batch=1, slow_s=0.1, on_row=die_after_three)
    finished = {name: (out / name).stat().st_mtime_ns for name in _masks(out)}
    assert 3 <= len(finished) < 8
    result = _ray_infer([photos], out, checkpoint_path, skip_existing=True)
    assert result.summary.skipped == len(finished)
    assert result.summary.images == 8 - len(finished) and not result.summary.failed
    assert _masks(out) == names
    for name, mtime in finished.items():
        assert (out / name).stat().st_mtime_ns == mtime, f"{name} was redone"
    rows = _manifest(out)
    assert len(rows) == 8
    assert sum(r["status"] == "skipped" for r in rows) == len(finished)
    assert sum(r["status"] == "ok" for r in rows) == 8 - len(finished)


def test_evaluate_ray_equals_single_process(ray_cluster, checkpoint_path, voc_root):
    from fcn_deploy.evaluate import evaluate_ray
    from fcn_deploy.evaluate import evaluate_runner
    from fcn_deploy.voc import list_split

    samples = (list_split(voc_root, "val") + list_split(voc_root, "train"))[:4]
    assert len(samples) == 4
    tile = (160, 224)  # VOC-sized photos: a few tiles each
    # one tile per call: a tile's logits then cannot depend on which tiles share its batch (they
    # may, by float rounding, in the last bit, as between single-process runs of other --batch-size)
    with TorchRunner(checkpoint_path, tile_hw=tile) as runner:
        single, _ = evaluate_runner(runner, samples, overlap=OVERLAP, batch_size=1)
    result, info = evaluate_ray(samples, backend="torch", model=checkpoint_path, device="cpu", overlap=OVERLAP,
                                batch_size=1, ray_workers=2, images_per_batch=2, runner_options={"tile_hw": tile})
    assert result["confusion_matrix"] == single["confusion_matrix"]
    for key in ("images", "tiles", "pixels", "pixel_acc", "class_acc", "miou", "iou", "label_pixels_outside_classes"):
        assert result[key] == single[key], key
    assert info["device"] == "cpu" and info["precision"] == "fp32" and info["workers"]


def test_bad_ray_address_is_one_line(tmp_path):
    from fcn_deploy.cli import cli

    (tmp_path / "photos").mkdir()
    res = CliRunner().invoke(cli, ["infer", str(tmp_path / "photos"), "--ray", "more-photos", "-o", str(tmp_path / "out")])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert res.output.startswith("error: --ray more-photos: not a Ray address") and res.output.count("\n") == 1


def test_without_ray_the_package_works_and_ray_is_a_one_line_error(checkpoint_path, tmp_path):
    code = (
        "import sys; sys.modules['ray'] = None\n"  # import ray -> ImportError, as when not installed
        "import fcn_deploy, fcn_deploy.cli, fcn_deploy.infer.pipeline, fcn_deploy.evaluate, fcn_deploy.distributed, fcn_deploy.infer.ray\n"
        "from click.testing import CliRunner\n"
        "r = CliRunner().invoke(fcn_deploy.cli.cli, sys.argv[1:])\n"
        "print(r.output); sys.exit(r.exit_code)\n"
    )
    photo = tmp_path / "a.png"
    Image.fromarray(_photo(40, 60, 0)).save(photo)
    env = {**os.environ, "PYTHONPATH": os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", "")}
    base = ["infer", str(photo), "--backend", "torch", "--model", str(checkpoint_path), "--device", "cpu"]
    plain = subprocess.run([sys.executable, "-c", code, *base, "-o", str(tmp_path / "plain")],
                           capture_output=True, text=True, env=env, timeout=120)
    assert plain.returncode == 0, plain.stdout + plain.stderr
    assert (tmp_path / "plain" / "a.png").is_file()
    ray = subprocess.run([sys.executable, "-c", code, *base, "-o", str(tmp_path / "ray"), "--ray"],
                         capture_output=True, text=True, env=env, timeout=120)
    lines = [line for line in ray.stdout.splitlines() if line.strip()]
    assert ray.returncode == 2, ray.stdout + ray.stderr
    assert len(lines) == 1 and lines[0].startswith("error:") and "fcn-deploy[ray]" in lines[0]
    assert not (tmp_path / "ray").exists()


def test_cli_infer_ray_and_a_pool_the_cluster_cannot_hold(ray_cluster, checkpoint_path, tmp_path):
    from fcn_deploy.cli import cli

    photo = tmp_path / "a.png"
    Image.fromarray(_photo(40, 60, 0)).save(photo)
    base = ["infer", str(photo), "--backend", "torch", "--model", str(checkpoint_path), "--device", "cpu"]
    gpus = CliRunner().invoke(cli, [*base, "-o", str(tmp_path / "gpu"), "--ray-gpus-per-worker", "1", "--ray"])
    assert gpus.exit_code == 2
    assert gpus.output.startswith("error: --ray-gpus-per-worker 1: the Ray cluster has 0 GPUs")
    assert not (tmp_path / "gpu").exists()
    ok = CliRunner().invoke(cli, [*base, "-o", str(tmp_path / "out"), "--ray"])
    assert ok.exit_code == 0, ok.output
    assert "1 images segmented, 0 failed, 0 skipped" in ok.output
    assert (tmp_path / "out" / "a.png").is_file()
    assert [r["status"] for r in _manifest(tmp_path / "out")] == ["ok"]
