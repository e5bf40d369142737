"""environment.yml mirrors pyproject.toml's pins, so conda users get the same versions; the lock
satisfies every requirement its packages declare (flwr's typer/rich/packaging caps included)."""

import importlib.metadata as md
import re
import tomllib
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent


def _pins():
    proj = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = proj["optional-dependencies"]
    return proj["dependencies"] + extras["dev"] + extras["deploy"]


def _lock():
    text = (ROOT / "requirements" / "constraints.txt").read_text()
    lines = [x.strip() for x in text.splitlines() if x.strip() and not x.startswith("#")]
    return {canonicalize_name(x.split("==")[0]): x.split("==")[1] for x in lines}


def test_environment_yml_mirrors_every_pyproject_pin():
    pins = _pins()
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


def test_make_setup_installs_flower_from_the_lock():
    make = (ROOT / "Makefile").read_text()
    assert "-c requirements/constraints.txt -e '.[dev,deploy]'" in make
    assert _lock()["flwr"] == "1.41.0"
    assert "flwr==1.41.0" in _pins()


@pytest.mark.parametrize("dist", ["flwr", "transformers", "huggingface-hub", "jupyterlab", "peft"])
def test_the_lock_satisfies_what_each_package_declares(dist):
    # the pin conflict resolved honestly: each locked version meets every requirement the
    # package declares for this platform (e.g. flwr's typer<0.21, rich<15, packaging<26 next
    # to transformers' typer and jupyterlab's packaging>=23.2)
    lock = _lock()
    assert canonicalize_name(dist) in lock
    env = {**default_environment(), "extra": ""}
    broken = []
    for line in md.requires(dist) or []:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        have = lock.get(canonicalize_name(req.name))
        if have is None:
            continue  # not locked: pip resolves it from the index (checked by `pip check`)
        if not req.specifier.contains(have, prereleases=True):
            broken.append(f"{dist} needs {req}, the lock has {have}")
    assert not broken, broken
