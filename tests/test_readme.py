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
