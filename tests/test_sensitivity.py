"""Tests of shelora_core.sensitivity: column scores, top-k proposals and hooked activation norms."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shelora_core.sensitivity import (
    VARIANTS,
    activation_norms,
    calibration_indices,
    client_sensitivity,
    column_scores,
    massive_features,
    propose,
    propose_with_scores,
    topk_overlap,
)

SENTENCES = [
    "The movie was wonderful.",
    "I did not like this film at all, it was far too long and boring.",
    "Great acting.",
    "A mediocre plot with a surprisingly strong ending that made it worth it.",
    "Terrible.",
    "Some scenes were fine, others were not.",
]

# A with mixed signs: column sums cancel in column 1 and 2.
A = np.array([[1.0, -2.0, 0.5, 3.0], [2.0, 2.0, -0.5, -1.0]])
NORMS = np.array([1.0, 2.0, 4.0, 0.5])


# ---------------------------------------------------------------------------- pure numpy
def test_column_scores_abs_sum_by_hand():
    # sum_k |A_kj| = [3, 4, 1, 4]; times norms [1, 2, 4, .5] -> [3, 8, 4, 2]
    s = column_scores(A, NORMS)
    np.testing.assert_allclose(s, [3.0, 8.0, 4.0, 2.0])
    assert s.dtype == np.float64
    assert propose(s, 4).tolist() == [1, 2, 0, 3]
    idx, sc = propose_with_scores(s, 2)
    assert idx.tolist() == [1, 2]
    np.testing.assert_allclose(sc, [8.0, 4.0])


def test_column_scores_authors_by_hand():
    # |sum_k A_kj| = [3, 0, 0, 2]; times norms -> [3, 0, 0, 1]; tie (1, 2) -> lower index first
    s = column_scores(A, NORMS, variant="authors")
    np.testing.assert_allclose(s, [3.0, 0.0, 0.0, 1.0])
    assert propose(s, 4).tolist() == [0, 3, 1, 2]


def test_variants_differ_only_with_mixed_signs():
    assert (
        propose(column_scores(A, NORMS), 2).tolist()
        != propose(column_scores(A, NORMS, variant="authors"), 2).tolist()
    )
    same_sign = np.abs(A) * np.array([[1.0], [1.0]])
    np.testing.assert_allclose(
        column_scores(same_sign, NORMS), column_scores(same_sign, NORMS, variant="authors")
    )
    negative = -np.abs(A)
    np.testing.assert_allclose(
        column_scores(negative, NORMS), column_scores(negative, NORMS, variant="authors")
    )


def test_column_scores_validates_shapes_and_variant():
    with pytest.raises(ValueError, match=r"\(2, 4\).*\(3,\)"):
        column_scores(A, NORMS[:3])
    with pytest.raises(ValueError, match="shape mismatch"):
        column_scores(A[0], NORMS)
    with pytest.raises(ValueError, match="abs_sum.*authors"):
        column_scores(A, NORMS, variant="sum_abs")
    assert VARIANTS == ("abs_sum", "authors")


def test_propose_edge_cases():
    s = np.array([1.0, 5.0, 5.0, 0.0, 5.0])
    assert propose(s, 0).tolist() == []
    assert propose(s, 0).dtype == np.int64
    assert propose(s, 3).tolist() == [1, 2, 4]  # ties: lower index first
    assert propose(s, 5).tolist() == [1, 2, 4, 0, 3]
    with pytest.raises(ValueError, match=r"budget k=6 exceeds the layer width n=5; lower the HE"):
        propose(s, 6)
    with pytest.raises(ValueError, match="k must be >= 0"):
        propose(s, -1)
    with pytest.raises(ValueError, match="NaN"):
        propose(np.array([1.0, np.nan]), 1)


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.integers(0, 5), min_size=1, max_size=30).map(lambda v: np.array(v, float)),
    st.data(),
)
def test_propose_matches_sorted_order(scores, data):
    k = data.draw(st.integers(0, len(scores)))
    idx, sc = propose_with_scores(scores, k)
    expected = sorted(range(len(scores)), key=lambda j: (-scores[j], j))[:k]
    assert idx.tolist() == expected
    np.testing.assert_array_equal(sc, scores[expected])


def test_massive_features_and_overlap():
    norms = np.array([1.0, 10.0, 1.0, 2.0])
    mf = massive_features(norms, top=2)
    assert mf["indices"].tolist() == [1, 3]
    assert mf["share"] == pytest.approx(104 / 106)
    assert mf["uniform_share"] == 0.5
    assert massive_features(norms, top=10)["share"] == pytest.approx(1.0)
    assert topk_overlap([1, 2, 3, 4], [3, 4, 5, 6]) == 0.5
    assert topk_overlap([], []) == 1.0
    assert topk_overlap([1, 2], [3, 4]) == 0.0


def test_calibration_indices_seeded():
    a = calibration_indices(100, 10, seed=0)
    assert len(set(a.tolist())) == 10 and a.min() >= 0 and a.max() < 100
    np.testing.assert_array_equal(a, calibration_indices(100, 10, seed=0))
    assert not np.array_equal(a, calibration_indices(100, 10, seed=1))
    np.testing.assert_array_equal(calibration_indices(5, 128), np.arange(5))


# ---------------------------------------------------------------------------- with MiniLM
@pytest.fixture(scope="module")
def client_data():
    from shelora_core.assets import load_tokenizer
    from shelora_core.data import ClientData

    tok = load_tokenizer("minilm")
    enc = tok(SENTENCES, padding=True, return_tensors="pt")
    return ClientData(
        input_ids=enc["input_ids"],
        attention_mask=enc["attention_mask"],
        labels=torch.tensor([1, 0, 1, 1, 0, 0]),
    )


def _manual_layer0_norms(model, data, idx=None) -> np.ndarray:
    """||X_j|| of the first query's input: the BERT embeddings output on non-padding tokens."""
    ids, mask = data.input_ids, data.attention_mask
    if idx is not None:
        ids, mask = ids[idx], mask[idx]
    bert = model.model.base_model.model.bert
    bert.eval()
    with torch.no_grad():
        h = bert.embeddings(input_ids=ids).double()
    h = h[mask.bool()]
    return torch.sqrt((h**2).sum(0)).numpy()


def _fresh_weights(model, rank=4, seed=0):
    w = model.init_weights(rank, seed=seed)
    rng = np.random.default_rng(seed)
    for name, (b, a) in w.factors.items():  # nonzero B: the adapters change deeper activations
        w.factors[name] = (rng.normal(0, 0.05, b.shape).astype(np.float32), a)
    return w


def test_activation_norms_layer0_exact(minilm_model, client_data):
    model = minilm_model
    model.load(_fresh_weights(model))
    norms = activation_norms(model, client_data, batch_size=4)
    first = model.layer_names[0]
    assert set(norms) == set(model.layer_names)
    for name, (_m, n) in model.layer_shapes.items():
        assert norms[name].shape == (n,) and norms[name].dtype == np.float64
    expected = _manual_layer0_norms(model, client_data)
    np.testing.assert_allclose(norms[first], expected, rtol=1e-5, atol=1e-5)
    # Sanity: counting padding tokens would give a different answer (the mask matters here).
    bert = model.model.base_model.model.bert
    with torch.no_grad():
        all_tok = bert.embeddings(input_ids=client_data.input_ids).double().reshape(-1, 384)
    naive = torch.sqrt((all_tok**2).sum(0)).numpy()
    assert not np.allclose(naive, expected, rtol=1e-3)


def test_activation_norms_ignore_padding_and_batch_size(minilm_model, client_data):
    from shelora_core.data import ClientData

    model = minilm_model
    model.load(_fresh_weights(model))
    mode = model.model.training
    ref = activation_norms(model, client_data, batch_size=1)  # no padding at all after trimming
    extra = 7
    padded = ClientData(
        input_ids=torch.cat(
            [client_data.input_ids, torch.zeros(6, extra, dtype=torch.long)], dim=1
        ),
        attention_mask=torch.cat(
            [client_data.attention_mask, torch.zeros(6, extra, dtype=torch.long)], dim=1
        ),
        labels=client_data.labels,
    )
    for data, bs in ((client_data, 6), (client_data, 4), (padded, 6), (padded, 2)):
        got = activation_norms(model, data, batch_size=bs)
        for name in model.layer_names:
            np.testing.assert_allclose(got[name], ref[name], rtol=1e-5, atol=1e-5)
    assert model.model.training == mode  # the caller's train/eval mode is restored


def test_activation_norms_restores_mode_and_hooks(minilm_model, client_data):
    model = minilm_model
    model.model.train()
    try:
        activation_norms(model, client_data, num_examples=2)
        assert model.model.training
        for mod in model._lora_modules.values():
            assert not mod._forward_pre_hooks
    finally:
        model.model.eval()


def test_activation_norms_seeded_subset(minilm_model, client_data):
    model = minilm_model
    model.load(_fresh_weights(model))
    first = model.layer_names[0]
    a = activation_norms(model, client_data, num_examples=3, seed=0)
    b = activation_norms(model, client_data, num_examples=3, seed=0, batch_size=2)
    np.testing.assert_allclose(a[first], b[first], rtol=1e-6)
    idx = torch.from_numpy(calibration_indices(len(client_data), 3, seed=0))
    np.testing.assert_allclose(
        a[first], _manual_layer0_norms(model, client_data, idx), rtol=1e-5, atol=1e-5
    )
    seeds = [
        s
        for s in range(1, 20)
        if not np.array_equal(calibration_indices(6, 3, seed=s), idx.numpy())
    ]
    c = activation_norms(model, client_data, num_examples=3, seed=seeds[0])
    assert not np.allclose(a[first], c[first])


def test_client_sensitivity_proposals(minilm_model, client_data):
    model = minilm_model
    w = _fresh_weights(model, rank=2, seed=3)
    budget = 5
    out = client_sensitivity(model, w, client_data, budget=budget, num_examples=4)
    assert set(out) == set(model.layer_names)
    norms = activation_norms(model, client_data, num_examples=4)
    for name, (idx, sc) in out.items():
        n = model.layer_shapes[name][1]
        assert idx.shape == (budget,) and len(set(idx.tolist())) == budget
        assert idx.min() >= 0 and idx.max() < n
        assert np.all(np.diff(sc) <= 0)
        expected = propose(column_scores(w.factors[name][1], norms[name]), budget)
        assert idx.tolist() == expected.tolist()
    assert model.active_rank == 2
    np.testing.assert_array_equal(model.read().factors[name][0], w.factors[name][0])
    authors = client_sensitivity(model, w, client_data, budget=0, variant="authors")
    assert all(len(i) == 0 for i, _ in authors.values())


def test_client_sensitivity_errors(minilm_model, client_data):
    w = _fresh_weights(minilm_model, rank=2)
    with pytest.raises(ValueError, match="abs_sum.*authors"):
        client_sensitivity(minilm_model, w, client_data, budget=2, variant="wanda")
    with pytest.raises(ValueError, match="budget k=1000 exceeds the layer width n=384"):
        client_sensitivity(minilm_model, w, client_data, budget=1000)
