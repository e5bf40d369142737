"""SHE-LoRA's column-aware split is exact: P + D E_G^T equals FlexLoRA's dW."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shelora_core.aggregation import (
    flexlora_aggregate,
    lora_scaling,
    normalize_weights,
    stack_client_updates,
)
from shelora_core.column_aggregation import (
    check_column_list,
    fuse,
    plain_part,
    protected_columns,
    reparameterize,
    split_columns,
)


def _clients(rng, m, n, ranks):
    return [(rng.normal(size=(m, r)), rng.normal(size=(r, n))) for r in ranks]


def _she_lora_dw(factors, p, s, cols, budgets):
    """Plaintext simulation of the protocol: zero J_i in A, sum the protected columns."""
    plain, d = [], np.zeros((factors[0][0].shape[0], max(budgets)))
    for (b, a), pi, si, k in zip(factors, p, s, budgets, strict=True):
        a_plain, _ = split_columns(a, cols[:k])
        plain.append((b, a_plain))
        d[:, :k] += protected_columns(b, a, cols[:k], pi * si)
    return fuse(plain_part(plain, p, s), cols[: max(budgets)], d)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    m=st.integers(2, 24),
    n=st.integers(2, 24),
    ranks=st.lists(st.integers(1, 6), min_size=1, max_size=4),
    seed=st.integers(0, 10_000),
    data=st.data(),
)
def test_fused_update_equals_flexlora_dw_for_heterogeneous_ranks_and_budgets(
    m, n, ranks, seed, data
):
    rng = np.random.default_rng(seed)
    factors = _clients(rng, m, n, ranks)
    budgets = [data.draw(st.integers(0, n)) for _ in ranks]
    cols = rng.permutation(n)[: max(budgets)]
    p = normalize_weights(rng.integers(1, 100, size=len(ranks)))
    s = [lora_scaling(16.0, r) for r in ranks]
    fused = _she_lora_dw(factors, p, s, cols, budgets)
    flex = stack_client_updates(factors, p, s).dense()
    np.testing.assert_allclose(fused.dense(), flex, atol=1e-9 * max(1.0, np.abs(flex).max()))


def test_reparameterized_client_equals_flexlora_redistribution():
    rng = np.random.default_rng(0)
    ranks, budgets = (2, 4, 8), (1, 3, 5)
    factors = _clients(rng, 30, 20, ranks)
    p = normalize_weights([5, 10, 20])
    s = [lora_scaling(16.0, r) for r in ranks]
    cols = rng.permutation(20)[:5]
    fused = _she_lora_dw(factors, p, s, cols, budgets)
    svd = flexlora_aggregate(factors, p, s)
    for r in ranks:
        b, a, _ = reparameterize(fused, r, lora_scaling(16.0, r))
        best = svd.truncate(r).dense()
        np.testing.assert_allclose(lora_scaling(16.0, r) * b @ a, best, atol=1e-9)


def test_split_columns_zeroes_exactly_the_protected_columns():
    a = np.arange(12.0).reshape(2, 6) + 1
    plain, prot = split_columns(a, [4, 1])
    assert (plain[:, [1, 4]] == 0).all() and (plain[:, [0, 2, 3, 5]] == a[:, [0, 2, 3, 5]]).all()
    np.testing.assert_array_equal(prot, a[:, [4, 1]])


@pytest.mark.parametrize(
    ("cols", "n", "need", "msg"),
    [([0, 0], 4, 0, "duplicates"), ([5], 4, 0, r"\[0, 4\)"), ([1, 2], 4, 3, "budget of 3")],
)
def test_bad_column_lists_are_refused(cols, n, need, msg):
    with pytest.raises(ValueError, match=msg):
        check_column_list(cols, n, need=need)


def test_fuse_refuses_decrypted_columns_of_the_wrong_shape():
    rng = np.random.default_rng(1)
    factors = _clients(rng, 6, 5, (2,))
    plain = plain_part(factors, [1.0], [1.0])
    with pytest.raises(ValueError, match=r"shape \(6, 2\), expected \(6, 3\)"):
        fuse(plain, [0, 1, 2], np.zeros((6, 2)))
