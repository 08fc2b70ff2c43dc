"""The distribution installs what its layout promises."""

import importlib
import subprocess
import sys
import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest

import fedseg

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["models", "transforms", "app_site", "app_server", "jobs"])
def test_generic_top_level_names_resolve_to_this_project(name):
    module = importlib.import_module(name)
    assert Path(module.__file__).resolve().parent == ROOT / name


def test_dependencies_are_pinned_and_installed_at_their_pins():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + project["optional-dependencies"]["dev"]
    for requirement in requirements:
        name, _, pinned = requirement.partition("==")
        assert pinned, f"{requirement} is not pinned"
        assert version(name) == pinned or version(name).startswith(f"{pinned}+"), name


def test_console_script_runs():
    result = subprocess.run(
        [Path(sys.executable).with_name("fedseg"), "--version"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.strip() == f"fedseg {fedseg.__version__}"
    assert fedseg.__version__ == version("fedseg")
