"""README.md stays true: every ``fcn-deploy ...`` line in its shell blocks parses against the CLI
(command and options exist, values have the right types), and the TensorRT line fails cleanly
on a machine that cannot run an engine."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from click.testing import CliRunner

from fcn_deploy.cli import cli

README = Path(__file__).resolve().parents[1] / "README.md"


def _readme_commands() -> list[str]:
    blocks = re.findall(r"```sh\n(.*?)```", README.read_text(), flags=re.S)
    lines = [ln.split("#", 1)[0].strip() for block in blocks for ln in block.splitlines()]
    return [ln for ln in lines if ln.startswith("fcn-deploy ")]


def test_readme_lists_every_command():
    used = {shlex.split(line)[1] for line in _readme_commands()}
    assert used == set(cli.commands), f"README misses {set(cli.commands) - used} or names unknown {used - set(cli.commands)}"


@pytest.mark.parametrize("line", _readme_commands())
def test_readme_command_parses(line):
    name, *rest = shlex.split(line)[1:]
    cli.commands[name].make_context(name, rest)  # raises click.UsageError on an unknown option or bad value


def test_readme_trt_inference_fails_cleanly_without_an_engine(tmp_path):
    (tmp_path / "photos").mkdir()
    res = CliRunner().invoke(cli, ["infer", str(tmp_path / "photos"), "--backend", "trt", "--batch-size", "32"],
                             catch_exceptions=False)
    assert res.exit_code == 2
    last = res.output.strip().splitlines()[-1]
    assert last.startswith("error: ") and ("engine" in last or "TensorRT" in last)


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_python_api_runs_as_written(checkpoint_path, onnx_path, tmp_path, monkeypatch, capfd):
    """issue 24: the README's Python snippet did not run (``tiles`` undefined, export_onnx raising
    ArtifactExistsError after the README's own CLI steps, "device: ..." printed by library calls).
    Here its first block runs in a folder as the CLI steps leave it: model.pt, export/fcn.onnx (+ .json)."""
    import shutil

    import numpy as np
    from PIL import Image

    monkeypatch.chdir(tmp_path)
    shutil.copy(checkpoint_path, "model.pt")
    (tmp_path / "export").mkdir()
    for path in onnx_path.parent.glob("fcn.*"):
        shutil.copy(path, tmp_path / "export" / path.name)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 300, 3), np.uint8)).save("photo.jpg")
    cpu_block, trt_block = _python_blocks()
    namespace: dict = {}
    exec(compile(cpu_block, "README.md (Python API)", "exec"), namespace)  # noqa: S102 - the README's own code
    assert namespace["labels"].shape == (200, 300) and namespace["labels"].dtype == np.uint8
    assert namespace["logits"].shape == (2, 21, 320, 480) and namespace["parity"].passed
    out = capfd.readouterr()
    assert "device:" not in out.out + out.err  # library calls print no device line
    assert out.out.splitlines()[0] == "None"  # resolve("ort-fp16").stale of the fresh export
    compile(trt_block, "README.md (TensorRT)", "exec")  # needs TensorRT and a GPU to run: compiled only
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "model.pt", "photo.jpg"]  # no ./check
