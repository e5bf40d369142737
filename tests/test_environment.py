"""environment.yml mirrors pyproject.toml's pins, so conda users get the same versions."""

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_environment_yml_mirrors_every_pyproject_pin():
    proj = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = proj["dependencies"] + proj["optional-dependencies"]["dev"]
    env = (ROOT / "environment.yml").read_text()
    env_pins = set(re.findall(r"^\s+- ([A-Za-z0-9_.-]+==[^\s]+)$", env, flags=re.M))
    assert set(pins) == env_pins
    for pin in pins:
        assert "==" in pin, f"{pin} is not an exact pin"


def test_torch_is_pinned_to_the_cpu_wheel_on_disk():
    text = (ROOT / "pyproject.toml").read_text() + (ROOT / "Makefile").read_text()
    assert "torch==2.13.0" in text
    constraints = (ROOT / "requirements" / "constraints.txt").read_text()
    assert "\ntorch==2.13.0\n" in constraints
