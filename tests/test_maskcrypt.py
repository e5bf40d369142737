"""MaskCrypt baseline: scores, mask consensus, hybrid aggregation, budget matching, roles."""

import inspect

import numpy as np
import pytest

from shelora_core import FederatedConfig
from shelora_core.adapters import AdapterWeights
from shelora_core.ckks import KeyHolder
from shelora_core.messages import MessageError, decode, encode
from shelora_core.methods import ckks_params_for, get_method
from shelora_core.methods.budget import encrypted_values
from shelora_core.methods.maskcrypt import (
    MaskCrypt,
    consensus_mask,
    maskcrypt_budget,
    propose_mask,
    weight_scores,
)
from shelora_core.methods.packing import FactorLayout
from shelora_core.methods.shelora import public_column_order
from shelora_core.server import server_consensus, server_step

SHAPES = {"l0": (12, 10), "l1": (8, 10)}
SIZES = [10, 20, 70]


@pytest.fixture(scope="module")
def keys():
    return {name: KeyHolder.generate(name) for name in ("add_only", "fedshield")}


def _adapters(ranks, seed):
    rng = np.random.default_rng(seed)
    return [
        AdapterWeights(
            rank=r,
            alpha=16.0,
            factors={
                k: (
                    rng.normal(0, 0.1, (m, r)).astype(np.float32),
                    rng.normal(0, 0.1, (r, n)).astype(np.float32),
                )
                for k, (m, n) in SHAPES.items()
            },
            head={"weight": np.full((2, 3), float(i), np.float32)},
        )
        for i, r in enumerate(ranks)
    ]


def _maskcrypt_round(cfg, kh, seed=0):
    """Proposals -> consensus -> uploads -> server_step (public context) -> broadcast."""
    method = get_method("maskcrypt", cfg)
    trained, start, grads = (_adapters(cfg.client_ranks, seed + j) for j in range(3))
    props = [
        encode(method.make_proposal(w, w0, g.factors, round_=1, client_id=i))
        for i, (w, w0, g) in enumerate(zip(trained, start, grads, strict=True))
    ]
    cons = server_consensus(cfg, props, round_=1)
    ups = [
        encode(
            method.make_upload(
                w,
                round_=1,
                client_id=i,
                num_examples=n,
                crypto=kh.client(),
                columns=decode(cons, expect_kind="mask_consensus"),
            )
        )
        for i, (w, n) in enumerate(zip(trained, SIZES[: len(trained)], strict=True))
    ]
    bc = server_step(cfg, ups, round_=1, crypto=kh.server(), consensus=cons)
    return method, trained, props, cons, ups, decode(bc, expect_kind="broadcast")


def test_factor_layout_flattens_zero_padded_factors_and_back():
    layout = FactorLayout.build(SHAPES, r_max=4)
    w = _adapters((2,), 0)[0]
    flat = layout.flatten(w.factors)
    assert flat.size == layout.size == 4 * (12 + 10) + 4 * (8 + 10)
    back = layout.unflatten(flat)
    for k, (b, a) in w.factors.items():
        np.testing.assert_array_equal(back[k][0][:, :2], b)
        np.testing.assert_array_equal(back[k][1][:2], a)
        assert not back[k][0][:, 2:].any() and not back[k][1][2:].any()
    assert layout.own_entries(2).sum() == 2 * (12 + 10 + 8 + 10)
    assert layout.layer_counts(np.arange(layout.size)) == {"l0": 88, "l1": 72}


def test_scores_are_gradient_times_distance_to_the_adversary_estimate():
    # Prepare: one layer, rank 1 of r_max 2; hand-picked update and gradient
    layout = FactorLayout.build({"l": (2, 2)}, r_max=2)
    w = AdapterWeights(1, 16.0, {"l": (np.array([[1.0], [2.0]]), np.array([[3.0, 4.0]]))}, {})
    est = AdapterWeights(1, 16.0, {"l": (np.array([[0.0], [2.0]]), np.array([[1.0, 4.5]]))}, {})
    grads = {"l": (np.array([[5.0], [7.0]]), np.array([[-1.0, 2.0]]))}
    # Execute
    score = weight_scores(w, est, grads, layout)
    # Assert: B entries (0, 0), (1, 0), then A entries (0, 0), (0, 1); padding is never a candidate
    b_scores = score[:4].reshape(2, 2)
    a_scores = score[4:].reshape(2, 2)
    np.testing.assert_array_equal(b_scores[:, 0], [5.0, 0.0])
    np.testing.assert_array_equal(a_scores[0], [2.0, 1.0])
    assert np.isneginf(b_scores[:, 1]).all() and np.isneginf(a_scores[1]).all()
    np.testing.assert_array_equal(propose_mask(score, 3), [0, 4, 5])
    np.testing.assert_array_equal(propose_mask(score, 10), [0, 4, 5, 2])  # all own entries
    np.testing.assert_array_equal(propose_mask(np.array([1.0, 3.0, 1.0, 1.0]), 2), [1, 0])


def test_consensus_is_the_rank_ordered_union_cut_to_the_largest_budget():
    mask, union = consensus_mask([np.array([5, 1, 9]), np.array([1, 7]), np.array([2])], limit=4)
    assert union == 5  # rank 1: 5, 1, 2; rank 2: (1), 7; rank 3: 9
    np.testing.assert_array_equal(mask, [5, 1, 2, 7])
    mask, union = consensus_mask([np.array([3, 4]), np.array([4, 3])], limit=5)
    assert union == 2
    np.testing.assert_array_equal(mask, [3, 4])


@pytest.mark.parametrize(("mode", "params"), [("delta", "add_only"), ("paper", "fedshield")])
def test_hybrid_aggregate_equals_plaintext_weighted_mean_within_ckks_error(keys, mode, params):
    # Prepare: heterogeneous ranks and budgets; FedAvg (zero-padded factors) is the reference
    cfg = FederatedConfig(
        method="maskcrypt", cipher_mode=mode, num_clients=3, ranks=(2, 4, 4), he_budgets=(1, 2, 3)
    )
    assert ckks_params_for(cfg) == params
    # Execute
    method, trained, _, cons, _, bc = _maskcrypt_round(cfg, keys[params])
    # Assert: the decrypted hybrid sum is sum_i p_i pad(w_i) ...
    p = np.array(SIZES) / sum(SIZES)
    layout = FactorLayout.build(SHAPES, r_max=4)
    want = sum(pi * layout.flatten(w.factors) for pi, w in zip(p, trained, strict=True))
    got = method.client_weights(bc, rank=4, alpha=16.0, crypto=keys[params].client())
    np.testing.assert_allclose(layout.flatten(got.factors), want, atol=1e-6)
    # ... and every client's adapter equals plaintext FedAvg's
    ref_cfg = cfg.replace(method="fedavg")
    ref = get_method("fedavg", ref_cfg)
    ref_ups = [
        encode(ref.make_upload(w, round_=1, client_id=i, num_examples=n))
        for i, (w, n) in enumerate(zip(trained, SIZES, strict=True))
    ]
    ref_bc = decode(server_step(ref_cfg, ref_ups, round_=1), expect_kind="broadcast")
    for r in (2, 4):
        mine = method.client_weights(bc, rank=r, alpha=16.0, crypto=keys[params].client())
        theirs = ref.client_weights(ref_bc, rank=r, alpha=16.0)
        for layer in SHAPES:
            for x, y in zip(mine.factors[layer], theirs.factors[layer], strict=True):
                np.testing.assert_allclose(x, y, atol=1e-6)
    np.testing.assert_allclose(got.head["weight"], sum(i * pi for i, pi in enumerate(p)))
    assert decode(cons).header["union_size"] >= decode(cons).tensors["mask"].size


@pytest.mark.parametrize("mode", ["delta", "paper"])
def test_maskcrypt_encrypts_exactly_shelora_budget_in_values(keys, mode):
    # Prepare
    params = "add_only" if mode == "delta" else "fedshield"
    base = dict(num_clients=3, ranks=(2, 4, 4), he_budgets=(1, 2, 3), cipher_mode=mode)
    cfg = FederatedConfig(method="maskcrypt", **base)
    she = FederatedConfig(method="shelora", **base)
    # Execute
    _, trained, props, cons, ups, bc = _maskcrypt_round(cfg, keys[params])
    # Assert: E_i = SHE-LoRA's count, by hand: delta k_i x (12 + 8), paper k_i x r_i x 2 layers
    by_hand = [k * 20 for k in (1, 2, 3)] if mode == "delta" else [4, 16, 24]
    consensus = decode(cons).tensors["mask"]
    slots = keys[params].client().slots
    for i, up in enumerate(ups):
        assert maskcrypt_budget(cfg, i, SHAPES) == encrypted_values(she, i, SHAPES)
        assert encrypted_values(she, i, SHAPES) == by_hand[i]
        h = decode(up).header
        assert h["encrypted_values"] == by_hand[i] == decode(props[i]).header["budget"]
        assert h["ciphertexts"] == -(-by_hand[i] // slots)
        # the encrypted entries are zero in the plaintext part, every other entry is sent as is
        plain = FactorLayout.build(SHAPES, 4).flatten(
            {k: (decode(up).tensors[f"{k}|B"], decode(up).tensors[f"{k}|A"]) for k in SHAPES}
        )
        full = FactorLayout.build(SHAPES, 4).flatten(trained[i].factors)
        mine = consensus[: by_hand[i]]
        assert not plain[mine].any()
        rest = np.setdiff1d(np.arange(full.size), mine)
        np.testing.assert_array_equal(plain[rest], full[rest])
    assert bc.header["encrypted_values"] == max(by_hand)


def test_shelora_delta_upload_holds_its_budget_in_ciphertext_slots(keys):
    cfg = FederatedConfig(method="shelora", num_clients=1, ranks=(2,), he_budgets=(3,))
    up = get_method("shelora", cfg).make_upload(
        _adapters((2,), 0)[0],
        round_=1,
        client_id=0,
        num_examples=5,
        crypto=keys["add_only"].client(),
        columns=public_column_order(
            {k: np.ones(s) for k, s in SHAPES.items()}, 3, order="random", seed=0
        ),
    )
    e = encrypted_values(cfg, 0, SHAPES)
    assert e == 3 * (12 + 8)
    assert up.header["ciphertexts"] == -(-e // keys["add_only"].client().slots)


def test_maskcrypt_server_holds_only_the_public_context_and_never_decrypts(keys):
    cfg = FederatedConfig(method="maskcrypt", num_clients=2, ranks=(2, 4), he_budgets=(1, 2))
    server = keys["add_only"].server()
    assert not server.context.is_private()
    with pytest.raises(PermissionError):
        server.decrypt([], 0)
    # the server-side steps run on the public context and have no decrypt call in them
    _maskcrypt_round(cfg, keys["add_only"])
    for fn in (MaskCrypt.server_aggregate, MaskCrypt.server_consensus):
        assert "decrypt" not in inspect.getsource(fn)


def test_upload_built_on_another_consensus_is_refused(keys):
    cfg = FederatedConfig(method="maskcrypt", num_clients=2, ranks=(2, 4), he_budgets=(1, 2))
    _, _, props, cons, ups, _ = _maskcrypt_round(cfg, keys["add_only"])
    other = decode(cons)
    other.tensors["mask"] = other.tensors["mask"][::-1].copy()
    other.header["digest"] = "0" * 16
    with pytest.raises(MessageError, match="another mask"):
        server_step(cfg, ups, round_=1, crypto=keys["add_only"].server(), consensus=encode(other))
    with pytest.raises(ValueError, match="mask consensus"):
        server_step(cfg, ups, round_=1, crypto=keys["add_only"].server())
