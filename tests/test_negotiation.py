"""Server-side negotiation on OPE ciphertexts: nested prefixes, coverage, search, roles.

To the server ciphertexts are just ordered integers, so most tests use plaintext integers in their
place; the end-to-end tests encrypt with :class:`shelora_core.ope.ColumnOPE`.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shelora_core.negotiation import (
    ClientProposal,
    NegotiationError,
    grid_points,
    negotiate,
    random_points,
    ranked_lists,
    split_counts,
)

NEGOTIATION_PY = Path(__file__).resolve().parents[1] / "shelora_core" / "negotiation.py"
FILLER = list(range(1000, 1010))


def prop(cid: str, rank: int, budget: int, cols: list[int], scores: list[int] | None = None):
    """A proposal whose scores decrease along the list unless given."""
    if scores is None:
        scores = [100 - i for i in range(len(cols))]
    return ClientProposal(cid, rank, budget, list(zip(cols, scores, strict=True)))


@st.composite
def layer(draw, *, short: bool = False, same_budget: int | None = None, min_clients: int = 1):
    """Random proposals for one layer; ``short`` lets clients propose fewer than their budget."""
    universe = draw(st.integers(max(6, same_budget or 0), 30))
    props = []
    for i in range(draw(st.integers(min_clients, 5))):
        budget = same_budget if same_budget is not None else draw(st.integers(0, 6))
        size = draw(st.integers(0, budget)) if short else budget
        cols = draw(
            st.lists(st.integers(0, universe - 1), min_size=size, max_size=size, unique=True)
        )
        scores = draw(st.lists(st.integers(0, 10**6), min_size=size, max_size=size))
        rank = draw(st.sampled_from([1, 2, 4, 8, 16]))
        props.append(prop(f"c{i}", rank, budget, cols, sorted(scores, reverse=True)))
    return props


# ---- structure ----------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(st.lists(layer(), min_size=1, max_size=2), st.booleans())
def test_one_list_per_layer_nests_with_right_lengths_and_no_duplicates(layers, random_search):
    proposals = {f"layer{i}": props for i, props in enumerate(layers)}
    res = negotiate(proposals, search="random" if random_search else "grid", samples=20)
    for name, props in proposals.items():
        g = res.columns[name]
        k_max = max((p.budget for p in props), default=0)
        assert len(g) == k_max and len(set(g)) == len(g)
        assert set(g) <= {c for p in props if p.budget for c in p.indices}
        for p in props:
            assert res.prefix(name, p.client_id) == g[: p.budget]
        for tier in res.tiers[name]:
            assert tier.objective == max(tier.grid.values())  # the choice is the best evaluated
            assert sum(tier.taken.values()) == tier.added == sum(tier.split)
        for p in props:
            if p.budget:
                assert 0 <= res.coverage[name][p.client_id] <= 1
                assert (
                    0
                    <= res.risk[name][p.client_id]
                    <= p.rank / max(q.rank for q in props if q.budget)
                )


@settings(max_examples=40, deadline=None)
@given(layer(short=True))
def test_short_proposals_are_completed_from_filler(props):
    res = negotiate({"L": props}, filler=FILLER)
    g = res.columns["L"]
    assert len(g) == max((p.budget for p in props), default=0) and len(set(g)) == len(g)
    proposed = [c for c in g if c < 1000]
    assert g[: len(proposed)] == proposed  # filler only after every proposed column is used


def test_too_few_distinct_columns_raises_and_explains():
    props = [prop("a", 4, 3, [1, 2]), prop("b", 4, 3, [2, 1])]
    with pytest.raises(NegotiationError, match="propose at least its budget"):
        negotiate({"L": props})
    res = negotiate({"L": props}, filler={"L": [2, 7, 9]})
    assert res.columns["L"] == [1, 2, 7]


# ---- coverage / risk ----------------------------------------------------------------------
def test_identical_proposals_give_full_coverage_and_zero_risk():
    items = [11, 4, 27, 8]
    props = [prop(f"c{i}", r, 4, items) for i, r in enumerate((2, 4, 8))]
    res = negotiate({"L": props})
    assert res.columns["L"] == items
    assert set(res.coverage["L"].values()) == {1.0} and set(res.risk["L"].values()) == {0.0}


def test_clients_agreeing_on_a_ranking_get_its_prefixes_with_full_coverage():
    ranking = [40, 3, 17, 25, 9, 31, 2, 12]
    props = [prop(f"c{i}", 2 * k, k, ranking[:k]) for i, k in enumerate((2, 4, 8, 4))]
    res = negotiate({"L": props})
    assert res.columns["L"] == ranking
    assert set(res.coverage["L"].values()) == {1.0} and res.objective("L") == 1.0


def test_coverage_and_risk_follow_the_documented_formulas():
    # Disjoint proposals, one tier: G = [1, 3] (top by score); each client keeps its top column.
    props = [prop("a", 4, 2, [1, 2], [100, 90]), prop("b", 8, 2, [3, 4], [95, 80])]
    res = negotiate({"L": props})
    assert res.columns["L"] == [1, 3]
    assert res.coverage["L"] == {"a": 0.5, "b": 0.5}
    # Risk_i = r_i / r_max * (weight of uncovered positions); |P|=2 -> weights (2/3, 1/3).
    assert res.risk["L"]["a"] == pytest.approx(4 / 8 * 1 / 3)
    assert res.risk["L"]["b"] == pytest.approx(8 / 8 * 1 / 3)
    assert res.tiers["L"][0].objective == pytest.approx(0.5 - 1 / 3)


def test_ranked_lists_orders():
    props = [
        prop("a", 4, 2, [5, 6], [50, 10]),
        prop("b", 4, 2, [6, 7], [60, 40]),
        prop("c", 8, 3, [9, 7, 5], [95, 90, 20]),
    ]
    lists = ranked_lists(props)
    assert lists.counts == {5: 2, 6: 2, 7: 2, 9: 1}
    assert lists.common == (7, 6, 5, 9)  # by count, ties by max score (90, 60, 50)
    assert lists.sensitivity == (9, 7, 6, 5)  # by max score
    assert lists.tiers[2] == (5, 7, 6)  # min score over clients a, b: 50, 40, 10
    assert lists.tiers[3] == (9, 7, 5)  # a single client: its proposal order


# ---- rounding and search ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("d", "a", "b", "expected"),
    [
        (10, 0.3, 0.6, (3, 6, 1)),
        (10, 0.7, 0.2, (7, 2, 1)),
        (3, 0.5, 0.5, (2, 1, 0)),
        (5, 0.1, 0.0, (1, 0, 4)),  # 0.5 rounds half up
        (1, 0.4, 0.4, (0, 1, 0)),  # cumulative: round(0.8) = 1 goes to Common
        (0, 0.5, 0.5, (0, 0, 0)),
    ],
)
def test_split_counts_round_half_up_cumulatively(d, a, b, expected):
    assert split_counts(d, a, b) == expected


def test_grid_has_66_points_at_step_0_1_and_heatmap_shape():
    assert len(grid_points(0.1)) == 66 and grid_points(0.1)[0] == (1.0, 0.0)
    with pytest.raises(ValueError, match="divide 1"):
        grid_points(0.3)
    props = [prop("a", 4, 3, [1, 2, 3]), prop("b", 8, 5, [4, 2, 5, 6, 7])]
    res = negotiate({"L": props})
    a_axis, b_axis, z = res.objective_grid("L", tier=1)
    assert z.shape == (11, 11) and np.isnan(z[10, 10]) and not np.isnan(z[0, 10])
    assert np.nanmax(z) == res.tiers["L"][1].objective


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 10).flatmap(lambda k: layer(same_budget=k, min_clients=2)), st.integers(0, 9))
def test_grid_search_beats_every_random_sample_on_a_tier(props, seed):
    # One tier adding d <= 10 = 1/grid_step columns: the grid reaches every integer split.
    grid = negotiate({"L": props})
    rnd = negotiate({"L": props}, search="random", samples=40, seed=seed)
    assert grid.tiers["L"][0].objective >= max(rnd.tiers["L"][0].grid.values())


def test_search_is_deterministic_and_random_points_lie_in_the_simplex():
    props = [prop("a", 4, 2, [1, 2]), prop("b", 8, 6, [3, 1, 4, 5, 6, 7], [99, 98, 5, 4, 3, 2])]
    r1 = negotiate({"L": props}, search="random", seed=3)
    r2 = negotiate({"L": props}, search="random", seed=3)
    assert r1.to_dict() == r2.to_dict()
    assert json.loads(json.dumps(r1.to_dict()))["columns"] == r1.columns
    assert negotiate({"L": props}).to_dict() == negotiate({"L": props}).to_dict()
    pts = random_points(500, seed=1)
    assert all(a >= 0 and b >= 0 and a + b <= 1 + 1e-12 for a, b in pts)


# ---- edge cases ---------------------------------------------------------------------------
def test_single_client_list_is_its_proposal_in_order():
    items = [9, 2, 30, 4, 15]
    res = negotiate({"L": [prop("solo", 8, 5, items, [70, 70, 50, 20, 1])]})
    assert res.columns["L"] == items and res.coverage["L"]["solo"] == 1.0


def test_budget_zero_client_contributes_nothing():
    base = [prop("a", 4, 2, [1, 2]), prop("b", 8, 3, [2, 3, 4])]
    zero = ClientProposal("plain", 16, 0, [(50, 10**9), (51, 10**9)])  # items ignored
    with_zero = negotiate({"L": [*base, zero]})
    assert with_zero.columns == negotiate({"L": base}).columns
    assert with_zero.prefix("L", "plain") == [] and "plain" not in with_zero.coverage["L"]
    assert negotiate({"L": [ClientProposal("p", 4, 0)]}).columns == {"L": []}


def test_budget_above_the_layer_width_raises():
    props = [prop("a", 4, 5, [0, 1, 2, 3, 4])]
    with pytest.raises(NegotiationError, match="only 4 columns"):
        negotiate({"L": props}, widths={"L": 4})
    with pytest.raises(NegotiationError, match="no entry"):
        negotiate({"L": props}, widths={"other": 64})
    assert negotiate({"L": props}, widths={"L": 5}).columns["L"] == [0, 1, 2, 3, 4]


def test_malformed_proposals_raise():
    with pytest.raises(NegotiationError, match="twice"):
        prop("a", 4, 2, [1, 1])
    with pytest.raises(NegotiationError, match="non-increasing"):
        prop("a", 4, 2, [1, 2], [5, 6])
    with pytest.raises(NegotiationError, match="more than once"):
        negotiate({"L": [prop("a", 4, 1, [1]), prop("a", 4, 1, [2])]})
    with pytest.raises(NegotiationError, match="rank"):
        ClientProposal("a", 0, 1, [(1, 1)])


def test_dropout_leaves_remaining_prefixes_unchanged():
    props = [
        prop("a", 4, 2, [1, 2]),
        prop("b", 8, 4, [2, 3, 1, 5]),
        prop("c", 16, 6, [7, 3, 8, 2, 9, 1]),
    ]
    res = negotiate({"L": props, "M": props[:2]})
    after = res.without(["c"])
    for p in props[:2]:
        assert after.prefix("L", p.client_id) == res.prefix("L", p.client_id)
        assert after.prefix("M", p.client_id) == res.prefix("M", p.client_id)
    assert after.columns["L"] == res.columns["L"][:4] and "c" not in after.coverage["L"]
    assert res.without(["a", "b", "c"]).columns == {"L": [], "M": []}


# ---- roles ---------------------------------------------------------------------------------
def test_negotiation_module_never_imports_the_ope_module():
    tree = ast.parse(NEGOTIATION_PY.read_text())
    modules: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            modules += [base] + [f"{base}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Name) and node.id == "__import__":
            pytest.fail("negotiation.py calls __import__")
    parts = {part for m in modules for part in m.split(".") if part}
    assert not parts & {"ope", "pyope", "importlib"}, sorted(modules)


def test_importing_negotiation_loads_no_ope_code():
    code = (
        "import sys, shelora_core.negotiation\n"
        "bad = [m for m in sys.modules if m.split('.')[0] == 'pyope' or m == 'shelora_core.ope']\n"
        "print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ---- end to end ----------------------------------------------------------------------------
def test_end_to_end_clients_encrypt_server_negotiates_clients_decrypt():
    from shelora_core.ope import ColumnOPE, OPEKey

    key = OPEKey(b"shelora-e2e-negotiation-key-0001")
    width, rng = 64, np.random.default_rng(5)
    base = {"q": rng.random(width) * 10, "v": rng.gamma(0.5, size=width)}
    clients = {"c1": (4, 2), "c2": (8, 4), "c3": (16, 6), "c0": (8, 0)}  # rank, budget
    # Clients (each with its own ColumnOPE, the same key) agree on the sensitivity ranking.
    proposals = {
        name: [
            ClientProposal(cid, r, k, ColumnOPE(key).propose(scores, k))
            for cid, (r, k) in clients.items()
        ]
        for name, scores in base.items()
    }
    res = negotiate(proposals, widths={"q": width, "v": width})  # server: integers only
    client = ColumnOPE(key)
    for name, scores in base.items():
        g = client.decrypt_indices(res.columns[name])
        top = [int(j) for j in np.argsort(-scores, kind="stable")]
        assert len(g) == 6 and len(set(g)) == 6 and all(0 <= j < width for j in g)
        assert set(g[:2]) == set(top[:2])  # the columns every client proposed come first
        assert g == top[:6]
        assert set(res.coverage[name].values()) == {1.0}

    # Disagreeing clients: still a valid list, each client's prefix decrypts to real columns.
    noisy = {
        "q": [
            ClientProposal(cid, r, k, client.propose(base["q"] * rng.random(width), k))
            for cid, (r, k) in clients.items()
        ]
    }
    res = negotiate(noisy, widths={"q": width})
    g = client.decrypt_indices(res.columns["q"])
    assert len(g) == 6 and len(set(g)) == 6 and all(0 <= j < width for j in g)
