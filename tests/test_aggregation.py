"""Tests for ``shelora_core.aggregation`` (FlexLoRA and zero-padded FedAvg maths)."""

from __future__ import annotations

import time
import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shelora_core.aggregation import (
    LowRankUpdate,
    SVDFactors,
    dense_svd,
    fedavg_factors,
    fedavg_truncate,
    flexlora_aggregate,
    flexlora_redistribute,
    lora_scaling,
    lowrank_svd,
    normalize_weights,
    stack_client_updates,
    weighted_mean,
)

ALPHA = 16.0


def make_clients(
    rng: np.random.Generator, m: int, n: int, ranks: list[int]
) -> tuple[list[tuple[np.ndarray, np.ndarray]], np.ndarray, np.ndarray]:
    """Random client factors, normalised weights and LoRA scalings."""
    factors = [(rng.standard_normal((m, r)), rng.standard_normal((r, n))) for r in ranks]
    weights = normalize_weights(rng.integers(1, 1000, size=len(ranks)))
    scalings = np.array([lora_scaling(ALPHA, r) for r in ranks])
    return factors, weights, scalings


def reference_update(factors, weights, scalings) -> np.ndarray:
    """Dense ``sum_i p_i s_i B_i A_i``."""
    return sum(p * s * (b @ a) for (b, a), p, s in zip(factors, weights, scalings, strict=True))


# --------------------------------------------------------------------------- weights


def test_normalize_weights_sums_to_one_and_is_proportional() -> None:
    # Prepare
    counts = [10, 30, 60]

    # Execute
    p = normalize_weights(counts)

    # Assert
    assert p.dtype == np.float64
    assert p.sum() == pytest.approx(1.0, abs=1e-15)
    np.testing.assert_allclose(p, [0.1, 0.3, 0.6], rtol=0, atol=1e-15)


def test_normalize_weights_allows_some_zero_counts() -> None:
    # Prepare / Execute
    p = normalize_weights([0, 5, 5])

    # Assert
    np.testing.assert_allclose(p, [0.0, 0.5, 0.5])


@pytest.mark.parametrize(
    ("counts", "match"),
    [
        ([], "empty"),
        ([1, -1, 3], "non-negative"),
        ([0, 0, 0], "all zero"),
        ([1.0, float("nan")], "finite"),
        ([1.0, float("inf")], "finite"),
        ([[1, 2], [3, 4]], "one-dimensional"),
    ],
)
def test_normalize_weights_rejects_bad_counts(counts, match: str) -> None:
    # Prepare / Execute / Assert
    with pytest.raises(ValueError, match=match):
        normalize_weights(counts)


def test_aggregators_reject_weights_that_do_not_sum_to_one() -> None:
    # Prepare
    rng = np.random.default_rng(0)
    factors, _, scalings = make_clients(rng, 6, 5, [2, 2])

    # Execute / Assert
    with pytest.raises(ValueError, match=r"sum to one.*normalize_weights"):
        stack_client_updates(factors, [100, 200], scalings)
    with pytest.raises(ValueError, match="non-negative"):
        fedavg_factors(factors, [1.5, -0.5])
    with pytest.raises(ValueError, match="3 weights for 2 clients"):
        weighted_mean([np.ones(3), np.ones(3)], [0.2, 0.3, 0.5])


def test_lora_scaling_is_alpha_over_rank_and_validates() -> None:
    # Prepare / Execute / Assert
    assert lora_scaling(16, 8) == 2.0
    with pytest.raises(ValueError, match="rank"):
        lora_scaling(16, 0)
    with pytest.raises(ValueError, match="alpha"):
        lora_scaling(0.0, 4)


# --------------------------------------------------------------------------- stacking


def test_stack_client_updates_product_is_weighted_scaled_sum() -> None:
    # Prepare
    rng = np.random.default_rng(1)
    factors, weights, scalings = make_clients(rng, 9, 7, [1, 3, 2])

    # Execute
    update = stack_client_updates(factors, weights, scalings)

    # Assert
    assert update.left.shape == (9, 6)
    assert update.right.shape == (6, 7)
    assert update.shape == (9, 7)
    assert update.rank == 6
    np.testing.assert_allclose(
        update.dense(), reference_update(factors, weights, scalings), rtol=0, atol=1e-12
    )


# --------------------------------------------------------------------------- FlexLoRA


def test_flexlora_equal_ranks_full_rank_redistribution_is_exact() -> None:
    # Prepare
    rng = np.random.default_rng(2)
    rank = 4
    factors, weights, scalings = make_clients(rng, 32, 24, [rank] * 3)
    expected = reference_update(factors, weights, scalings)

    # Execute
    svd = flexlora_aggregate(factors, weights, scalings)
    b, a = flexlora_redistribute(svd, svd.rank, scalings[0])

    # Assert
    assert svd.rank == 3 * rank
    np.testing.assert_allclose(scalings[0] * b @ a, expected, rtol=0, atol=1e-10)


def test_flexlora_max_rank_truncates_to_best_approximation() -> None:
    # Prepare
    rng = np.random.default_rng(3)
    ranks = [2, 4, 8]
    factors, weights, scalings = make_clients(rng, 30, 20, ranks)
    dense = dense_svd(reference_update(factors, weights, scalings))

    # Execute
    svd = flexlora_aggregate(factors, weights, scalings, max_rank=max(ranks))

    # Assert
    assert svd.rank == 8
    np.testing.assert_allclose(svd.s, dense.s[:8], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(svd.dense(), dense.truncate(8).dense(), rtol=0, atol=1e-10)


def test_flexlora_max_rank_above_available_keeps_everything() -> None:
    # Prepare: m = 3 limits the SVD to 3 triplets although max_rank = 8.
    rng = np.random.default_rng(4)
    factors, weights, scalings = make_clients(rng, 3, 10, [8, 2])

    # Execute
    svd = flexlora_aggregate(factors, weights, scalings, max_rank=8)

    # Assert
    assert svd.rank == 3
    np.testing.assert_allclose(
        svd.dense(), reference_update(factors, weights, scalings), rtol=0, atol=1e-10
    )


@given(
    m=st.integers(1, 40),
    n=st.integers(1, 40),
    ranks=st.lists(st.integers(1, 12), min_size=1, max_size=5),
    seed=st.integers(0, 2**32 - 1),
)
@settings(max_examples=150, deadline=None, derandomize=True)
def test_lowrank_svd_matches_dense_svd_at_every_truncation(
    m: int, n: int, ranks: list[int], seed: int
) -> None:
    # Prepare
    rng = np.random.default_rng(seed)
    factors, weights, scalings = make_clients(rng, m, n, ranks)
    update = stack_client_updates(factors, weights, scalings)
    dense_matrix = reference_update(factors, weights, scalings)
    scale = max(1.0, float(np.linalg.norm(dense_matrix)))

    # Execute
    low = lowrank_svd(update)
    ref = dense_svd(dense_matrix)

    # Assert: k = min(m, n, R) values equal, the remaining dense ones vanish.
    k = min(m, n, sum(ranks))
    assert low.rank == k
    assert low.u.shape == (m, k)
    assert low.vt.shape == (k, n)
    assert np.all(np.diff(low.s) <= 0)
    np.testing.assert_allclose(low.s, ref.s[:k], rtol=0, atol=1e-10 * scale)
    np.testing.assert_allclose(ref.s[k:], 0.0, rtol=0, atol=1e-10 * scale)
    np.testing.assert_allclose(low.u.T @ low.u, np.eye(k), rtol=0, atol=1e-10)
    np.testing.assert_allclose(low.vt @ low.vt.T, np.eye(k), rtol=0, atol=1e-10)
    for r in range(1, k + 1):
        np.testing.assert_allclose(
            low.truncate(r).dense(), ref.truncate(r).dense(), rtol=0, atol=1e-8 * scale
        )
        np.testing.assert_allclose(
            lowrank_svd(update, rank=r).dense(), low.truncate(r).dense(), rtol=0, atol=1e-12
        )


def test_lowrank_svd_with_inner_rank_above_min_dim_is_exact() -> None:
    # Prepare: R = 30 > min(m, n) = 5.
    rng = np.random.default_rng(5)
    factors, weights, scalings = make_clients(rng, 5, 12, [10, 10, 10])
    update = stack_client_updates(factors, weights, scalings)

    # Execute
    svd = lowrank_svd(update)

    # Assert
    assert svd.rank == 5
    np.testing.assert_allclose(svd.dense(), update.dense(), rtol=0, atol=1e-10)


def test_sign_convention_is_deterministic_and_shared_by_both_svds() -> None:
    # Prepare
    rng = np.random.default_rng(6)
    factors, weights, scalings = make_clients(rng, 12, 9, [3, 3])
    update = stack_client_updates(factors, weights, scalings)

    # Execute
    low = lowrank_svd(update)
    ref = dense_svd(update.dense(), rank=low.rank)

    # Assert
    cols = np.arange(low.rank)
    assert np.all(low.u[np.argmax(np.abs(low.u), axis=0), cols] > 0)
    np.testing.assert_allclose(low.u, ref.u, rtol=0, atol=1e-8)
    np.testing.assert_allclose(low.vt, ref.vt, rtol=0, atol=1e-8)
    again = lowrank_svd(update)
    np.testing.assert_array_equal(again.u, low.u)
    np.testing.assert_array_equal(again.vt, low.vt)


@pytest.mark.parametrize("r", [1, 3, 6])
def test_truncation_is_best_rank_r_approximation_eckart_young(r: int) -> None:
    # Prepare
    rng = np.random.default_rng(7)
    factors, weights, scalings = make_clients(rng, 20, 15, [4, 4, 4])
    update = stack_client_updates(factors, weights, scalings)
    dw = update.dense()
    s_dense = np.linalg.svd(dw, compute_uv=False)

    # Execute
    approx = lowrank_svd(update, rank=r).dense()
    err2 = float(np.linalg.norm(dw - approx) ** 2)

    # Assert: error^2 equals the discarded energy ...
    assert err2 == pytest.approx(float(np.sum(s_dense[r:] ** 2)), rel=1e-9)
    # ... and no random rank-r approximation does better.
    for _ in range(50):
        q, _ = np.linalg.qr(rng.standard_normal((20, r)))
        projection = q @ (q.T @ dw)  # best approximation within a random column space
        random_factored = rng.standard_normal((20, r)) @ rng.standard_normal((r, 15))
        assert np.linalg.norm(dw - projection) ** 2 >= err2 - 1e-9
        assert np.linalg.norm(dw - random_factored) ** 2 >= err2 - 1e-9


def test_flexlora_redistribute_reproduces_truncated_dense_update() -> None:
    # Prepare
    rng = np.random.default_rng(8)
    ranks = [2, 4, 8]
    factors, weights, scalings = make_clients(rng, 25, 18, ranks)
    svd = flexlora_aggregate(factors, weights, scalings, max_rank=8)
    dense = dense_svd(reference_update(factors, weights, scalings))

    for r, s in zip(ranks, scalings, strict=True):
        # Execute
        b, a = flexlora_redistribute(svd, r, s)

        # Assert
        assert b.shape == (25, r)
        assert a.shape == (r, 18)
        np.testing.assert_allclose(s * b @ a, dense.truncate(r).dense(), rtol=0, atol=1e-10)
        np.testing.assert_allclose(a @ a.T, np.eye(r), rtol=0, atol=1e-12)


def test_flexlora_redistribute_rank_too_large_raises_clear_message() -> None:
    # Prepare
    rng = np.random.default_rng(9)
    factors, weights, scalings = make_clients(rng, 10, 10, [2, 4])
    svd = flexlora_aggregate(factors, weights, scalings, max_rank=4)

    # Execute / Assert
    with pytest.raises(
        ValueError, match=r"client rank 8 exceeds the 4 singular triplets.*max_rank"
    ):
        flexlora_redistribute(svd, 8, lora_scaling(ALPHA, 8))
    with pytest.raises(ValueError, match="scaling"):
        flexlora_redistribute(svd, 2, 0.0)


def test_svd_truncate_rank_too_large_raises() -> None:
    # Prepare
    svd = dense_svd(np.arange(12.0).reshape(3, 4))

    # Execute / Assert
    with pytest.raises(ValueError, match="cannot truncate to rank 4: only 3"):
        svd.truncate(4)
    with pytest.raises(ValueError, match="rank"):
        svd.truncate(0)


# --------------------------------------------------------------------------- FedAvg


def test_fedavg_factors_zero_pads_heterogeneous_ranks() -> None:
    # Prepare
    rng = np.random.default_rng(10)
    factors, weights, _ = make_clients(rng, 7, 5, [1, 4, 2])

    # Execute
    b_avg, a_avg = fedavg_factors(factors, weights)

    # Assert
    assert b_avg.shape == (7, 4)
    assert a_avg.shape == (4, 5)
    expected_b = sum(
        p * np.pad(b, ((0, 0), (0, 4 - b.shape[1])))
        for (b, _), p in zip(factors, weights, strict=True)
    )
    expected_a = sum(
        p * np.pad(a, ((0, 4 - a.shape[0]), (0, 0)))
        for (_, a), p in zip(factors, weights, strict=True)
    )
    np.testing.assert_allclose(b_avg, expected_b, rtol=0, atol=1e-14)
    np.testing.assert_allclose(a_avg, expected_a, rtol=0, atol=1e-14)
    # Rank-3/4 columns come only from the rank-4 client.
    np.testing.assert_allclose(b_avg[:, 2:], weights[1] * factors[1][0][:, 2:], atol=1e-14)


def test_fedavg_factors_homogeneous_equals_elementwise_weighted_mean() -> None:
    # Prepare
    rng = np.random.default_rng(11)
    factors, weights, _ = make_clients(rng, 6, 8, [3, 3, 3])

    # Execute
    b_avg, a_avg = fedavg_factors(factors, weights)

    # Assert
    np.testing.assert_allclose(b_avg, weighted_mean([b for b, _ in factors], weights), atol=1e-14)
    np.testing.assert_allclose(a_avg, weighted_mean([a for _, a in factors], weights), atol=1e-14)
    np.testing.assert_allclose(
        b_avg, np.average([b for b, _ in factors], axis=0, weights=weights), atol=1e-14
    )


def test_fedavg_product_of_means_is_biased_unlike_flexlora() -> None:
    # Prepare
    rng = np.random.default_rng(12)
    factors, weights, _ = make_clients(rng, 10, 8, [2, 2, 2])
    mean_of_products = sum(p * (b @ a) for (b, a), p in zip(factors, weights, strict=True))

    # Execute
    b_avg, a_avg = fedavg_factors(factors, weights)
    flex = flexlora_aggregate(factors, weights, np.ones(3)).dense()

    # Assert
    bias = np.linalg.norm(b_avg @ a_avg - mean_of_products) / np.linalg.norm(mean_of_products)
    assert bias > 0.1
    np.testing.assert_allclose(flex, mean_of_products, rtol=0, atol=1e-10)


def test_fedavg_truncate_takes_leading_columns_and_rows() -> None:
    # Prepare
    rng = np.random.default_rng(13)
    factors, weights, _ = make_clients(rng, 7, 5, [2, 6])
    b_avg, a_avg = fedavg_factors(factors, weights)

    # Execute
    b, a = fedavg_truncate(b_avg, a_avg, 2)

    # Assert
    assert b.shape == (7, 2)
    assert a.shape == (2, 5)
    np.testing.assert_array_equal(b, b_avg[:, :2])
    np.testing.assert_array_equal(a, a_avg[:2])
    with pytest.raises(ValueError, match="rank 7 exceeds the averaged rank r_max = 6"):
        fedavg_truncate(b_avg, a_avg, 7)


def test_weighted_mean_of_head_parameters() -> None:
    # Prepare
    arrays = [np.full((2, 3), 1.0), np.full((2, 3), 4.0)]

    # Execute
    out = weighted_mean(arrays, [2 / 3, 1 / 3])

    # Assert
    np.testing.assert_allclose(out, np.full((2, 3), 2.0), atol=1e-15)


# --------------------------------------------------------------------------- shape errors


def test_mismatched_b_and_a_shapes_raise_with_both_shapes() -> None:
    # Prepare
    factors = [(np.ones((8, 4)), np.ones((3, 16)))]

    # Execute / Assert
    with pytest.raises(ValueError, match=r"\(8, 4\).*\(3, 16\)"):
        stack_client_updates(factors, [1.0], [1.0])
    with pytest.raises(ValueError, match=r"\(8, 4\).*\(3, 16\)"):
        fedavg_factors(factors, [1.0])


def test_clients_with_different_layer_shapes_raise_with_both_shapes() -> None:
    # Prepare
    factors = [(np.ones((8, 2)), np.ones((2, 16))), (np.ones((8, 2)), np.ones((2, 12)))]

    # Execute / Assert
    with pytest.raises(ValueError, match=r"\(8, 12\).*\(8, 16\)"):
        flexlora_aggregate(factors, [0.5, 0.5], [1.0, 1.0])
    with pytest.raises(ValueError, match=r"\(8, 12\).*\(8, 16\)"):
        fedavg_factors(factors, [0.5, 0.5])


def test_other_shape_mismatches_raise_with_both_shapes() -> None:
    # Prepare / Execute / Assert
    with pytest.raises(ValueError, match=r"\(5, 3\).*\(2, 4\)"):
        LowRankUpdate(np.ones((5, 3)), np.ones((2, 4)))
    with pytest.raises(ValueError, match=r"\(5, 3\).*\(2, 4\)"):
        fedavg_truncate(np.ones((5, 3)), np.ones((2, 4)), 1)
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(3, 2\)"):
        weighted_mean([np.ones((3, 2)), np.ones((2, 3))], [0.5, 0.5])
    with pytest.raises(ValueError, match=r"\(5, 2\).*\(3,\).*\(3, 4\)"):
        SVDFactors(np.ones((5, 2)), np.ones(3), np.ones((3, 4)))
    with pytest.raises(ValueError, match="2-D"):
        dense_svd(np.ones(4))
    with pytest.raises(ValueError, match="NaN or inf"):
        LowRankUpdate(np.full((2, 1), np.nan), np.ones((1, 2)))


# --------------------------------------------------------------------------- scalability


def test_lowrank_svd_never_forms_the_dense_matrix() -> None:
    # Prepare: a dense 4000 x 4000 float64 matrix would take 128 MB.
    rng = np.random.default_rng(14)
    m = n = 4000
    update = LowRankUpdate(rng.standard_normal((m, 8)), rng.standard_normal((8, n)))
    dense_bytes = m * n * 8

    # Execute
    tracemalloc.start()
    start = time.perf_counter()
    svd = lowrank_svd(update)
    elapsed = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()

    # Assert (numpy reports its buffers to tracemalloc)
    assert peak < dense_bytes / 8, f"peak traced memory {peak / 1e6:.1f} MB"
    assert elapsed < 2.0
    assert svd.rank == 8
    probe = rng.standard_normal(n)
    np.testing.assert_allclose(
        svd.u @ (svd.s * (svd.vt @ probe)), update.left @ (update.right @ probe), rtol=1e-9
    )
