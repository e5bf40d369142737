"""Notebook 05's smoke test: its tiny grid executed once, its recorded metrics pinned.

A file of its own (the helpers and tolerances are test_notebook_metrics.py's) so that, under
``make test``'s per-file distribution, another worker runs notebooks 03 and 04 at the same time.
Refresh the pinned values as described in test_notebook_metrics.py.
"""

import json

import pytest
from test_notebook_metrics import check_recorded, run_tiny


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """Notebook 05 executed once by reproduce.py with the tiny settings."""
    return run_tiny(tmp_path_factory.mktemp("metrics05"), "05")


@pytest.mark.smoke
def test_recorded_metrics_match_the_pinned_values(executed):
    check_recorded(executed[0], "05_federated_tuning")


@pytest.mark.smoke
def test_reproduce_prints_one_line_per_notebook_and_per_federated_round(executed):
    lines = executed[1].splitlines()
    assert any(line.startswith("[1/1] 05_federated_tuning: started ") for line in lines)
    assert any(line.startswith("[1/1] 05_federated_tuning: done in ") for line in lines)
    rounds = [line for line in lines if line.startswith("    05 ") and ": round 1/1," in line]
    assert len(rounds) == 20  # one per run of the grid, each with its full label
    assert any(
        "run 16/20 shelora-delta-withhold r=8/16/32 minilm dirichlet(0.3)" in x for x in rounds
    )
    assert any("run 20/20 shelora-delta-secretA r=8/16/32" in x for x in rounds)
    assert not any("IProgress" in line or "WARNING" in line for line in lines)


@pytest.mark.smoke
def test_notebook_05_writes_its_records_and_figures(executed):
    results = executed[0].parent
    runs = json.loads((results / "federated_tuning.json").read_text())
    assert len(runs) == 20
    assert {r["method"] for r in runs} == {
        "fedavg", "flexlora", "shelora", "fedshield", "full_he", "maskcrypt", "flexlora-dp",
        "shelora-dp", "shelora+first-layers",
    }  # fmt: skip
    assert {"shelora-delta-withhold", "shelora-delta-secretA"} <= {r["variant"] for r in runs}
    for r in runs:
        assert r["rounds"] == 1 and r["final_accuracy"] is not None and "stopped" not in r
        assert r["meta"]["versions"]["torch"].startswith("2.13.0")
    assert (results / "figures" / "federated_tuning_accuracy.png").stat().st_size > 10_000
