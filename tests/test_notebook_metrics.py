"""Smoke tests that pin what the notebooks record, and that interactive runs leave results alone.

Notebooks 03, 04 and 05 record their key metrics in their own outputs
(:func:`shelora_core.notebook.store_metadata`, the "store metadata / read notebook" pattern of
Microsoft Recommenders and scrapbook); these tests execute them headlessly with tiny settings
through ``reproduce.py``, read the metrics back from the executed copies
(:func:`shelora_core.notebook.read_notebook`) and compare them with the values recorded in
``tests/notebook_metrics_expected.json`` within the tolerances of :data:`TOLERANCES`: a change of
any pinned number beyond its tolerance fails.

The expected values come from a run of the same tiny settings (:data:`TINY`). When a change of
the code is *meant* to change them (a new quick profile, another aggregation), refresh them with

    SHELORA_UPDATE_EXPECTED=1 .venv/bin/python -m pytest -q tests/test_notebook_metrics.py \
        tests/test_notebook_metrics_05.py

which rewrites the JSON from this run (those tests are then skipped; run it in one process, without
``-n``: both files rewrite the same JSON); review the diff and commit it.
"""

import hashlib
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shelora_core.notebook import read_notebook

ROOT = Path(__file__).resolve().parent.parent
EXPECTED = Path(__file__).with_name("notebook_metrics_expected.json")
#: the tiny federations of the smoke tests (2 clients, 1 round of 1 local step, 32 test examples)
TINY = [
    "rounds=1",
    "local_steps=1",
    "num_clients=2",
    "train_examples=120",
    "eval_examples=32",
    "min_client_examples=10",
    "max_length=32",
]
EVAL_EXAMPLES = 32
#: metric -> (kind, amount): "exact"; "abs" / "rel" difference; "log10" = orders of magnitude
#: (CKKS noise and compressed ciphertext sizes differ from run to run, the rest is seeded)
TOLERANCES = {
    "03_encryption": {
        "ciphertexts_per_client": ("exact", 0),
        "packing_ciphertexts": ("exact", 0),
        "ckks_bytes_per_client": ("rel", 0.01),
        "ciphertext_bytes": ("rel", 0.01),
        "ckks_max_abs_error": ("log10", 1.0),
        "precision_max_rel_error": ("log10", 1.0),
        # seeded ciphertexts at N = 8192 compress to sizes up to ~3% apart between encryptions
        "seeded_bytes_per_value": ("rel", 0.05),
        "seeded_upload_bytes": ("rel", 0.05),
        "seeded_ciphertexts": ("exact", 0),
        "seeded_decrypt_max_abs_error": ("log10", 1.0),
    },
    "04_aggregation": {
        "upload_bytes": ("exact", 0),
        "ciphertexts_up": ("exact", 0),
        "fedavg_product_bias_rel_fro": ("rel", 1e-6),
        "fedavg_dw_vs_flexlora_rel_fro": ("rel", 1e-6),
        "authors_weighting_rel_error": ("rel", 1e-4),  # plus CKKS noise of ~1e-7
        "exactness_max_rel_error": ("log10", 1.5),
        "packed_layout": ("exact", 0),  # layout counts, key counts (computed from public facts)
        "packed_ciphertexts_up": ("exact", 0),
        "packed_upload_bytes": ("rel", 0.05),  # plaintext exact; seeded ciphertexts vary up to ~3%
        "packed_broadcast_bytes": ("rel", 0.01),
        "packed_public_context_bytes": ("rel", 0.01),
        # read from the committed he_cost.json (the smoke run's results folder has none)
        "he_cost_upload_vs_flexlora_x": ("rel", 0.01),
    },
    "05_federated_tuning": {
        # the same number of correct test examples out of 32
        "final_accuracy": ("abs", 0.5 / EVAL_EXAMPLES),
        "exported_accuracy": ("abs", 0.5 / EVAL_EXAMPLES),
        "final_macro_f1": ("abs", 1e-6),
        "last_train_loss": ("rel", 1e-3),
        "upload_bytes_per_client": ("rel", 0.01),  # ciphertexts compress differently each run
    },
}


def _close(got, want, tol, where):
    kind, amount = tol
    if isinstance(want, dict):
        assert isinstance(got, dict) and sorted(got) == sorted(want), where
        for k in want:
            _close(got[k], want[k], tol, f"{where}[{k!r}]")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            _close(g, w, tol, f"{where}[{i}]")
    elif isinstance(want, bool) or want is None or isinstance(want, str) or kind == "exact":
        assert got == want, f"{where}: recorded {got!r}, expected {want!r}"
    elif kind == "abs":
        assert abs(got - want) <= amount, (
            f"{where}: recorded {got!r}, expected {want!r} +- {amount}"
        )
    elif kind == "rel":
        assert abs(got - want) <= amount * abs(want), (
            f"{where}: recorded {got!r}, expected {want!r} within {amount:.0e} (relative)"
        )
    elif kind == "log10":
        assert got > 0 and abs(math.log10(got) - math.log10(want)) <= amount, (
            f"{where}: recorded {got!r}, expected {want!r} within {amount} orders of magnitude"
        )
    else:  # pragma: no cover - a typo in TOLERANCES
        raise AssertionError(f"unknown tolerance {kind!r}")


def run_tiny(out: Path, *only: str) -> tuple[Path, str]:
    """Execute the notebooks ``only`` by reproduce.py with the tiny settings into ``out``; return
    the executed copies' folder and reproduce.py's output."""
    sets = [a for s in TINY for a in ("--set", s)]
    cmd = [
        sys.executable,
        str(ROOT / "reproduce.py"),
        "--profile",
        "quick",
        "--results-dir",
        str(out),
    ]
    cmd += [a for nb in only for a in ("--only", nb)] + sets
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out / "quick" / "notebooks", proc.stdout


def check_recorded(notebooks: Path, name: str) -> None:
    """The metrics notebook ``name`` recorded against the pinned values (or rewrite them)."""
    recorded = read_notebook(notebooks / f"{name}.ipynb")
    assert sorted(recorded) == sorted(TOLERANCES[name]), "a notebook records other metrics"
    if os.environ.get("SHELORA_UPDATE_EXPECTED") == "1":
        expected = json.loads(EXPECTED.read_text()) if EXPECTED.exists() else {}
        expected[name] = recorded
        EXPECTED.write_text(json.dumps(expected, indent=1, sort_keys=True) + "\n")
        pytest.skip(f"rewrote the expected metrics of {name} in {EXPECTED.name}")
    expected = json.loads(EXPECTED.read_text())[name]
    for metric, tol in TOLERANCES[name].items():
        _close(recorded[metric], expected[metric], tol, f"{name}: {metric}")


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """Notebooks 03 and 04 executed once by reproduce.py with the tiny settings (05 runs in
    test_notebook_metrics_05.py, a file of its own so that another test worker takes it)."""
    return run_tiny(tmp_path_factory.mktemp("metrics"), "03", "04")


@pytest.mark.smoke
@pytest.mark.parametrize("name", ["03_encryption", "04_aggregation"])
def test_recorded_metrics_match_the_pinned_values(executed, name):
    check_recorded(executed[0], name)


@pytest.mark.smoke
def test_notebooks_03_and_04_write_their_records(executed):
    lines = executed[1].splitlines()
    for i, name in enumerate(["03_encryption", "04_aggregation"], 1):
        assert any(line.startswith(f"[{i}/2] {name}: started ") for line in lines)
        assert any(line.startswith(f"[{i}/2] {name}: done in ") for line in lines)
    results = executed[0].parent
    for name in ("encryption.json", "aggregation.json"):
        assert json.loads((results / name).read_text())["meta"]["versions"]["tenseal"] == "0.3.18"


def _tree_state(root: Path) -> dict[str, tuple[str, int]]:
    """sha256 and mtime of every file under ``root`` except the scratch folder."""
    return {
        str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file() and "scratch" not in p.relative_to(root).parts
    }


@pytest.mark.smoke
def test_a_notebook_run_without_reproduce_parameters_leaves_committed_results_untouched(tmp_path):
    """What "Run All" in JupyterLab does: the notebook's own defaults, its folder as the working
    directory. It must write to results/scratch/quick/, never to the committed results/."""
    import papermill as pm

    from reproduce import kernel_name

    results = ROOT / "results"
    before = _tree_state(results)
    assert any(k.startswith("quick/") for k in before)  # the committed quick results exist
    t0 = time.time()
    pm.execute_notebook(
        str(ROOT / "notebooks" / "03_encryption.ipynb"),
        str(tmp_path / "03_encryption.ipynb"),
        parameters={},  # nothing: not even results_dir
        kernel_name=kernel_name(),
        cwd=str(ROOT / "notebooks"),
        progress_bar=False,
    )
    assert _tree_state(results) == before
    scratch = results / "scratch" / "quick" / "encryption.json"
    assert scratch.stat().st_mtime >= t0 - 1
    assert json.loads(scratch.read_text())["profile"] == "quick"
