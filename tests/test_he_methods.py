"""Encrypted methods: SHE-LoRA (both cipher modes), FedShield-LLM, full HE."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shelora_core import FederatedConfig
from shelora_core.aggregation import lora_scaling
from shelora_core.ckks import KeyHolder
from shelora_core.errors import RoundError
from shelora_core.lora import AdapterWeights
from shelora_core.messages import decode, encode
from shelora_core.methods import get_method
from shelora_core.methods.shelora import public_column_order
from shelora_core.pruning import l1_unstructured, prune_ratio
from shelora_core.server import server_step

SHAPES = {"l0": (12, 10), "l1": (8, 10)}
HEAD = {"weight": np.zeros((2, 12), np.float32)}


@pytest.fixture(scope="module")
def keys():
    return {name: KeyHolder.generate(name) for name in ("add_only", "fedshield", "paper_mm")}


def _adapters(ranks, seed=0):
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
            head={k: v + i for k, v in HEAD.items()},
        )
        for i, r in enumerate(ranks)
    ]


def _round(cfg, adapters, sizes, kh, columns=None):
    """Client uploads -> server_step (public context only) -> decoded broadcast."""
    method = get_method(cfg.method, cfg)
    client = kh.client() if kh is not None else None
    ups = [
        encode(
            method.make_upload(
                w, round_=1, client_id=i, num_examples=n, crypto=client, columns=columns
            )
        )
        for i, (w, n) in enumerate(zip(adapters, sizes, strict=True))
    ]
    server = kh.server() if kh is not None else None
    return (
        method,
        decode(server_step(cfg, ups, round_=1, crypto=server), expect_kind="broadcast"),
        ups,
    )


def _dw(w, layer):
    b, a = w.factors[layer]
    return lora_scaling(w.alpha, w.rank) * b.astype(np.float64) @ a


@settings(max_examples=6, deadline=None, derandomize=True)
@given(
    ranks=st.lists(st.sampled_from([1, 2, 4]), min_size=1, max_size=3),
    budgets=st.lists(st.integers(0, 5), min_size=1, max_size=3),
    seed=st.integers(0, 100),
)
def test_shelora_delta_equals_flexlora_within_ckks_error(keys, ranks, budgets, seed):
    # Prepare: heterogeneous ranks and budgets (cyclic), random columns G
    n_clients = len(ranks)
    budgets = (budgets * n_clients)[:n_clients] if max(budgets) > 0 else [0] * n_clients
    base = dict(num_clients=n_clients, ranks=tuple(ranks), he_budgets=tuple(budgets))
    she = FederatedConfig(method="shelora", cipher_mode="delta", **base)
    flex = FederatedConfig(method="flexlora", **base)
    adapters = _adapters(ranks, seed)
    sizes = list(np.random.default_rng(seed).integers(5, 50, n_clients))
    cols = public_column_order(
        {k: np.random.default_rng(seed).normal(size=s) for k, s in SHAPES.items()},
        max(budgets),
        order="random",
        seed=seed,
    )
    # Execute
    m_she, bc_she, _ = _round(she, adapters, sizes, keys["add_only"], cols)
    m_flex, bc_flex, _ = _round(flex, adapters, sizes, None)
    # Assert: every client's reparameterized adapter gives the same dW as FlexLoRA's
    for r in set(ranks):
        a = m_she.client_weights(bc_she, rank=r, alpha=16.0, crypto=keys["add_only"].client())
        b = m_flex.client_weights(bc_flex, rank=r, alpha=16.0)
        for layer in SHAPES:
            ref = _dw(b, layer)
            np.testing.assert_allclose(_dw(a, layer), ref, atol=1e-5 * max(1, np.abs(ref).max()))


def test_shelora_paper_mode_equals_flexlora_within_ckks_error(keys):
    ranks, budgets = (2, 4), (1, 3)
    she = FederatedConfig(
        method="shelora", cipher_mode="paper", num_clients=2, ranks=ranks, he_budgets=budgets
    )
    flex = she.replace(method="flexlora")
    adapters = _adapters(ranks, 3)
    cols = {k: list(range(3)) for k in SHAPES}
    m_she, bc_she, _ = _round(she, adapters, [10, 30], keys["paper_mm"], cols)
    m_flex, bc_flex, _ = _round(flex, adapters, [10, 30], None)
    for r in ranks:
        a = m_she.client_weights(bc_she, rank=r, alpha=16.0, crypto=keys["paper_mm"].client())
        b = m_flex.client_weights(bc_flex, rank=r, alpha=16.0)
        for layer in SHAPES:
            np.testing.assert_allclose(_dw(a, layer), _dw(b, layer), atol=1e-5)


def test_shelora_plaintext_upload_hides_the_protected_columns(keys):
    cfg = FederatedConfig(method="shelora", num_clients=1, ranks=(4,), he_budgets=(3,))
    cols = {k: [7, 2, 5] for k in SHAPES}
    _, _, ups = _round(cfg, _adapters((4,)), [10], keys["add_only"], cols)
    msg = decode(ups[0])
    for layer in SHAPES:
        a_plain = msg.tensors[f"{layer}|A"]
        assert not a_plain[:, [7, 2, 5]].any() and a_plain[:, [0, 1]].any()
    assert msg.header["ciphertexts"] >= 1 and msg.header["columns"] == cols


def test_authors_weighting_is_selectable_and_differs_from_the_correct_one(keys):
    base = dict(method="shelora", num_clients=2, ranks=(2, 2), he_budgets=(2, 2))
    cols = {k: [0, 1] for k in SHAPES}
    adapters = _adapters((2, 2), 1)
    out = []
    for authors in (False, True):
        cfg = FederatedConfig(authors_weighting=authors, **base)
        m, bc, _ = _round(cfg, adapters, [10, 10], keys["add_only"], cols)
        out.append(m.client_weights(bc, rank=2, alpha=16.0, crypto=keys["add_only"].client()))
    assert not np.allclose(_dw(out[0], "l0"), _dw(out[1], "l0"))


def test_server_cannot_decrypt_and_holds_no_secret_key(keys):
    server = keys["add_only"].server()
    assert not server.context.is_private()
    with pytest.raises(PermissionError):
        server.decrypt([], 0)


def test_upload_under_another_key_is_refused_by_fingerprint(keys):
    cfg = FederatedConfig(method="shelora", num_clients=1, ranks=(2,), he_budgets=(1,))
    method = get_method("shelora", cfg)
    other = KeyHolder.generate("add_only")
    up = encode(
        method.make_upload(
            _adapters((2,))[0],
            round_=1,
            client_id=0,
            num_examples=5,
            crypto=other.client(),
            columns={k: [0] for k in SHAPES},
        )
    )
    with pytest.raises(RoundError, match="another key"):
        server_step(cfg, [up], round_=1, crypto=keys["add_only"].server())


@pytest.mark.parametrize("weighted", [True, False])
def test_fedshield_mean_equals_plaintext_mean(keys, weighted):
    cfg = FederatedConfig(
        method="full_he", num_clients=3, ranks=(2, 2, 4), fedshield_weighted=weighted
    )
    adapters = _adapters((2, 2, 4), 5)
    sizes = [10, 20, 70]
    m, bc, _ = _round(cfg, adapters, sizes, keys["fedshield"])
    p = np.array(sizes) / 100 if weighted else np.full(3, 1 / 3)
    got = m.client_weights(bc, rank=4, alpha=16.0, crypto=keys["fedshield"].client())
    for layer, (mm, _) in SHAPES.items():
        b_ref = np.zeros((mm, 4))
        for pi, w in zip(p, adapters, strict=True):
            b_ref[:, : w.rank] += pi * w.factors[layer][0]
        np.testing.assert_allclose(got.factors[layer][0], b_ref, atol=1e-6)
    np.testing.assert_allclose(got.head["weight"], sum(pi * i for i, pi in enumerate(p)), atol=1e-6)


def test_full_he_clients_encrypt_their_own_rank_only(keys):
    from shelora_core.methods.packing import ComponentLayout

    # Prepare: ranks 2 and 32 of 64-row layers: the rank-2 client fills one ciphertext
    shapes = {"a": (64, 48), "b": (64, 48)}
    layout = ComponentLayout.build(shapes, 32)
    rng = np.random.default_rng(3)
    facs = {k: (rng.normal(size=(m, 2)), rng.normal(size=(2, n))) for k, (m, n) in shapes.items()}

    # Act
    flat = layout.flatten(facs)
    back = layout.unflatten(flat)
    cfg = FederatedConfig(method="full_he", num_clients=2, ranks=(2, 32))
    m = get_method("full_he", cfg)
    ups = [m.make_upload(AdapterWeights(r, 16.0, {k: (np.ones((mm, r)), np.ones((r, n)))
                                                  for k, (mm, n) in shapes.items()}, {}),
                         round_=1, client_id=i, num_examples=5, crypto=keys["fedshield"].client())
           for i, r in enumerate((2, 32))]  # fmt: skip

    # Assert: a prefix of 2 x (64 + 48) x 2 values, the rest of the layout zero
    assert flat.size == layout.prefix(2) == 2 * 2 * (64 + 48)
    for k in shapes:
        np.testing.assert_array_equal(back[k][0][:, :2], facs[k][0])
        np.testing.assert_array_equal(back[k][1][:2], facs[k][1])
        assert not back[k][0][:, 2:].any() and not back[k][1][2:].any()
    slots = keys["fedshield"].client().slots
    assert [u.header["ciphertexts"] for u in ups] == [
        -(-layout.prefix(r) // slots) for r in (2, 32)
    ]
    assert ups[0].header["ciphertexts"] < ups[1].header["ciphertexts"]


@pytest.mark.parametrize(
    ("rnd", "ratio"), [(0, 0.0), (39, 0.0), (40, 0.2), (120, 0.35), (200, 0.5), (300, 0.5)]
)
def test_fedshield_pruning_schedule(rnd, ratio):
    assert prune_ratio(rnd) == pytest.approx(ratio)


def test_l1_unstructured_zeroes_the_smallest_fraction():
    x = np.array([[0.5, -0.1], [0.05, -2.0]])
    np.testing.assert_array_equal(l1_unstructured(x, 0.5), [[0.5, 0.0], [0.0, -2.0]])
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        l1_unstructured(x, 1.0)


def test_federation_gives_the_server_only_the_public_context(tiny_config, minilm_model, tmp_path):
    from shelora_core.federation import Federation

    cfg = tiny_config.replace(method="shelora", he_budgets=(1, 2), rounds=1)
    fed = Federation(cfg, results_dir=tmp_path, model=minilm_model)
    assert fed.client_crypto.context.is_private()
    assert not fed.server_crypto.context.is_private()
    with pytest.raises(PermissionError, match="no secret key"):
        fed.server_crypto.decrypt([], 0)
    h = fed.run().history[0]
    assert h["key_bytes_public"] == len((fed.role_dir("server") / "public.ctx").read_bytes())
    flex = Federation(
        cfg.replace(method="flexlora"), results_dir=tmp_path, model=minilm_model
    ).run()
    assert h["upload_bytes"] > flex.history[0]["upload_bytes"]
    assert h["train_loss"] == pytest.approx(flex.history[0]["train_loss"], abs=1e-6)


def test_upload_with_a_ciphertext_count_that_does_not_match_the_layout_is_refused(keys):
    from shelora_core.messages import MessageError

    cfg = FederatedConfig(method="shelora", num_clients=1, ranks=(2,), he_budgets=(2,))
    method = get_method("shelora", cfg)
    msg = method.make_upload(
        _adapters((2,))[0],
        round_=1,
        client_id=0,
        num_examples=5,
        crypto=keys["add_only"].client(),
        columns={k: [0, 1] for k in SHAPES},
    )
    msg.tensors["enc|1"] = msg.tensors["enc|0"]
    msg.header["ciphertexts"] = 2
    with pytest.raises(
        MessageError, match=r"carries 2 ciphertexts \(header: 2\); its budget 2 .* need 1"
    ):
        server_step(cfg, [encode(msg)], round_=1, crypto=keys["add_only"].server())


def test_shelora_negotiates_its_columns_before_round_one_and_resume_reuses_them(
    tiny_config, minilm_model, tmp_path
):
    import ast
    from pathlib import Path

    from shelora_core.federation import Federation

    cfg = tiny_config.replace(
        method="shelora", he_budgets=(1, 3), rounds=1, calibration_examples=16
    )
    fed = Federation(cfg, results_dir=tmp_path, model=minilm_model)
    res = fed.run()
    neg = res.meta["negotiation"]
    assert neg["proposal_bytes_per_client"] > 0 and neg["broadcast_bytes"] > 0
    for layer, cols in fed.columns.items():
        assert len(cols) == 3 and len(set(cols)) == 3
        assert all(0 <= c < minilm_model.layer_shapes[layer][1] for c in cols)
    again = Federation(cfg, results_dir=tmp_path, model=minilm_model)
    again.run()
    assert again.columns == fed.columns
    # the server side of the negotiation never touches the OPE module (it cannot hold the key)
    src = Path(__file__).parents[1] / "shelora_core" / "negotiation.py"
    names = {
        a.name
        for n in ast.walk(ast.parse(src.read_text()))
        if isinstance(n, (ast.Import, ast.ImportFrom))
        for a in n.names
    }
    mods = {n.module for n in ast.walk(ast.parse(src.read_text())) if isinstance(n, ast.ImportFrom)}
    assert not any("ope" == (m or "").rsplit(".", 1)[-1] or "pyope" in (m or "") for m in mods)
    assert "pyope" not in names


def test_withhold_ablation_averages_each_column_over_the_clients_that_sent_it(keys):
    # Prepare: budgets 1 and 2 over G = [3, 5]: nobody sends column 3, only client 0 sends 5
    base = dict(num_clients=2, ranks=(2, 4), he_budgets=(1, 2))
    cfg = FederatedConfig(method="shelora", shelora_protect="withhold", **base)
    adapters, sizes, cols = _adapters((2, 4), 7), [10, 30], {k: [3, 5] for k in SHAPES}
    # Execute: no CKKS at all
    m, bc, ups = _round(cfg, adapters, sizes, None, cols)
    # Assert: the broadcast dW by hand
    p = np.array(sizes) / 40
    for layer in SHAPES:
        want = sum(pi * _dw(w, layer) for pi, w in zip(p, adapters, strict=True))
        want[:, 3] = 0.0
        want[:, 5] = _dw(adapters[0], layer)[:, 5]
        u, s, vt = (bc.tensors[f"{layer}|{x}"].astype(np.float64) for x in ("U", "S", "Vt"))
        np.testing.assert_allclose((u * s) @ vt, want, atol=1e-5)
        a_plain = decode(ups[1]).tensors[f"{layer}|A"]
        assert not a_plain[:, [3, 5]].any() and a_plain[:, [0, 1]].any()
    assert all(decode(u).header["ciphertexts"] == 0 for u in ups)
    assert get_method("shelora", cfg).needs_crypto is False
    from shelora_core.methods import ckks_params_for

    assert ckks_params_for(cfg) is None
    # the client reads the broadcast without keys; encrypting costs bytes withholding does not
    got = m.client_weights(bc, rank=4, alpha=16.0)
    assert set(got.factors) == set(SHAPES)
    enc = FederatedConfig(method="shelora", **base)
    _, _, enc_ups = _round(enc, adapters, sizes, keys["add_only"], cols)
    assert sum(map(len, ups)) < sum(map(len, enc_ups))


def test_one_helper_gives_the_public_column_orders():
    from shelora_core.methods.shelora import public_columns

    w0 = {k: np.random.default_rng(0).normal(size=s) for k, s in SHAPES.items()}
    for order in ("w0_norm", "random"):
        cfg = FederatedConfig(method="shelora", column_order=order, he_budgets=(1, 3))
        assert public_columns(cfg, w0) == public_column_order(w0, 3, order=order, seed=0)
    assert public_columns(FederatedConfig(method="shelora"), w0) is None  # negotiated
    assert public_columns(FederatedConfig(method="flexlora", column_order="random"), w0) is None


def test_he_cost_measures_maskcrypt_at_shelora_budget(keys):
    from shelora_core.he_cost import ModelShape, measure_method

    shape = ModelShape("tiny", layers=2, modules=("q",), d=16)
    kw = dict(ranks=(2, 4), budgets=(1, 2), keys=keys)
    she = measure_method("shelora", shape, **kw)
    mc = measure_method("maskcrypt", shape, **kw)
    assert mc["method"] == "maskcrypt-delta" and mc["ckks_params"] == "add_only"
    # mean over clients of k_i x m per layer: (1 + 2) / 2 x 16 x 2 layers
    assert mc["encrypted_values_per_client"] == she["encrypted_values_per_client"] == 48
    assert mc["mask_upload_bytes"] > 0 and mc["mask_download_bytes"] > 0
    assert mc["max_abs_error_vs_plaintext"] < 1e-5  # vs plaintext FedAvg


@pytest.mark.parametrize(
    ("rounds", "ratios"),
    [
        (20, {3: 0.0, 4: 0.2, 12: 0.35, 20: 0.5}),
        (10, {1: 0.0, 2: 0.2, 6: 0.35, 10: 0.5, 11: 0.5}),  # round 2 = paper round 40 exactly
        (3, {1: 0.25, 2: 0.375, 3: 0.5}),
    ],
)
def test_pruning_schedule_laid_over_fewer_rounds(rounds, ratios):
    from shelora_core.pruning import prune_ratios

    for rnd, ratio in ratios.items():
        assert prune_ratio(rnd, schedule_rounds=rounds) == pytest.approx(ratio)
    # the paper's schedule is the one laid over its own 200 rounds
    assert prune_ratios(200, 200) == prune_ratios(200)
    got = prune_ratios(rounds, rounds)
    assert got[-1] == 0.5 and got == sorted(got)
    with pytest.raises(ValueError, match="schedule_rounds"):
        prune_ratio(1, schedule_rounds=0)


def test_scaled_pruning_states_its_ratio_in_the_header_and_sends_the_same_bytes(keys):
    # Arrange: one client of rank 4, FedShield-LLM with the schedule laid over 4 rounds (round 4
    # prunes half the weights), the paper's schedule (round 4: none) and full HE
    cfg = FederatedConfig(method="fedshield", num_clients=1, ranks=(4,), prune_schedule_rounds=4)
    (w,) = _adapters((4,), 7)
    crypto = keys["fedshield"].client()

    def upload(c):
        m = get_method(c.method, c)
        return m, m.make_upload(w, round_=4, client_id=0, num_examples=5, crypto=crypto)

    # Act
    m, pruned = upload(cfg)
    _, plain = upload(cfg.replace(prune_schedule_rounds=None))
    _, full = upload(cfg.replace(method="full_he"))
    bc = server_step(cfg, [encode(pruned)], round_=4, crypto=keys["fedshield"].server())
    got = m.client_weights(decode(bc, expect_kind="broadcast"), rank=4, alpha=16.0, crypto=crypto)

    # Assert: the server reads the ratio in plaintext but not which weights were zeroed (they
    # travel encrypted, zeros included: the same number of ciphertexts and bytes)
    assert pruned.header["prune_ratio"] == 0.5
    assert plain.header["prune_ratio"] == 0.0 and full.header["prune_ratio"] == 0.0
    assert pruned.header["ciphertexts"] == plain.header["ciphertexts"] == full.header["ciphertexts"]
    sizes = [len(encode(u)) for u in (pruned, plain, full)]  # serialized ciphertexts vary a little
    assert max(sizes) - min(sizes) < 0.01 * min(sizes), sizes
    for layer, (b, a) in got.factors.items():
        for x in (b, a):  # half of each tensor zero after the round trip (up to CKKS noise)
            assert np.mean(np.abs(x) < 1e-4) == pytest.approx(0.5, abs=0.05), layer
