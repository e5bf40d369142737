"""The trade-off tables join notebook 05's runs and notebook 06's cells as documented."""

import math

import pytest

from shelora_core.attacks import tradeoff


def _cell(method, attacker, update, rouge1, *, bs=1, budget=None, eps=None, sigma=None, nbytes=1e6):
    return {
        "kind": "measured",
        "model": "smollm2",
        "method": method,
        "attacker": attacker,
        "update": update,
        "batch_size": bs,
        "budget": budget,
        "dp_epsilon": eps,
        "dp_sigma": sigma,
        "rouge1": rouge1,
        "lr": 1000.0,
        "steps": None,
        "span_tol": None,
        "upload_bytes": nbytes,
    }


def _run(variant, acc, *, eps=None, privacy=None, partition="dirichlet(0.3)", stopped=None):
    s = {
        "variant": variant,
        "model": "minilm",
        "ranks": [8, 16, 32],
        "partition": partition,
        "final_accuracy": acc,
        "rounds": 3,
        "upload_bytes_per_client": 2e5,
        "seconds_per_client_round": 1.0,
        "config": {"dp_epsilon": eps},
    }
    if privacy:
        s["privacy"] = privacy
    if stopped:
        s["stopped"] = {"round": stopped}
    return s


ATTACKS = [
    {"kind": "meta", "dp_sigma_eps10": 0.5},
    _cell("flexlora", "oblivious", "round1", 1.0),
    _cell("flexlora", "oblivious", "later", 1.0),
    _cell("shelora", "oblivious", "round1", 1.0, budget=4, nbytes=2e6),
    _cell("shelora", "adaptive", "round1", 1.0, budget=4, nbytes=2e6),
    _cell("shelora", "oblivious", "later", 0.0, budget=4, nbytes=2e6),
    _cell("shelora", "adaptive", "later", 0.9, budget=4, nbytes=2e6),
    _cell("shelora", "adaptive", "round1-secret-a", 0.05, budget=4, nbytes=2e6),
    _cell("flexlora-dp", "oblivious", "round1", 0.0, eps=10.0),
    _cell("flexlora-dp", "oblivious", "later", 0.0, eps=10.0),
    _cell("flexlora-dp", "oblivious", "round1", 0.0, sigma=1e-8),
    _cell("flexlora-dp", "oblivious", "later", 0.05, sigma=1e-8, bs=8),
    _cell("flexlora-dp", "oblivious", "later", 1.0, sigma=1e-10),
    # cells that are not one-step FedSGD at DAGER's threshold are left out
    {**_cell("flexlora-dp", "oblivious", "later", 1.0, eps=10.0), "steps": 5},
    {**_cell("flexlora-dp", "oblivious", "later", 1.0, eps=10.0), "span_tol": 1e-2},
    {**_cell("flexlora-dp", "oblivious", "later", 1.0, eps=10.0), "lr": 1.0},
]


def test_rows_join_runs_and_cells_by_method_and_the_runs_own_epsilon():
    runs = [
        _run("flexlora", 0.80),
        _run("shelora-delta", 0.79),
        _run("shelora-delta-secretA", 0.78),
        _run("flexlora-dp", 0.55, eps=10.0, privacy={"epsilon_server": 42.0, "delta": 1e-5}),
        _run("flexlora", 0.81, partition="iid"),  # another setting: not a row
        _run("fedavg", 0.70),  # not attacked: not a row
    ]
    rows = {r["variant"]: r for r in tradeoff.tradeoff_rows(runs, ATTACKS)}
    assert sorted(rows) == ["flexlora", "flexlora-dp", "shelora-delta", "shelora-delta-secretA"]
    she = rows["shelora-delta"]
    assert she["rouge1_later_dager"] == 0.0 and she["rouge1_later_strong"] == 0.9
    assert she["rouge1_round1_strong"] == 1.0
    # a secret initial A is attacked through its own round-1 cells
    assert rows["shelora-delta-secretA"]["rouge1_round1_strong"] == 0.05
    dp = rows["flexlora-dp"]
    assert dp["rouge1_later_dager"] == 0.0  # the sigma sweep and the other kinds of cell ignored
    assert dp["epsilon_server"] == 42.0 and dp["attack_cells"] == 2


def test_cheapest_setting_is_the_fewest_bytes_then_the_least_noise_that_stops_every_cell():
    out = {m["method"]: m for m in tradeoff.cheapest_settings(ATTACKS, threshold=0.1)}
    assert out["flexlora"]["cheapest"] is None
    assert (
        out["shelora"]["cheapest"] is None
    )  # adaptive 0.9 later; the secret-A row alone is no setting
    secret = [s for s in out["shelora"]["settings"] if s["secret_init"]]
    assert secret and secret[0]["worst_rouge1"] == 0.05
    dp = out["flexlora-dp"]
    assert dp["cheapest"]["dp_sigma"] == 1e-8  # less noise than epsilon 10 (sigma 0.5)
    assert {s["noise_multiplier"] for s in dp["settings"]} == {0.5, 1e-8, 1e-10}
    assert out["flexlora-dp"]["cheapest"]["batch_sizes"] == [1, 8]
    tight = {m["method"]: m for m in tradeoff.cheapest_settings(ATTACKS, threshold=0.01)}
    assert tight["flexlora-dp"]["cheapest"]["dp_epsilon"] == 10.0


def test_the_attackers_a_method_must_stop():
    assert tradeoff.strong_attackers("shelora") == ("adaptive", "b-channel")
    assert tradeoff.strong_attackers("flexlora-dp") == ("oblivious",)


def test_frontier_figure_marks_every_attacked_variant():
    runs = [_run("flexlora", 0.8), _run("shelora-delta", 0.79, stopped=3)]
    fig = tradeoff.frontier_figure(tradeoff.tradeoff_rows(runs, ATTACKS))
    labels = {t.get_text() for ax in fig.axes for t in ax.texts}
    assert labels == {"flexlora", "shelora-delta"}
    assert not math.isnan(fig.axes[0].get_ylim()[0])


@pytest.mark.parametrize("bad", [[], [{"kind": "meta"}]])
def test_no_cells_no_rows(bad):
    assert tradeoff.cheapest_settings(bad) == []
    assert tradeoff.tradeoff_rows([_run("flexlora", 0.8)], bad)[0]["rouge1_round1_strong"] is None
