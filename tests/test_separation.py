"""shelora_core.separation: the FedAvg-vs-FlexLoRA sweep's configurations, record and README lines."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

import reproduce
from shelora_core import federation, separation


def test_every_setting_pairs_fedavg_and_flexlora_on_the_same_data():
    pairs = separation.separation_configs()
    assert len(pairs) == 2 * len(separation.SETTINGS)
    for (name_a, a), (name_b, b) in zip(pairs[::2], pairs[1::2], strict=True):
        assert name_a == name_b
        assert (a.method, b.method) == separation.METHODS
        assert a.replace(method=b.method) == b  # nothing else differs
        assert a.ranks == (8, 16, 32) and a.partition == "dirichlet" and a.model == "minilm"
    names = [n for n, _ in separation.SETTINGS]
    assert len(set(names)) == len(names)


def test_a_bad_override_fails_before_anything_trains():
    with pytest.raises(ValueError, match="head_lr_scale"):
        separation.separation_configs(settings=[("bad", {"head_lr_scale": -1.0})])


class _FakeFederation:
    """Final accuracy by method (no training): FlexLoRA ahead by 6 points in 'wide'."""

    finals = {("same", "fedavg"): 0.70, ("same", "flexlora"): 0.70,
              ("wide", "fedavg"): 0.60, ("wide", "flexlora"): 0.66}  # fmt: skip

    def __init__(self, cfg, *, results_dir, progress=None):
        self.cfg = cfg

    def run(self, *, reuse_complete=False):
        name = "wide" if self.cfg.rounds == 2 else "same"
        acc = self.finals[(name, self.cfg.method)]
        history = [{"round": 1, "accuracy": 0.5}] + (
            [{"round": 2, "accuracy": acc}] if self.cfg.rounds == 2 else []
        )
        if self.cfg.rounds == 1:
            history[-1]["accuracy"] = acc
        return SimpleNamespace(history=history, final_accuracy=acc, meta={"git_commit": "feedbeef"})


def test_the_record_and_the_readme_lines(tmp_path, monkeypatch):
    monkeypatch.setattr(federation, "Federation", _FakeFederation)
    settings = [("same", {"rounds": 1}), ("wide", {"rounds": 2})]
    rec = separation.run_separation(tmp_path, settings=settings)
    assert [r["setting"] for r in rec["rows"]] == ["same", "wide"]
    assert [r["gap_pp"] for r in rec["rows"]] == pytest.approx([0.0, 6.0])
    assert rec["largest_gap_pp"] == pytest.approx(6.0) and rec["visible_in"] == ["wide"]
    assert rec["rows"][1]["overrides"] == {"rounds": 2}
    assert [list(p) for p in rec["rows"][1]["flexlora"]["curve"]] == [[1, 0.5], [2, 0.66]]
    on_disk = json.loads((tmp_path / "separation.json").read_text())
    assert on_disk["rows"][1]["gap_pp"] == pytest.approx(6.0)
    lines = "\n".join(reproduce.separation_block(tmp_path))
    assert "FlexLoRA is visibly ahead (at least 5 points) in 1 of 2 settings" in lines
    assert "| wide | 0.600 | 0.660 | +6.0 |" in lines
    # no visible gap: the block says so, with the largest one
    monkeypatch.setattr(
        _FakeFederation, "finals", {**_FakeFederation.finals, ("wide", "flexlora"): 0.62}
    )
    separation.run_separation(tmp_path, settings=settings)
    lines = "\n".join(reproduce.separation_block(tmp_path))
    assert "no setting separates them by 5 points or more (largest final gap +2.0 points)" in lines
    assert reproduce.separation_block(tmp_path / "absent") == []


def _paper_runs(tmp_path, curves, commits):
    """Write notebook 05's per-round JSONL and summaries of the paper pair under tmp_path."""
    from shelora_core.profiles import federated_tuning_grid

    runs = tmp_path / "federated_tuning"
    runs.mkdir(parents=True)
    for cfg in federated_tuning_grid("paper"):
        if (cfg.variant in curves and cfg.model == "minilm" and cfg.partition == "dirichlet"
                and tuple(cfg.ranks) == (8, 16, 32)):  # fmt: skip
            rows = [{"round": r, "accuracy": a} for r, a in curves[cfg.variant]]
            (runs / f"{cfg.run_name}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows))
            meta = {"meta": {"git_commit": commits[cfg.variant]}}
            (runs / f"{cfg.run_name}.summary.json").write_text(json.dumps(meta))


def test_paper_gap_reports_every_evaluation_not_only_the_last(tmp_path):
    curves = {
        "fedavg": [(1, None), (2, 0.70), (3, None), (4, 0.50), (6, 0.60)],
        "flexlora": [(1, None), (2, 0.68), (3, None), (4, 0.60), (6, 0.75)],
    }
    _paper_runs(tmp_path, curves, {"fedavg": "a" * 40 + "-dirty", "flexlora": "b" * 40})
    g = separation.paper_gap(tmp_path)
    assert g["evaluations"] == [2, 4, 6]
    assert g["gaps_pp"] == pytest.approx([-2.0, 10.0, 15.0])
    assert g["final_gap_pp"] == pytest.approx(15.0)
    assert g["mean_gap_pp"] == pytest.approx(23.0 / 3)
    assert g["flexlora_ahead"] == 2
    assert g["largest_swing_pp"] == pytest.approx(20.0)  # FedAvg 0.70 -> 0.50
    (text,) = [x for x in reproduce.paper_gap_lines(tmp_path) if x]
    assert "+15.0 points at round 6" in text and "+7.7 on average over the 3 evaluations" in text
    assert "fedavg aaaaaaaaaaaa-dirty / flexlora bbbbbbbbbbbb" in text  # uncommitted code shows


def test_paper_gap_is_none_without_both_runs(tmp_path):
    assert separation.paper_gap(tmp_path) is None
    _paper_runs(tmp_path, {"fedavg": [(2, 0.7)]}, {"fedavg": "a" * 40})
    assert separation.paper_gap(tmp_path) is None
    assert reproduce.paper_gap_lines(tmp_path) == []
    _paper_runs(
        tmp_path / "x",
        {"fedavg": [(2, 0.7)], "flexlora": [(2, 0.8)]},
        dict.fromkeys(("fedavg", "flexlora"), "c"),
    )
    next(
        (tmp_path / "x" / "federated_tuning").glob("flexlora*.summary.json")
    ).unlink()  # still running
    assert separation.paper_gap(tmp_path / "x") is None


def test_short_commit_keeps_the_dirty_suffix():
    from shelora_core.provenance import short_commit

    assert short_commit("0123456789abcdef" * 2 + "01234567-dirty") == "0123456789ab-dirty"
    assert short_commit("0123456789abcdef" * 2 + "01234567") == "0123456789ab"
    assert short_commit(None) == "not recorded"
