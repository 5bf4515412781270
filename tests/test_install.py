"""Install scheme (issue 10, structure 6): exactly one onnxruntime distribution per install."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].strip().lower()


def test_base_has_no_onnxruntime_and_each_extra_exactly_one():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not [r for r in project["dependencies"] if _name(r).startswith("onnxruntime")]
    extras = project["optional-dependencies"]
    assert [_name(r) for r in extras["cpu"] if _name(r).startswith("onnxruntime")] == ["onnxruntime"]
    assert [_name(r) for r in extras["gpu"] if _name(r).startswith("onnxruntime")] == ["onnxruntime-gpu"]
    for name, reqs in extras.items():  # no other extra pulls a second distribution in
        if name not in ("cpu", "gpu"):
            assert not [r for r in reqs if _name(r).startswith("onnxruntime")], name


def test_makefile_extras_pick_one_distribution():
    match = re.search(r"^EXTRAS\s*\?=\s*([^\s#]+)", (ROOT / "Makefile").read_text(), re.M)
    assert match, "Makefile sets no EXTRAS"
    extras = match.group(1).split(",")
    assert "cpu" in extras and "gpu" not in extras


def test_readme_setup_command_names_one_distribution():
    readme = (ROOT / "README.md").read_text()
    for command in re.findall(r"pip install -e '\.\[([^\]]+)\]'", readme):
        extras = command.split(",")
        assert not ("cpu" in extras and "gpu" in extras), command
    makefile = re.search(r"^EXTRAS\s*\?=\s*([^\s#]+)", (ROOT / "Makefile").read_text(), re.M).group(1)
    assert f"pip install -e '.[{makefile}]'" in readme  # the README names what `make` installs


def test_license_is_an_spdx_string_with_a_setuptools_that_reads_it():
    """issue 24: the license table made setuptools warn on every install (deprecated by PEP 639;
    the string form needs setuptools >= 77). Checked by hand: `pip wheel --no-deps .` prints no
    deprecation warning and the wheel's METADATA has ``License-Expression: Apache-2.0``."""
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert data["project"]["license"] == "Apache-2.0"
    (setuptools,) = [r for r in data["build-system"]["requires"] if _name(r) == "setuptools"]
    low = re.search(r">=\s*(\d+)", setuptools)
    assert low and int(low.group(1)) >= 77, setuptools


def test_ray_extra_has_the_client_for_ray_addresses():
    """issue 24: `--ray ray://HOST:PORT` is documented; Ray Client needs `ray[client]`."""
    (ray,) = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["ray"]
    extras = re.search(r"\[([^\]]+)\]", ray).group(1).replace(" ", "").split(",")
    assert {"data", "client"} <= set(extras), ray
