"""An artifact's mean / std metadata is checked where it is read (issue 24: std [0, 0, 0] made
every pixel 255 silently; mean "abc" failed with "could not convert string to float: 'a'")."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from PIL import Image

from fcn_deploy.artifacts import embed_meta, meta_from_model, read_artifact_meta
from fcn_deploy.cli import cli
from fcn_deploy.errors import ArtifactMetadataError

BAD = [("std", [0, 0, 0]), ("std", [0.2, -0.1, 0.2]), ("std", [0.2, math.inf, 0.2]), ("std", [0.2, 0.2]),
       ("mean", "abc"), ("mean", [0.4, "x", 0.4]), ("mean", [0.4, math.nan, 0.4]), ("std", [True, 1, 1]),
       ("mean", None)]


@pytest.mark.parametrize("key, value", BAD)
def test_bad_normalization_metadata_names_file_and_key(tmp_path, key, value):
    model = onnx.helper.make_model(onnx.helper.make_graph([], "g", [], []))
    embed_meta(model, {"tile_hw": [32, 32], "mean": [0.4, 0.4, 0.4], "std": [0.2, 0.2, 0.2], key: value})
    with pytest.raises(ArtifactMetadataError, match=rf"^art\.onnx: metadata '{key}' must be 3 finite numbers"):
        meta_from_model(model, "art.onnx")
    side = tmp_path / "art.json"
    side.write_text(json.dumps({"tile_hw": [32, 32], key: value}))
    with pytest.raises(ArtifactMetadataError, match=rf"art\.json: metadata '{key}'"):
        read_artifact_meta(side)


def test_infer_with_zero_std_onnx_is_one_line_naming_file_and_key(onnx_path, tmp_path):
    model = onnx.load(onnx_path)
    meta = meta_from_model(model)
    embed_meta(model, {**meta, "std": [0, 0, 0]})
    bad = tmp_path / "zero_std.onnx"
    onnx.save(model, bad)
    Image.fromarray(np.zeros((40, 60, 3), np.uint8)).save(tmp_path / "x.png")
    result = CliRunner().invoke(cli, ["infer", str(tmp_path / "x.png"), "-o", str(tmp_path / "out"),
                                      "--model", str(bad), "--device", "cpu"])
    assert result.exit_code == 2, result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith(f"error: {bad}: metadata 'std' must be 3 finite numbers > 0, got [0, 0, 0]"), last
    assert "Traceback" not in result.output and not (tmp_path / "out" / "x.png").exists()


def test_good_metadata_passes(onnx_path):
    assert read_artifact_meta(onnx_path)["std"] == pytest.approx([0.229, 0.224, 0.225])
