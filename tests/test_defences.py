"""Defended SHE-LoRA variants and key / protocol hygiene (issue 15): shelora-dp, the secret
initial A, what a colluding client decrypts, rounding of decrypted aggregates, and a client's
check of the negotiated column list."""

import numpy as np
import pytest

from shelora_core.aggregation import lora_scaling
from shelora_core.ckks import KeyHolder
from shelora_core.client import upload
from shelora_core.column_aggregation import protected_columns
from shelora_core.config import FederatedConfig
from shelora_core.he_cost import synthetic_adapter
from shelora_core.messages import decode
from shelora_core.methods.packing import delta_layout
from shelora_core.methods.wire import SEP, split_ciphertexts
from shelora_core.server import server_round

LAYERS = {f"model.layers.{i}.self_attn.q_proj": (24, 16) for i in range(3)}
COLUMNS = {k: [1, 5, 9, 2] for k in LAYERS}


def _cfg(method: str = "shelora-dp", **kw) -> FederatedConfig:
    base = dict(
        method=method, model="smollm2", num_clients=3, ranks=(2, 4, 8), he_budgets=(1, 2, 4)
    )
    return FederatedConfig(**{**base, **kw})


def _adapter(rank: int, seed: int):
    rng = np.random.default_rng(seed)
    return synthetic_adapter(LAYERS, rank, rng, head={"weight": np.zeros((2, 16), np.float32)})


@pytest.fixture(scope="module")
def keys():
    return KeyHolder.generate("add_only")


def _plain_norm(up, start, cid, cfg):
    """L2 norm of the plaintext update an upload carries (B, visible A columns, head)."""
    k = cfg.client_budget(cid)
    sq = 0.0
    for layer, (b0, a0) in start.factors.items():
        hidden = COLUMNS[layer][:k]
        vis = [c for c in range(a0.shape[1]) if c not in hidden]
        sq += np.sum((up.tensors[f"{layer}{SEP}B"].astype(float) - b0) ** 2)
        sq += np.sum((up.tensors[f"{layer}{SEP}A"].astype(float) - a0)[:, vis] ** 2)
    sq += np.sum((up.tensors["head|weight"].astype(float) - start.head["weight"]) ** 2)
    return float(np.sqrt(sq))


# ---------------------------------------------------------------------- shelora-dp
def test_shelora_dp_noises_the_plaintext_part_and_encrypts_exact_columns(keys):
    cfg = _cfg(dp_noise_multiplier=0.0, dp_clip=0.5)  # noise 0: the clipping alone is visible
    crypto = keys.client()
    cid, n = 2, 30  # budget 4, rank 8
    start, trained = _adapter(8, 0), _adapter(8, 1)

    raw = upload(cfg, trained, round_=1, client_id=cid, num_examples=n, crypto=crypto,
                 columns=COLUMNS, start=start)  # fmt: skip
    msg = decode(raw, expect_kind="upload")
    plain, blobs = split_ciphertexts(msg)

    # the plaintext update is clipped to the bound, protected columns of A stay zero
    assert _plain_norm(plain, start, cid, cfg) == pytest.approx(0.5, rel=1e-5)
    for layer in LAYERS:
        assert not np.any(plain.tensors[f"{layer}{SEP}A"][:, COLUMNS[layer][:4]])
    # the ciphertexts hold the exact (unclipped, un-noised) protected dW columns
    rows = {layer: m for layer, (m, _) in LAYERS.items()}
    layout = delta_layout(rows, 4, crypto.slots)
    flat = crypto.decrypt(blobs, len(blobs) * crypto.slots)[: layout.total]
    parts = layout.unpack(np.concatenate([flat, np.zeros(layout.total - flat.size)]))
    s = lora_scaling(trained.alpha, trained.rank)
    for layer in LAYERS:
        b, a = trained.factors[layer]
        want = protected_columns(b, a, COLUMNS[layer][:4], n * s)
        got = np.stack([parts[f"{layer}#{j}"] for j in range(4)], axis=1)
        np.testing.assert_allclose(got, want, atol=1e-6)


def test_shelora_dp_noise_is_seeded_and_the_server_aggregates_it_as_shelora(keys):
    cfg = _cfg(dp_noise_multiplier=0.3)
    crypto, server = keys.client(), keys.server()
    starts = [_adapter(r, 10 + i) for i, r in enumerate((2, 4, 8))]
    trained = [_adapter(r, 20 + i) for i, r in enumerate((2, 4, 8))]

    def ups(seed_shift=0):
        return [upload(cfg, w, round_=1, client_id=i, num_examples=10 + i, crypto=crypto,
                       columns=COLUMNS, start=w0, seed=7 + i + seed_shift)
                for i, (w, w0) in enumerate(zip(trained, starts, strict=True))]  # fmt: skip

    a, b, c = ups(), ups(), ups(100)
    pa = [split_ciphertexts(decode(x))[0] for x in a]
    pb = [split_ciphertexts(decode(x))[0] for x in b]
    pc = [split_ciphertexts(decode(x))[0] for x in c]
    key = f"{sorted(LAYERS)[0]}{SEP}B"
    assert np.array_equal(pa[0].tensors[key], pb[0].tensors[key])
    assert not np.array_equal(pa[0].tensors[key], pc[0].tensors[key])
    # noise of std sigma * C on the plaintext coordinates
    noise = pa[2].tensors[key].astype(float) - starts[2].factors[sorted(LAYERS)[0]][0]
    assert 0.15 < float(np.std(noise)) < 0.45

    out = server_round(cfg, a, round_=1, crypto=server, sampled=[0, 1, 2], senders=[0, 1, 2],
                       layers=LAYERS, head={"weight": (2, 16)})  # fmt: skip
    assert out.rejected == [] and out.clients == [0, 1, 2]
    bc = decode(out.broadcast)
    assert bc.header["method"] == "shelora-dp" and bc.header["ciphertexts"] > 0


def test_shelora_dp_needs_the_start_adapter(keys):
    with pytest.raises(ValueError, match="start="):
        upload(_cfg(), _adapter(2, 0), round_=1, client_id=0, num_examples=10,
               crypto=keys.client(), columns=COLUMNS)  # fmt: skip


@pytest.mark.parametrize("method", ["shelora-dp", "flexlora-dp"])
def test_dp_methods_train_one_round_and_record_the_accounted_privacy(
    method, tiny_config, minilm_model, tmp_path
):
    from shelora_core.accounting import rdp_epsilon
    from shelora_core.federation import Federation

    cfg = tiny_config.replace(
        method=method,
        he_budgets=(1, 2),
        column_order="random",
        rounds=1,
        local_steps=1,
        eval_examples=16,
        dp_target_epsilon=8.0,
    )
    fed = Federation(cfg, results_dir=tmp_path, model=minilm_model)
    res = fed.run()
    [rec] = res.history
    assert rec["accuracy"] is not None and np.isfinite(rec["train_loss"])
    p = rec["privacy"]
    assert p["calibration"] == "target_epsilon" and p["rounds"] == 1
    assert p["epsilon_server"] <= 8.0 and p["epsilon"] <= 8.0
    assert p["epsilon"] == rdp_epsilon(p["noise_multiplier"], sample_rate=1.0, steps=1, delta=1e-5)
    assert res.summary()["privacy"] == p
    if method == "shelora-dp":
        assert "plaintext part" in p["covers"] and rec["key_bytes_public"] > 0


# ---------------------------------------------------------------------- secret initial A
def test_secret_init_seed_is_reproducible_per_key_and_differs_across_keys(minilm_model):
    from shelora_core.client import secret_init_seed
    from shelora_core.errors import ProtocolError

    k1, k2 = bytes(range(32)), bytes(range(1, 33))
    s1, s2 = secret_init_seed(k1), secret_init_seed(k2)
    assert s1 == secret_init_seed(bytes(k1)) and s1 != s2 and 0 <= s1 < 2**64
    a1 = minilm_model.init_weights(4, seed=s1)
    a1b = minilm_model.init_weights(4, seed=secret_init_seed(k1))
    a2 = minilm_model.init_weights(4, seed=s2)
    public = minilm_model.init_weights(4, seed=0)
    layer = sorted(a1.factors)[0]
    assert np.array_equal(a1.factors[layer][1], a1b.factors[layer][1])
    assert not np.allclose(a1.factors[layer][1], a2.factors[layer][1])
    assert not np.allclose(a1.factors[layer][1], public.factors[layer][1])
    assert not np.any(a1.factors[layer][0])  # B = 0 as before
    with pytest.raises(ProtocolError, match="init.key"):
        secret_init_seed(b"short")


def test_secret_init_key_lives_with_the_clients_and_round_one_hides_a(
    tiny_config, minilm_model, tmp_path
):
    from shelora_core.client import client_step
    from shelora_core.federation import Federation
    from shelora_core.methods.shelora import public_columns

    cfg = tiny_config.replace(
        method="shelora",
        he_budgets=(1, 2),
        rounds=1,
        local_steps=1,
        calibration_examples=8,
        eval_examples=16,
        secret_init=True,
    )
    fed = Federation(cfg, results_dir=tmp_path / "a", model=minilm_model)
    res = fed.run()
    assert res.history[0]["accuracy"] is not None
    key = (fed.role_dir("client", 0) / "init.key").read_bytes()
    assert len(key) == 32 and (fed.role_dir("client", 1) / "init.key").read_bytes() == key
    # the server's directory (public context, checkpoint) holds neither the key nor the seed
    seed_bytes = fed.init_seed.to_bytes(8, "big")
    for f in fed.role_dir("server").rglob("*"):
        if f.is_file():
            data = f.read_bytes()
            assert (
                key not in data
                and seed_bytes not in data
                and str(fed.init_seed).encode() not in data
            )
    assert not any(p.name == "init.key" for p in fed.role_dir("server").rglob("*"))
    assert not any(p.name == "init.key" for p in fed.role_dir("evaluator").rglob("*"))
    # resuming reads the same key; a new run directory draws another
    again = Federation(cfg, results_dir=tmp_path / "a", model=minilm_model)
    other = Federation(cfg, results_dir=tmp_path / "b", model=minilm_model)
    assert again.init_seed == fed.init_seed != other.init_seed

    # round 1: the visible columns of the uploaded A follow the clients' secret A, not the
    # public one the server could compute from the config's seed
    cols = public_columns(cfg.replace(column_order="random"), minilm_model.base_weights())

    def a_upload(init_seed):
        up, _, _ = client_step(cfg, minilm_model, fed.clients[1], client_id=1, round_=1,
                               broadcast=None, crypto=fed.client_crypto, columns=cols,
                               init_seed=init_seed)  # fmt: skip
        msg = decode(up)
        return {k: v for k, v in msg.tensors.items() if k.endswith(f"{SEP}A")}

    mine, same, theirs = a_upload(fed.init_seed), a_upload(fed.init_seed), a_upload(other.init_seed)
    public = minilm_model.init_weights(cfg.client_rank(1), seed=cfg.seed)
    for name, a in mine.items():
        np.testing.assert_array_equal(a, same[name])
        assert not np.allclose(a, theirs[name])
        layer = name[: -len(f"{SEP}A")]
        vis = a != 0
        err_public = np.abs(a - public.factors[layer][1])[vis].mean()
        secret = minilm_model.init_weights(cfg.client_rank(1), seed=fed.init_seed).factors[layer][1]
        err_secret = np.abs(a - secret)[vis].mean()
        assert err_secret < 0.2 * err_public
    with pytest.raises(ValueError, match="init_seed"):
        client_step(cfg, minilm_model, fed.clients[1], client_id=1, round_=1, broadcast=None,
                    crypto=fed.client_crypto, columns=cols)  # fmt: skip
    from shelora_core.client import negotiation_proposal
    from shelora_core.ope import ColumnOPE, OPEKey

    ope = ColumnOPE(OPEKey.from_bytes(fed.keys.ope_key))
    with pytest.raises(ValueError, match="secret_init"):  # never the public A by accident
        negotiation_proposal(cfg, minilm_model, fed.clients[0], client_id=0, ope=ope)


# ---------------------------------------------------------------------- a client colluding
def test_one_colluding_client_decrypts_every_other_clients_upload(keys, tmp_path):
    """Documents the threat model: one CKKS key pair is shared by every client, so a client that
    colludes with the server decrypts any upload the server hands it and, with the plaintext
    B, recovers the other client's protected columns of A."""
    from shelora_core.checkpoint import RunDirs
    from shelora_core.ckks import ClientCrypto

    # every client's directory holds the same secret context
    bundle = RunDirs(tmp_path, 3).keys(ckks=lambda: KeyHolder.generate("add_only"))
    secrets = {(tmp_path / "clients" / str(i) / "secret.ctx").read_bytes() for i in range(3)}
    assert secrets == {bundle.client_secret}

    cfg = _cfg("shelora")
    victim_crypto = ClientCrypto(keys.secret_bytes())  # client 2's context
    colluder = ClientCrypto(keys.secret_bytes())  # client 0's: the same key
    w, n = _adapter(8, 5), 40
    raw = upload(cfg, w, round_=1, client_id=2, num_examples=n, crypto=victim_crypto,
                 columns=COLUMNS)  # fmt: skip
    plain, blobs = split_ciphertexts(decode(raw))  # what the server holds and hands over

    flat = colluder.decrypt(blobs, len(blobs) * colluder.slots)
    layout = delta_layout({k: m for k, (m, _) in LAYERS.items()}, 4, colluder.slots)
    parts = layout.unpack(np.concatenate([flat[: layout.total],
                                          np.zeros(max(0, layout.total - flat.size))]))  # fmt: skip
    s = lora_scaling(w.alpha, w.rank)
    for layer in LAYERS:
        b_plain = plain.tensors[f"{layer}{SEP}B"].astype(float)  # the server reads B anyway
        dw_cols = np.stack([parts[f"{layer}#{j}"] for j in range(4)], axis=1)
        a_cols = np.linalg.lstsq(b_plain, dw_cols / (n * s), rcond=None)[0]
        np.testing.assert_allclose(a_cols, w.factors[layer][1][:, COLUMNS[layer][:4]], atol=1e-4)


# ---------------------------------------------------------------------- rounded decryption
def test_decrypted_values_are_rounded_to_the_stated_grid(keys):
    from shelora_core.ckks import CKKSError
    from shelora_core.ckks.roles import DECRYPT_PRECISION, round_to_grid

    client = keys.client()
    x = np.random.default_rng(3).normal(0, 0.05, 300)
    blobs = keys.server().add([client.encrypt(x), client.encrypt(2 * x)])
    exact = client.decrypt(blobs, 300)
    rounded = client.with_precision().decrypt(blobs, 300)

    assert DECRYPT_PRECISION == 2.0**-22 and client.precision is None  # the view is a copy
    steps = rounded / DECRYPT_PRECISION
    np.testing.assert_array_equal(steps, np.round(steps))  # on the grid
    assert not np.array_equal(exact / DECRYPT_PRECISION, np.round(exact / DECRYPT_PRECISION))
    assert np.max(np.abs(rounded - 3 * x)) <= DECRYPT_PRECISION / 2 + 1e-7
    # the grid is far above the CKKS error: rounding the exact sum gives the same values
    assert np.mean(rounded == round_to_grid(3 * x, DECRYPT_PRECISION)) > 0.9
    with pytest.raises(CKKSError, match="precision"):
        client.with_precision(0.0)


@pytest.mark.parametrize("method", ["shelora", "fedshield", "maskcrypt"])
def test_every_decryption_in_the_receive_path_is_rounded(method, keys, monkeypatch):
    from shelora_core.ckks import ClientCrypto
    from shelora_core.ckks.roles import DECRYPT_PRECISION
    from shelora_core.client import propose_masks, receive
    from shelora_core.methods import ckks_params_for, get_method
    from shelora_core.server import server_consensus, server_step

    cfg = _cfg(method)
    kh = keys if ckks_params_for(cfg) == "add_only" else KeyHolder.generate(ckks_params_for(cfg))
    crypto = kh.client()
    ws, starts = [_adapter(r, 30 + r) for r in (2, 4, 8)], [_adapter(r, 40 + r) for r in (2, 4, 8)]
    consensus = None
    if method == "maskcrypt":
        props = [propose_masks(cfg, w, w0, w.factors, round_=1, client_id=i)
                 for i, (w, w0) in enumerate(zip(ws, starts, strict=True))]  # fmt: skip
        consensus = server_consensus(cfg, props, round_=1)
    ups = [upload(cfg, w, round_=1, client_id=i, num_examples=10 + i, crypto=crypto,
                  columns=COLUMNS, consensus=consensus, start=w0)
           for i, (w, w0) in enumerate(zip(ws, starts, strict=True))]  # fmt: skip
    bc = server_step(cfg, ups, round_=1, crypto=kh.server(), consensus=consensus)

    seen, real = [], ClientCrypto.decrypt

    def spy(self, blobs, length):
        out = real(self, blobs, length)
        seen.append((self.precision, out))
        return out

    monkeypatch.setattr(ClientCrypto, "decrypt", spy)
    got = receive(cfg, bc, rank=8, crypto=crypto)
    monkeypatch.undo()
    # the method read directly (not through the client's receive step): exact decryption
    exact = get_method(method, cfg).client_weights(decode(bc), rank=8, alpha=cfg.lora_alpha,
                                                   crypto=crypto)  # fmt: skip

    assert seen and all(p == DECRYPT_PRECISION for p, _ in seen)
    for _, out in seen:
        steps = out / DECRYPT_PRECISION
        np.testing.assert_array_equal(steps, np.round(steps))
    for layer in LAYERS:  # the rounded aggregate is the exact one up to the grid
        g, e = got.factors[layer], exact.factors[layer]
        np.testing.assert_allclose(g[0] @ g[1], e[0] @ e[1], atol=1e-5)
        assert not np.array_equal(g[0] @ g[1], e[0] @ e[1])  # and it was rounded


# ---------------------------------------------------------------------- a steering server
def _proposals(cfg, ope):
    """Every client's real proposal bytes: columns 0, 1, 2, 3 are the most sensitive for all
    (in that order), so client i's top-k_i is columns 0 .. k_i - 1 in every layer."""
    from shelora_core.messages import Message, encode

    out = []
    for cid in range(cfg.num_clients):
        k = cfg.client_budget(cid)
        tensors = {}
        for layer in LAYERS:
            items = ope.encrypt_proposal(list(range(k)), [10.0 - j + 0.01 * cid for j in range(k)])
            tensors[layer] = np.asarray(items, dtype=np.int64).reshape(-1, 2)
        header = {"client_id": cid, "rank": cfg.client_rank(cid), "budget": k}
        out.append(encode(Message("proposal", header, tensors)))
    return out


def _steered(proposals):
    """A server that steers the negotiation: per layer, the proposed columns with the LOWEST
    score ciphertexts first (it can compare OPE ciphertexts, it cannot make new ones)."""
    from shelora_core.messages import Message, encode

    msgs = [decode(p, expect_kind="proposal") for p in proposals]
    k_max = max(int(m.header["budget"]) for m in msgs)
    tensors = {}
    for layer in LAYERS:
        best = {}
        for m in msgs:
            for idx, score in m.tensors[layer]:
                best[int(idx)] = max(best.get(int(idx), score), int(score))
        order = sorted(best, key=lambda i: best[i])[:k_max]
        tensors[layer] = np.asarray(order, dtype=np.int64)
    return encode(Message("negotiation", {"layers": sorted(tensors)}, tensors))


def test_clients_refuse_a_negotiation_steered_to_the_least_sensitive_columns():
    from shelora_core.client import negotiated_columns
    from shelora_core.negotiation import NegotiationError
    from shelora_core.ope import ColumnOPE, OPEKey
    from shelora_core.server import server_negotiate

    cfg = _cfg("shelora")
    assert cfg.min_column_coverage == 0.5
    ope = ColumnOPE(OPEKey.generate())
    props = _proposals(cfg, ope)

    honest, _ = server_negotiate(cfg, props)
    for p in props:  # every client accepts the honest list: it covers its whole top-k_i
        g = negotiated_columns(honest, ope, proposal=p, cfg=cfg)
        assert all(sorted(cols) == [0, 1, 2, 3] for cols in g.values())

    steered = _steered(props)
    assert negotiated_columns(steered, ope)[sorted(LAYERS)[0]] == [3, 2, 1, 0]
    for cid in (0, 1):  # budgets 1 and 2: their prefixes [3] and [3, 2] miss every own column
        with pytest.raises(NegotiationError) as err:
            negotiated_columns(steered, ope, proposal=props[cid], cfg=cfg)
        msg = str(err.value)
        assert f"client {cid}" in msg and "covers 0.00" in msg
        assert "min_column_coverage = 0.5" in msg and "steers the negotiation" in msg
    # client 2 (budget 4) encrypts all four anyway; a client that sets 0 accepts any list
    negotiated_columns(steered, ope, proposal=props[2], cfg=cfg)
    lax = cfg.replace(min_column_coverage=0.0)
    negotiated_columns(steered, ope, proposal=props[0], cfg=lax)


def test_the_negotiation_step_refuses_a_steering_server(tiny_config, minilm_model, tmp_path,
                                                       monkeypatch):  # fmt: skip
    from shelora_core import engine
    from shelora_core.federation import Federation
    from shelora_core.negotiation import NegotiationError
    from shelora_core.ope import ColumnOPE, OPEKey

    cfg = tiny_config.replace(method="shelora", he_budgets=(1, 2), calibration_examples=8)
    fed = Federation(cfg, results_dir=tmp_path, model=minilm_model)
    ope = ColumnOPE(OPEKey.from_bytes(fed.keys.ope_key))

    trace = engine.run_negotiation(cfg, minilm_model, fed.clients, ope=ope)  # honest: accepted
    assert len(trace.seconds["coverage"]) == 2

    def steering(cfg_, proposals):
        bc, result = engine_server_negotiate(cfg_, proposals)
        msg = decode(bc, expect_kind="negotiation")
        for layer, arr in msg.tensors.items():  # reversed: client 0's G[:1] misses its column
            msg.tensors[layer] = arr[::-1].copy()
        from shelora_core.messages import encode

        return encode(msg), result

    engine_server_negotiate = engine.server_negotiate
    monkeypatch.setattr(engine, "server_negotiate", steering)
    with pytest.raises(NegotiationError, match="client 0: .* covers 0.00.*min_column_coverage"):
        engine.run_negotiation(cfg, minilm_model, fed.clients, ope=ope)
