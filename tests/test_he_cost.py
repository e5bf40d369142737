"""he_cost.py: what ``make bench`` measures for the encrypt-everything baselines."""

import numpy as np
import pytest

from shelora_core.ckks import KeyHolder
from shelora_core.he_cost import FULL_HE_LAYOUT, ModelShape, measure_method


@pytest.fixture(scope="module")
def keys():
    return {"fedshield": KeyHolder.generate("fedshield")}


def test_full_he_row_measures_own_rank_uploads_and_says_so(keys):
    # Arrange: two square layers of width 64 (one module each), clients at ranks 2 and 32
    shape = ModelShape("tiny", layers=2, modules=("q",), d=64)
    ranks = (2, 32)

    # Act
    row = measure_method("full_he", shape, ranks=ranks, budgets=(1, 1), keys=keys)
    slots = keys["fedshield"].client().slots

    # Assert: the row states the layout; its values are the clients' own factors (not r_max's),
    # and its upload is the mean of the ciphertexts each client's own prefix fills
    assert row["full_he_layout"] == FULL_HE_LAYOUT == "own-rank"
    own = [r * 2 * (64 + 64) for r in ranks]
    assert row["encrypted_values_per_client"] == np.mean(own)
    assert row["encrypted_values_per_client"] < max(ranks) * 2 * (64 + 64)
    ct = [-(-v // slots) for v in own]  # ciphertexts per client: 1 and 2 (4096 slots)
    assert ct == [1, 2]
    # zero-padded, the rank-2 client would send 2 ciphertexts too: the same federation at ranks
    # 32/32 uploads 2 per client, ours (1 + 2) / 2 = 1.5
    both_max = measure_method("full_he", shape, ranks=(32, 32), budgets=(1, 1), keys=keys)
    assert row["upload_bytes"] / both_max["upload_bytes"] == pytest.approx(0.75, abs=0.01)
    assert row["max_rel_error_vs_plaintext"] < 1e-4  # vs plaintext FedAvg


def test_every_measured_row_names_the_full_he_layout(keys):
    shape = ModelShape("tiny", layers=1, modules=("q",), d=16)
    rows = [
        measure_method(m, shape, ranks=(2, 4), budgets=(1, 2), keys=keys)
        for m in ("flexlora", "fedshield")
    ]
    assert {r["full_he_layout"] for r in rows} == {"own-rank"}


def test_seeded_and_packed_rows_are_measured_and_named():
    # Arrange: two 64 x 64 layers, ranks 2/4, budgets 1/2; each parameter set's keys once
    shape = ModelShape("tiny", layers=2, modules=("q",), d=64)
    keys = {}
    kw = dict(ranks=(2, 4), budgets=(1, 2), keys=keys)

    # Act
    delta = measure_method("shelora", shape, cipher_mode="delta", **kw)
    delta_seeded = measure_method("shelora", shape, cipher_mode="delta", seeded=True, **kw)
    packed = measure_method("shelora", shape, cipher_mode="packed", **kw)
    packed_seeded = measure_method("shelora", shape, cipher_mode="packed", seeded=True, **kw)

    # Assert: the names say what was measured; seeded uploads are smaller, the rest equal;
    # every mode reproduces the plaintext aggregate
    assert [r["method"] for r in (delta, delta_seeded, packed, packed_seeded)] == [
        "shelora-delta",
        "shelora-delta-seeded",
        "shelora-packed",
        "shelora-packed-seeded",
    ]
    assert delta_seeded["seeded_uploads"] and not delta["seeded_uploads"]
    for plain, seeded in ((delta, delta_seeded), (packed, packed_seeded)):
        assert seeded["upload_bytes"] < plain["upload_bytes"]
        assert seeded["encrypted_values_per_client"] == plain["encrypted_values_per_client"]
    assert packed["ckks_params"] == "packed"
    for row in (delta, delta_seeded, packed, packed_seeded):
        assert row["max_rel_error_vs_plaintext"] < 1e-4
