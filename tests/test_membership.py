"""shelora_core.attacks.membership: ROC metrics, who is a member, and the attacks on toy models."""

import numpy as np
import pytest
import torch

from shelora_core import FederatedConfig
from shelora_core.attacks import membership as mia
from shelora_core.client import local_train
from shelora_core.data import ClientData


# ---------------------------------------------------------------------------- ROC metrics
def test_perfect_separation_gives_auc_1_and_full_tpr_at_low_fpr():
    members = np.linspace(1.0, 2.0, 100)
    nonmembers = np.linspace(-2.0, -1.0, 200)
    m = mia.attack_metrics(members, nonmembers, bootstrap=50)
    assert m["auc"] == 1.0
    assert m["tpr_at_fpr"]["0.01"] == 1.0
    assert m["tpr_at_fpr"]["0.001"] is None  # 200 non-members: 0.1% FPR is not measurable
    assert m["balanced_accuracy"] == 1.0
    assert m["auc_ci95"] == [1.0, 1.0]
    assert (m["n_members"], m["n_nonmembers"]) == (100, 200)


def test_reversed_scores_give_auc_0():
    assert mia.roc_auc([-1.0, -2.0], [1.0, 2.0, 3.0]) == 0.0


def test_identical_distributions_give_auc_near_one_half():
    rng = np.random.default_rng(0)
    m = mia.attack_metrics(rng.normal(size=4000), rng.normal(size=4000), bootstrap=200)
    assert abs(m["auc"] - 0.5) < 0.03
    lo, hi = m["auc_ci95"]
    assert lo < 0.5 < hi
    assert m["tpr_at_fpr"]["0.01"] < 0.05
    assert m["tpr_at_fpr"]["0.001"] is not None  # 4000 non-members


def test_hand_computed_auc_with_a_tie():
    # pairs (member, non-member): 3>2, 3>0, 1<2, 1>0, 2=2 (one half), 2>0 -> 4.5 / 6
    assert mia.roc_auc([3.0, 1.0, 2.0], [2.0, 0.0]) == pytest.approx(0.75)
    fpr, tpr = mia.roc_curve([3.0, 1.0, 2.0], [2.0, 0.0])
    # thresholds 3, 2 (one member and one non-member together), 1, 0
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 0.5, 1.0])
    np.testing.assert_allclose(tpr, [0, 1 / 3, 2 / 3, 1.0, 1.0])
    assert np.trapezoid(tpr, fpr) == pytest.approx(0.75)


def test_all_scores_tied_is_one_diagonal_step():
    fpr, tpr = mia.roc_curve([1.0] * 5, [1.0] * 7)
    np.testing.assert_allclose(fpr, [0, 1])
    np.testing.assert_allclose(tpr, [0, 1])
    assert mia.roc_auc([1.0] * 5, [1.0] * 7) == 0.5
    assert mia.tpr_at_fpr(fpr, tpr, 0.01) == 0.0


def test_auc_matches_the_roc_area_and_sklearn_on_ties():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(1)
    pos = rng.integers(0, 6, 300).astype(float)  # heavy ties
    neg = rng.integers(0, 5, 250).astype(float)
    fpr, tpr = mia.roc_curve(pos, neg)
    auc = mia.roc_auc(pos, neg)
    assert auc == pytest.approx(np.trapezoid(tpr, fpr))
    y = np.r_[np.ones(pos.size), np.zeros(neg.size)]
    assert auc == pytest.approx(roc_auc_score(y, np.r_[pos, neg]))


def test_tpr_at_fpr_reads_the_step_roc_without_interpolation():
    # one non-member (of 4) scores above two members: FPR 0.25 at TPR 0.5, then 0.25 at 1.0
    fpr, tpr = mia.roc_curve([10.0, 9.0, 8.0, 7.0], [9.5, 0.0, 0.1, 0.2])
    assert mia.tpr_at_fpr(fpr, tpr, 0.0) == 0.25  # only the 10.0 member above every non-member
    assert mia.tpr_at_fpr(fpr, tpr, 0.2) == 0.25
    assert mia.tpr_at_fpr(fpr, tpr, 0.25) == 1.0
    with pytest.raises(ValueError, match="max_fpr"):
        mia.tpr_at_fpr(fpr, tpr, 1.5)


def test_bad_scores_are_refused_by_name():
    with pytest.raises(ValueError, match="at least one member"):
        mia.roc_auc([], [1.0])
    with pytest.raises(ValueError, match="finite"):
        mia.attack_metrics([np.nan, 1.0], [0.0])


# ---------------------------------------------------------------------------- the attacks on a toy
class _Memoriser:
    """A lookup-table classifier: confident on the label of any training example it is shown (a
    Gaussian kernel around each one), near-uniform elsewhere. All it knows is its training set;
    it duck-types what :func:`example_losses` uses of a LoraModel."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor, *, width: float = 4.0):
        self.keys, self.onehot, self.width = features, torch.eye(2)[labels], width
        self.model = torch.nn.Identity()
        self.loaded = None

    def load(self, weights):
        self.loaded = weights

    def logits(self, input_ids, attention_mask):
        d2 = torch.cdist(input_ids.float(), self.keys) ** 2
        return 8.0 * torch.exp(-d2 / self.width) @ self.onehot


def _toy(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = torch.randint(0, 2, (n,), generator=g)
    return ClientData(x, torch.ones(n, d, dtype=torch.long), y)


def test_loss_attack_on_a_model_that_memorised_its_members():
    members, nonmembers = _toy(60, 100, seed=1), _toy(60, 100, seed=2)
    toy = _Memoriser(members.input_ids, members.labels)
    loss_m = mia.example_losses(toy, "w", members, batch_size=16)
    loss_n = mia.example_losses(toy, "w", nonmembers, batch_size=16)
    assert toy.loaded == "w" and loss_m.shape == (60,) and loss_n.shape == (60,)
    m = mia.attack_metrics(-loss_m, -loss_n, bootstrap=100)
    assert m["auc"] > 0.9
    assert m["auc_ci95"][0] > 0.8
    # a reference model trained on other data calibrates, it does not destroy the signal
    other = _toy(60, 100, seed=3)
    ref = _Memoriser(other.input_ids, other.labels)
    ref_m = mia.example_losses(ref, "r", members, batch_size=16)
    ref_n = mia.example_losses(ref, "r", nonmembers, batch_size=16)
    assert mia.attack_metrics(ref_m - loss_m, ref_n - loss_n, bootstrap=0)["auc"] > 0.9


# ---------------------------------------------------------------------------- who is a member
def test_drawn_positions_replay_what_local_train_draws(minilm_model, monkeypatch):
    n, steps, batch, seed = 11, 5, 4, 1234  # 11 = 2 full batches + a reshuffle, twice
    data = ClientData(
        torch.full((n, 6), 101, dtype=torch.long),
        torch.ones(n, 6, dtype=torch.long),
        torch.arange(n) % 2,
    )
    seen: list[np.ndarray] = []
    real = ClientData.batch

    def spy(self, idx):
        seen.append(np.asarray(idx))
        return real(self, idx)

    monkeypatch.setattr(ClientData, "batch", spy)
    minilm_model.load(minilm_model.init_weights(2, seed=0))
    local_train(
        minilm_model, data, steps=steps, batch_size=batch, lr=1e-3, weight_decay=0.0, seed=seed
    )
    replay = mia.drawn_positions(n, steps=steps, batch_size=batch, seed=seed)
    np.testing.assert_array_equal(replay, np.unique(np.concatenate(seen)))
    assert len(replay) < n or steps * batch >= n


@pytest.fixture(scope="module")
def split_config():
    return FederatedConfig(
        method="flexlora",
        num_clients=3,
        ranks=(2,),
        rounds=2,
        local_steps=3,
        batch_size=8,
        train_examples=120,
        eval_examples=32,
        min_client_examples=10,
        seed=3,
    )


def test_members_nonmembers_and_reference_pools_are_disjoint(split_config):
    from shelora_core.federation import split_data

    split = mia.membership_split(split_config, n_reference=2)
    train, test, parts = split_data(split_config)
    members = set(split.members.texts)
    nonmembers = set(split.nonmembers.texts)
    assert members <= set(train.texts)
    assert not members & nonmembers
    assert not nonmembers & set(train.texts) and not nonmembers & set(test.texts)
    refs = [set(r.texts) for r in split.references]
    assert [len(r) for r in refs] == [len(train)] * 2
    assert not refs[0] & refs[1]
    for r in refs:
        assert not r & members and not r & nonmembers and not r & set(train.texts)
    # equal numbers, the members' label counts, and every member really was drawn by a step
    assert len(split.nonmembers) == len(split.members)
    np.testing.assert_array_equal(split.nonmembers.label_counts(), split.members.label_counts())
    drawn = mia.trained_examples(split_config, parts)
    assert len(members) == len(drawn) and members == {train.texts[i] for i in drawn}
    # 3 steps x 8 examples x 2 rounds cannot draw all of a client's ~40 examples
    assert split.unused_client_examples == len(train) - len(drawn) > 0
    assert split.nonmember_source == "train split, not selected"


def test_a_refused_upload_does_not_make_members(split_config):
    from shelora_core.federation import split_data

    _, _, parts = split_data(split_config)
    every = mia.trained_examples(split_config, parts)
    history = [{"round": r, "rejected": [{"client_id": 0}]} for r in (1, 2)]
    without0 = mia.trained_examples(split_config, parts, history=history)
    assert set(without0) < set(every)
    assert not set(without0) & set(parts[0])


def test_too_small_a_population_is_refused_with_the_fix(split_config):
    with pytest.raises(ValueError, match="train_examples lower"):
        mia.membership_split(split_config, n_reference=1000)


# ---------------------------------------------------------------------------- records
def _row(setting, method, lm, ln):
    return {
        "setting": setting,
        "method": method,
        "accuracy": 0.7,
        "seconds": 1.0,
        "losses": {"members": list(lm), "nonmembers": list(ln)},
        "loss_attack": mia.attack_metrics(-np.asarray(lm), -np.asarray(ln), bootstrap=0),
        "reference_attack": None,
    }


def test_equivalence_checks_flag_a_released_model_that_differs():
    rng = np.random.default_rng(0)
    lm, ln = rng.random(50), rng.random(50) + 0.2
    rows = [
        _row("s", "flexlora", lm, ln),
        _row("s", "shelora-delta", lm + 1e-6, ln - 1e-6),  # CKKS-sized differences
        _row("s", "fedavg", lm, ln),
        _row("s", "fedshield", lm[::-1], ln),  # another model
    ]
    checks = {c["encrypted"]: c for c in mia.equivalence_checks(rows)}
    assert checks["shelora-delta"]["agree"] and checks["shelora-delta"]["plaintext"] == "flexlora"
    assert checks["shelora-delta"]["max_abs_loss_difference"] < 1e-5
    assert not checks["fedshield"]["agree"]
    said = mia.statement(list(checks.values()))
    assert said.startswith("encrypted and plaintext released models DIFFER") and "fedshield" in said
    assert mia.statement([checks["shelora-delta"]]).startswith("Encryption of the updates does not")


def test_table_and_figure_from_a_record(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    rng = np.random.default_rng(0)
    lm, ln = rng.random(40), rng.random(40) + 0.3
    rows = [_row("s", "flexlora", lm, ln), _row("s", "flexlora-dp", ln, ln)]
    record = {"settings": [{"name": "s", "reference_losses": None}], "rows": rows}
    table = mia.summary_table(record)
    assert "| s | flexlora | 0.700 |" in table and "| 40 |" in table
    fig = mia.roc_figure(record)
    assert len(fig.axes) == 2


# ---------------------------------------------------------------------------- matched utility
def _dp_row(setting, method, accuracy, auc_shift, *, epsilon, target=None, seed=0):
    """A DP row whose loss attack has an AUC that grows with ``auc_shift`` (synthetic losses)."""
    rng = np.random.default_rng(seed)
    lm, ln = rng.random(40), rng.random(40) + auc_shift
    row = _row(setting, method, lm, ln)
    row.update(
        accuracy=accuracy,
        sweep=target is not None,
        target_epsilon=target,
        privacy={
            "calibration": "per_round_analytic" if target is None else "target_epsilon",
            "epsilon": epsilon,
            "epsilon_server": epsilon,
            "delta": 1e-5,
            "noise_multiplier": 1.0 / (epsilon or 1.0),
        },
    )
    return row


def _matched_record():
    rows = [
        _dp_row("s", "flexlora", 0.70, 0.4, epsilon=None),
        _dp_row("s", "flexlora-dp", 0.50, 0.0, epsilon=21.5),
        _dp_row("s", "shelora-dp", 0.45, 0.0, epsilon=21.5),
    ]
    for r in rows[:1]:
        r["privacy"] = None
    sweep = [
        # flexlora-dp: below the bar at 100, above at 316 (matched), below again at 1000
        _dp_row("s", "flexlora-dp", 0.60, 0.1, epsilon=99.99, target=100.0),
        _dp_row("s", "flexlora-dp", 0.68, 0.3, epsilon=316.1, target=316.2),
        _dp_row("s", "flexlora-dp", 0.67, 0.35, epsilon=999.9, target=1000.0),
        # shelora-dp never reaches 0.68
        _dp_row("s", "shelora-dp", 0.55, 0.1, epsilon=99.99, target=100.0),
        _dp_row("s", "shelora-dp", 0.66, 0.3, epsilon=999.9, target=1000.0),
    ]
    return rows, sweep


def test_matched_utility_picks_the_smallest_epsilon_at_flexloras_accuracy():
    rows, sweep = _matched_record()
    got = {m["method"]: m for m in mia.matched_utility(rows, sweep, tolerance=0.02)}
    flex = got["flexlora-dp"]
    # 0.68 = 0.70 - 0.02 exactly: on the bar counts (no float rounding against it)
    assert flex["threshold"] == pytest.approx(0.68)
    assert flex["matched"]["target_epsilon"] == 316.2 and flex["bracketed"]
    assert [p["epsilon"] for p in flex["points"]] == [21.5, 99.99, 316.1, 999.9]
    auc_flex = rows[0]["loss_attack"]["auc"]
    assert flex["reference"]["loss_auc"] == auc_flex
    assert flex["loss_auc_difference"] == pytest.approx(flex["matched"]["loss_auc"] - auc_flex)
    she = got["shelora-dp"]
    assert she["matched"] is None and she["loss_auc_difference"] is None
    assert "no point matches" in she["note"] and "0.660" in she["note"]
    # a looser bar matches at the per-round point; the record says it was not bracketed
    loose = {m["method"]: m for m in mia.matched_utility(rows, sweep, tolerance=0.3)}
    assert loose["shelora-dp"]["matched"]["epsilon"] == 21.5
    assert (
        not loose["shelora-dp"]["bracketed"]
        and "smallest epsilon swept" in loose["shelora-dp"]["note"]
    )
    with pytest.raises(ValueError, match="tolerance"):
        mia.matched_utility(rows, sweep, tolerance=-0.1)


def test_matched_utility_without_flexlora_says_so_and_a_noiseless_point_never_matches():
    rows, sweep = _matched_record()
    (entry, _) = mia.matched_utility(rows[1:], sweep)
    assert entry["matched"] is None and "no flexlora row" in entry["note"]
    free = _dp_row("s", "flexlora-dp", 0.70, 0.4, epsilon=None, target=None)
    got = mia.matched_utility(rows[:1], [free])[0]
    assert got["matched"] is None  # no finite epsilon: no guarantee, not a DP point at utility


def test_sweep_configs_and_accounting_checks():
    from shelora_core.accounting import run_privacy

    base = FederatedConfig(model="minilm", num_clients=3, rounds=3)
    cfgs = mia.dp_sweep_methods(base, (100.0, 1000.0))
    assert [(lab, c.dp_target_epsilon) for lab, c in cfgs] == [
        ("flexlora-dp", 100.0),
        ("shelora-dp", 100.0),
        ("flexlora-dp", 1000.0),
        ("shelora-dp", 1000.0),
    ]
    assert len({c.run_name for _, c in cfgs}) == 4  # each point is its own run and row key
    for bad in (0.0, -1.0, float("inf"), True):
        with pytest.raises(ValueError, match="sweep epsilon"):
            mia.dp_sweep_methods(base, (bad,))
    rows = [
        {"setting": "s", "method": lab, "target_epsilon": c.dp_target_epsilon,
         "privacy": run_privacy(c, c.rounds)}
        for lab, c in cfgs
    ]  # fmt: skip
    assert all(c["agree"] for c in mia.sweep_accounting_checks(rows))
    rows[0]["privacy"] = {**rows[0]["privacy"], "epsilon_server": 150.0}  # overspent
    rows[1]["privacy"] = {**rows[1]["privacy"], "epsilon_server": 50.0}  # noised far more
    assert [c["agree"] for c in mia.sweep_accounting_checks(rows)] == [False, False, True, True]


def test_statement_table_figure_and_notes_at_matched_utility(tmp_path):
    import json

    import matplotlib

    matplotlib.use("Agg")
    rows, sweep = _matched_record()
    matched = mia.matched_utility(rows, sweep)
    said = mia.statement([], matched)
    assert "flexlora-dp in s: epsilon 316 (whole run, delta 1e-05)" in said
    assert "shelora-dp in s: NO swept epsilon reaches accuracy 0.680" in said
    record = {
        "settings": [{"name": "s", "reference_losses": None}],
        "rows": rows,
        "dp_sweep": {"rows": sweep},
        "matched_utility": matched,
        "checks": [],
        "meta": {"git_commit": "abc123"},
    }
    table = mia.summary_table(record)
    assert "| s | flexlora-dp | target 316.2 | 316, 1e-05 |" in table
    assert table.count("**matched**") == 1 and "| no point matches |" in table
    # without the stored entries the table recomputes them from the rows
    assert mia.sweep_table({k: v for k, v in record.items() if k != "matched_utility"}) == (
        mia.sweep_table(record)
    )
    fig = mia.utility_figure(record)
    assert len(fig.axes) == 2
    ax = fig.axes[0]
    assert {t.get_text() for t in ax.texts} >= {"21.5", "100", "316", "1000"}
    assert any(line.get_xdata()[0] == pytest.approx(0.68) for line in ax.lines)  # the bar
    from reproduce import membership_notes

    (tmp_path / "quick").mkdir()
    (tmp_path / "quick" / "membership.json").write_text(json.dumps(record))
    (line,) = membership_notes(tmp_path)
    assert "at matched utility (accuracy >= 0.680, FlexLoRA's 0.700 - 0.02;" in line
    assert "flexlora-dp at epsilon 316 over the run (delta 1e-05; accuracy 0.68)" in line
    assert "shelora-dp reaches it at no swept epsilon (best accuracy 0.66)" in line
    assert "No swept epsilon reaches FlexLoRA's accuracy for shelora-dp in s." in line


@pytest.mark.parametrize("inside", [True, False])
def test_matched_auc_against_flexloras_interval_in_the_record_and_the_notes(tmp_path, inside):
    import json

    rows, sweep = _matched_record()
    sweep = [r for r in sweep if r["method"] == "flexlora-dp"]
    rows = [r for r in rows if r["method"] != "shelora-dp"]
    auc = sweep[1]["loss_attack"]["auc"]  # the matched point's
    rows[0]["loss_attack"]["auc_ci95"] = [auc - 0.01, auc + 0.01] if inside else [auc + 0.01, 1.0]
    (m,) = mia.matched_utility(rows, sweep)
    assert m["loss_auc_in_reference_ci95"] is inside
    said = mia.matched_statement([m])
    assert (", inside FlexLoRA's 95% interval" in said) == inside
    assert (", below FlexLoRA's 95% interval" in said) == (not inside)
    from reproduce import membership_notes

    record = {"rows": rows, "matched_utility": [m], "checks": [], "meta": {"git_commit": "abc"}}
    (tmp_path / "quick").mkdir()
    (tmp_path / "quick" / "membership.json").write_text(json.dumps(record))
    (line,) = membership_notes(tmp_path)
    assert (
        "inside FlexLoRA's bootstrap 95% interval, at whole-run epsilons of 316" in line
    ) == inside
    assert ("every DP method's loss AUC lies inside" in line) == inside  # no method missed it
    # the per-round point (accuracy 0.50) is below the bar: its lower AUC came with lower accuracy
    assert ("come with lower accuracy" in line) == inside
    assert ("falls outside FlexLoRA's interval for flexlora-dp in s" in line) == (not inside)


@pytest.mark.slow
def test_runner_end_to_end_shelora_releases_flexloras_model(tmp_path, tiny_config):
    cfg = tiny_config.replace(partition="iid")
    kw = dict(
        out_dir=tmp_path,
        settings=[mia.Setting("tiny", cfg, "a tiny run")],
        methods=["flexlora", "shelora-delta"],
        bootstrap=50,
        progress=False,
    )
    record = mia.run_membership("quick", **kw)
    rows = {r["method"]: r for r in record["rows"]}
    assert set(rows) == {"flexlora", "shelora-delta"}
    (check,) = record["checks"]
    assert check["agree"] and check["max_abs_loss_difference"] <= 1e-4
    n = record["settings"][0]["n_members"]
    assert (
        rows["flexlora"]["loss_attack"]["n_members"]
        == n
        == len(rows["flexlora"]["losses"]["members"])
    )
    assert record["settings"][0]["reference_models"][0]["examples"] == 120
    again = mia.run_membership("quick", **kw)  # finished rows are reused, not recomputed
    assert [r["seconds"] for r in again["rows"]] == [r["seconds"] for r in record["rows"]]


@pytest.mark.slow
def test_runner_end_to_end_dp_sweep_and_matched_utility(tmp_path, tiny_config):
    cfg = tiny_config.replace(partition="iid")
    record = mia.run_membership(
        "quick",
        out_dir=tmp_path,
        settings=[mia.Setting("tiny", cfg, "a tiny run")],
        methods=["flexlora", "flexlora-dp"],
        n_reference=0,
        bootstrap=20,
        progress=False,
        sweep_epsilons=(1000.0,),
    )
    assert [r["method"] for r in record["rows"]] == ["flexlora", "flexlora-dp"]
    (point,) = record["dp_sweep"]["rows"]
    assert point["sweep"] and point["target_epsilon"] == 1000.0
    assert point["privacy"]["calibration"] == "target_epsilon"
    assert all(c["agree"] for c in record["dp_sweep"]["accounting_checks"])
    (m,) = record["matched_utility"]
    assert m["method"] == "flexlora-dp" and len(m["points"]) == 2
    assert m["reference"]["accuracy"] == record["rows"][0]["accuracy"]
    assert (m["matched"] is None) == ("no point matches" in m["note"])
    assert "At matched utility" in record["statement"]


@pytest.mark.parametrize("profile", ["quick", "paper"])
def test_the_main_setting_attacks_the_models_notebook_05_reports(profile):
    # the profile's setting is notebook 05's encrypted-method run (same configuration, so its
    # checkpoints are reused); the quick overfit setting keeps the profile's own schedule
    from shelora_core.profiles import federated_tuning_grid, profile_config

    settings = {s.name: s.config for s in mia.membership_settings(profile)}
    grid = {c.run_name for c in federated_tuning_grid(profile)}
    for label, cfg in mia.membership_methods(settings[profile]):
        if label in ("fedavg", "flexlora", "shelora-delta"):
            assert cfg.run_name in grid, label
    if profile == "quick":
        own = profile_config("quick")
        over = settings["overfit"]
        assert (over.lr, over.head_lr_scale, over.lr_final_ratio) == (
            own.lr,
            own.head_lr_scale,
            own.lr_final_ratio,
        )
        assert settings["quick"].head_lr_scale != own.head_lr_scale


def test_the_notes_do_not_say_every_dp_method_when_one_never_reaches_flexloras_accuracy():
    from reproduce import _matched_summary

    ref = {"method": "flexlora", "accuracy": 0.7}
    hit = {
        "method": "flexlora-dp",
        "setting": "s",
        "reference": ref,
        "threshold": 0.68,
        "matched": {"epsilon": 1000.0},
        "loss_auc_in_reference_ci95": True,
        "points": [],
    }
    miss = {"method": "shelora-dp", "setting": "s", "reference": ref, "matched": None}
    both = _matched_summary([hit, miss])
    assert "the loss AUC of every DP method that reaches it lies inside" in both
    assert "every DP method's loss AUC" not in both
    assert "No swept epsilon reaches FlexLoRA's accuracy for shelora-dp in s." in both
    assert "every DP method's loss AUC lies inside" in _matched_summary([hit])
