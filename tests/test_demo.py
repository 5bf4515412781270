"""The newcomer's path (issue 7): ``fcn-deploy demo`` end to end on a reduced setting."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from fcn_deploy.cli import cli
from fcn_deploy.demo import MARKER, DemoSettings, run_demo


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    work = tmp_path_factory.mktemp("demo") / "work"
    lines: list[str] = []
    settings = DemoSettings(num_images=6, epochs=1, crop_hw=(64, 96), batch_size=4, check_tiles=4)
    result = run_demo(work, settings, echo=lines.append, progress=False)
    return result, lines


def test_demo_writes_every_artifact_and_picture(demo):
    result, lines = demo
    p = result.paths
    for key in ("model", "onnx", "fp16_onnx", "check_report", "evaluate_report", "grid"):
        assert p[key].is_file(), key
    grid = Image.open(p["grid"])
    assert grid.mode == "RGB" and grid.width > 0 and grid.height > 0
    masks = sorted(p["predictions"].rglob("*.png"))
    overlays = sorted(p["predictions"].rglob("*.overlay.jpg"))
    assert masks and len(overlays) == len(masks)
    mask = Image.open(masks[0])
    assert mask.mode == "P" and np.asarray(mask).max() < 21
    check = json.loads(p["check_report"].read_text())
    assert {b["backend"] for b in check["backends"] if b.get("status") != "skipped"} >= {"ort", "ort-fp16"}
    evaluation = json.loads(p["evaluate_report"].read_text())
    assert 0.0 <= evaluation["miou"] <= 100.0 and evaluation["images"] >= 1
    # Each stage is announced, and the closing lines name the pictures.
    assert sum(line.startswith("[") for line in lines) == 7
    assert str(p["grid"]) in lines[-1]


def test_demo_builds_an_engine_when_tensorrt_rtx_is_installed(demo):
    result, _ = demo
    try:
        import tensorrt_rtx_bindings  # noqa: F401
    except ImportError:
        assert "engine" not in result.paths and any("TensorRT" in n for n in result.notes)
    else:
        from fcn_deploy.trt.sidecar import read_sidecar

        engine = result.paths["engine"]
        assert engine.is_file() and read_sidecar(engine)["precision"] == "fp16"


def test_demo_refuses_a_foreign_non_empty_folder(tmp_path):
    (tmp_path / "precious.txt").write_text("mine")
    res = CliRunner().invoke(cli, ["demo", "--workdir", str(tmp_path)])
    assert res.exit_code == 2
    assert res.output.strip().splitlines()[-1].startswith("error: --workdir")
    assert (tmp_path / "precious.txt").read_text() == "mine" and not (tmp_path / MARKER).exists()


def test_demo_stage_failure_names_the_stage(tmp_path, monkeypatch):
    from fcn_deploy import demo as demo_mod
    from fcn_deploy.errors import DatasetError

    def broken(*args, **kwargs):
        raise DatasetError("disk full")

    monkeypatch.setattr("fcn_deploy.voc.write_synthetic_voc", broken)
    with pytest.raises(demo_mod.FcnDeployError, match=r"demo stage 'data' failed: disk full"):
        run_demo(tmp_path / "w", DemoSettings(num_images=4, epochs=1), echo=lambda s: None)
