"""reproduce.py runs the notebooks headlessly (papermill) and records results."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TINY = [
    "rounds=1",
    "local_steps=1",
    "num_clients=2",
    "train_examples=120",
    "eval_examples=32",
    "min_client_examples=10",
    "max_length=32",
]
#: what each notebook records (its JSON) when run with the quick profile
RECORDS = {
    "03_encryption": "encryption.json",
    "04_aggregation": "aggregation.json",
    "05_federated_tuning": "federated_tuning.json",
}


def _run(tmp_path, only, *extra):
    cmd = [
        sys.executable,
        str(ROOT / "reproduce.py"),
        "--profile",
        "quick",
        "--only",
        only,
        "--results-dir",
        str(tmp_path),
        *extra,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=1200)


@pytest.mark.smoke
def test_quick_profile_executes_notebook_05_and_writes_the_json(tmp_path):
    args = [a for s in TINY for a in ("--set", s)]
    proc = _run(tmp_path, "05", *args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    runs = json.loads((tmp_path / "quick" / "federated_tuning.json").read_text())
    assert len(runs) == 12
    assert {r["method"] for r in runs} == {"fedavg", "flexlora", "shelora", "fedshield", "full_he"}
    for r in runs:
        assert {"method", "ranks", "partition", "final_accuracy", "rounds"} <= set(r)
        assert r["rounds"] == 1 and 0 <= r["final_accuracy"] <= 1
        assert r["meta"]["versions"]["torch"].startswith("2.13.0")
    assert (
        tmp_path / "quick" / "figures" / "federated_tuning_accuracy.png"
    ).stat().st_size > 10_000
    assert (tmp_path / "quick" / "notebooks" / "05_federated_tuning.ipynb").exists()


@pytest.mark.smoke
@pytest.mark.parametrize("name", ["03_encryption", "04_aggregation"])
def test_quick_profile_executes_notebook_and_records(tmp_path, name):
    if not (ROOT / "notebooks" / f"{name}.ipynb").exists():
        pytest.fail(f"notebook {name} is missing")
    proc = _run(tmp_path, name[:2])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    record = json.loads((tmp_path / "quick" / RECORDS[name]).read_text())
    assert record["meta"]["versions"]["tenseal"] == "0.3.18"


@pytest.mark.smoke
def test_a_failing_notebook_exits_nonzero_naming_notebook_and_cell(tmp_path):
    proc = _run(tmp_path, "05", "--set", "dirichlet_alpha=-1")
    assert proc.returncode != 0
    assert "05_federated_tuning.ipynb" in proc.stderr and "cell" in proc.stderr
    assert "dirichlet_alpha" in proc.stderr


def test_unknown_notebook_filter_exits_2(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "reproduce.py"),
            "--only",
            "99_nothing",
            "--results-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "no notebook matches" in proc.stderr
