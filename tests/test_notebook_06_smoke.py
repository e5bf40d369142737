"""Notebook 06's smoke test (the quick attack grid, batch 1) through reproduce.py.

A file of its own so that, under ``make test``'s per-file distribution, it runs beside the other
notebooks' smoke tests of test_reproduce.py on another worker.
"""

import json

import pytest
from test_reproduce import _run, _sets


@pytest.mark.smoke
def test_quick_profile_executes_notebook_06_and_records_the_attack_table(tmp_path):
    proc = _run(tmp_path, "06", *_sets("batch_sizes=(1,)", "opt_seconds=4"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    entries = json.loads((tmp_path / "quick" / "attack.json").read_text())
    measured = [e for e in entries if e["kind"] == "measured"]
    paper = [e for e in entries if e["kind"] == "paper"]
    assert {e["method"] for e in measured} == {
        "flexlora", "flexlora-dp", "maskcrypt", "shelora", "shelora+first-layers", "fedshield",
        "full_he", "shelora-dp",
    }  # fmt: skip
    keys = {"method", "attacker", "batch_size", "rank", "budget", "update", "rouge1", "rouge2",
            "token_precision", "token_recall", "n_batches"}  # fmt: skip
    assert all(keys <= set(e) and e["batch_size"] == 1 for e in measured)
    flex = [e for e in measured if e["method"] == "flexlora" and e["update"] == "round1"]
    assert flex[0]["rouge1"] >= 0.9
    assert all(e["rouge1"] == 0 for e in measured if e["method"] in ("fedshield", "full_he"))
    assert len(paper) == 12 and {e["source"] for e in paper} == {
        "SHE-LoRA paper (Liu et al., ICLR 2026), DAGER on SST-2"
    }
    meta = next(e for e in entries if e["kind"] == "meta")
    assert meta["versions"]["torch"].startswith("2.13.0")
    assert (tmp_path / "quick" / "attack_records.jsonl").exists()
    assert (tmp_path / "quick" / "figures" / "attack_overview.png").stat().st_size > 10_000
    # section 8: the committed notebook 05 record of the profile beside this grid
    trade = json.loads((tmp_path / "quick" / "tradeoff.json").read_text())
    variants = {r["variant"] for r in trade["rows"]}
    assert {"flexlora", "shelora-delta"} <= variants
    assert {m["method"] for m in trade["cheapest"]} >= {"flexlora", "shelora", "shelora-dp"}
    she = next(m for m in trade["cheapest"] if m["method"] == "shelora")
    assert she["cheapest"] is None  # the adaptive attacker reads SHE-LoRA's plaintext part
