"""No two outputs of one command are the same file, and no output replaces an input (issue 24,
"smaller ones"): symlinks resolved, hard links by inode, refused before any work."""

from __future__ import annotations

import os

import pytest
from click.testing import CliRunner

from fcn_deploy.cli import cli
from fcn_deploy.errors import UsageError
from fcn_deploy.outpaths import check_distinct_paths, same_file


def _refused(args, *words):
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in result.output, result.output
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def test_same_file_resolves_symlinks_and_hard_links(tmp_path):
    a = tmp_path / "a.json"
    a.write_text("{}")
    (tmp_path / "sym").symlink_to(a)
    os.link(a, tmp_path / "hard")
    (tmp_path / "dangling").symlink_to(tmp_path / "not-yet.png")
    assert same_file(a, tmp_path / "sym") and same_file(a, tmp_path / "hard")
    assert same_file(tmp_path / "sub" / ".." / "a.json", a)
    assert same_file(tmp_path / "dangling", tmp_path / "not-yet.png")
    assert not same_file(a, tmp_path / "b.json")
    check_distinct_paths({"--report": a, "--grid": tmp_path / "g.png", "--x": None}, {"--model": None})
    with pytest.raises(UsageError, match="--report .* and --grid .* are the same file"):
        check_distinct_paths({"--report": a, "--grid": tmp_path / "hard"})


@pytest.mark.parametrize("grid", ["r.json", "link.json"])
def test_evaluate_report_and_grid_on_one_path_is_refused_up_front(tmp_path, voc_root, grid):
    (tmp_path / "link.json").symlink_to(tmp_path / "r.json")
    _refused(["evaluate", "--voc-root", str(voc_root), "--report", str(tmp_path / "r.json"),
              "--grid", str(tmp_path / grid), "--force"], "--report", "--grid", "same file")
    assert not (tmp_path / "r.json").exists()


def test_check_report_into_the_model_or_its_map_folder_is_refused(tmp_path, checkpoint_path):
    before = checkpoint_path.read_bytes()
    _refused(["check", "--model", str(checkpoint_path), "--report", str(checkpoint_path), "--force"],
             "--report", "--model", "never replaces an input")
    assert checkpoint_path.read_bytes() == before
    _refused(["check", "--model", str(checkpoint_path), "--report", str(tmp_path / "x"),
              "--disagreement-dir", str(tmp_path / "x")], "--report", "--disagreement-dir")


@pytest.mark.parametrize("how", ["same", "symlink", "hardlink", "sidecar"])
def test_build_engine_never_replaces_its_input_onnx(tmp_path, how):
    onnx = tmp_path / "fcn.onnx"
    onnx.write_bytes(b"not really an onnx, never read")
    (tmp_path / "fcn.json").write_text("{}")
    out = {"same": onnx, "symlink": tmp_path / "link.engine", "hardlink": tmp_path / "hard.engine",
           "sidecar": tmp_path / "fcn"}[how]  # the engine fcn's sidecar is fcn.json, the ONNX's
    if how == "symlink":
        out.symlink_to(onnx)
    elif how == "hardlink":
        os.link(onnx, out)
    _refused(["build-engine", str(onnx), "-o", str(out), "--force"], "-o" if how != "sidecar" else "sidecar",
             "never replaces an input")
    assert onnx.read_bytes() == b"not really an onnx, never read"
    assert (tmp_path / "fcn.json").read_text() == "{}"


def test_bench_report_onto_its_model_is_refused(tmp_path, checkpoint_path):
    model = tmp_path / "m.pt"
    model.write_bytes(checkpoint_path.read_bytes())
    _refused(["bench", "--backend", "torch", "--model", str(model), "--report", str(model), "--force"],
             "--report", "--model")
    assert model.read_bytes() == checkpoint_path.read_bytes()


def test_train_output_onto_the_backbone_weights_is_refused(tmp_path, voc_root):
    weights = tmp_path / "resnet18.pth"
    weights.write_bytes(b"weights")
    _refused(["train", "--voc-root", str(voc_root), "-o", str(weights), "--backbone-weights", str(weights),
              "--force"], "-o", "--backbone-weights")
    assert weights.read_bytes() == b"weights"
