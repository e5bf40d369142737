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


def _cell(cell_id):
    from pathlib import Path

    nb = json.loads(
        (Path(__file__).parent.parent / "notebooks" / "06_gradient_inversion.ipynb").read_text()
    )
    (cell,) = [c for c in nb["cells"] if c.get("id") == cell_id]
    return "".join(cell["source"])


def _exec_membership_cell(tmp_path, monkeypatch, membership):
    from shelora_core.attacks import membership as mia

    def no_training(*a, **k):
        raise AssertionError("section 7 trained although membership='load'")

    monkeypatch.setattr(mia, "run_membership", no_training)
    monkeypatch.chdir(tmp_path)  # ../results/<profile>/membership.json does not exist from here
    ns = {"results": tmp_path, "figures": tmp_path, "profile": "paper", "membership": membership,
          "show": None, "write_json": None, "display": None}  # fmt: skip
    exec(_cell("d66f4b42"), ns)
    return ns


def test_notebook_06_skips_membership_inference_without_a_record_instead_of_training(
    tmp_path, monkeypatch, capsys
):
    ns = _exec_membership_cell(tmp_path, monkeypatch, "load")
    assert ns["mia_record"] is None
    out = capsys.readouterr().out
    assert "section 7 is skipped" in out and "--profile paper" in out


def test_notebook_06_names_a_bad_membership_parameter(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="membership='lod'.*'load'.*'run'"):
        _exec_membership_cell(tmp_path, monkeypatch, "lod")


def test_notebook_06_trade_off_without_any_trained_run_writes_an_empty_table(tmp_path, monkeypatch):
    from pathlib import Path

    import numpy as np
    import pandas as pd

    from shelora_core.notebook import write_json
    from shelora_core.provenance import run_meta

    monkeypatch.chdir(tmp_path)  # no ../results/<profile> from here
    ns = {"results": tmp_path, "figures": tmp_path, "profile": "paper", "entries": [], "np": np, "pd": pd,
          "Path": Path, "display": lambda *a: None, "show": None, "write_json": write_json,
          "run_meta": run_meta, "SEED": 0}  # fmt: skip
    exec(_cell("tradeoff-code"), ns)
    record = json.loads((tmp_path / "tradeoff.json").read_text())
    assert record["rows"] == [] and record["profile"] == "paper"
