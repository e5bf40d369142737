"""SHE-LoRA's packed cipher mode: dense client packing, the server's packed products, the keys."""

import numpy as np
import pytest
import tenseal as ts

from shelora_core import FederatedConfig
from shelora_core.aggregation import lora_scaling
from shelora_core.ckks import CKKSError, KeyHolder, ServerCrypto
from shelora_core.ckks.packed import PackedEvaluator, naf, normalize_step, replication_counts
from shelora_core.engine import run_round
from shelora_core.errors import RoundError
from shelora_core.he_cost import synthetic_adapter
from shelora_core.messages import decode, encode
from shelora_core.methods import get_method
from shelora_core.methods.packing import PackedLayout
from shelora_core.server import server_step

SHAPES = {"l0": (24, 16), "l1": (24, 16), "l2": (40, 12)}
RANKS, BUDGETS = (8, 16, 32), (2, 4, 8)
SIZES = [10, 25, 40]


@pytest.fixture(scope="module")
def packed() -> KeyHolder:
    return KeyHolder.generate("packed")


def _cfg(shapes=SHAPES, ranks=RANKS, budgets=BUDGETS, **kw) -> FederatedConfig:
    return FederatedConfig(
        method="shelora",
        cipher_mode="packed",
        num_clients=len(ranks),
        ranks=ranks,
        he_budgets=budgets,
        **kw,
    )


def _adapters(shapes, ranks, seed=0):
    rng = np.random.default_rng(seed)
    return [synthetic_adapter(shapes, r, rng) for r in ranks]


def _columns(shapes, k, seed=0):
    rng = np.random.default_rng(seed)
    return {layer: [int(c) for c in rng.permutation(n)[:k]] for layer, (_, n) in shapes.items()}


def _dw(w, layer):
    b, a = w.factors[layer]
    return lora_scaling(w.alpha, w.rank) * b.astype(np.float64) @ a.astype(np.float64)


def _against_flexlora(cfg, shapes, kh, *, seed=0, server=None):
    """One packed round and one FlexLoRA round through real messages; the packed trace."""
    adapters = _adapters(shapes, cfg.ranks, seed)
    cols = _columns(shapes, max(cfg.he_budgets), seed)
    she = run_round(cfg, adapters, num_examples=SIZES[: len(adapters)], columns=cols,
                    client_crypto=kh.client(), server_crypto=server or kh.server())  # fmt: skip
    flex = run_round(cfg.replace(method="flexlora"), adapters, num_examples=SIZES[: len(adapters)])
    for a, b in zip(she.received, flex.received, strict=True):
        for layer in shapes:
            np.testing.assert_allclose(_dw(a, layer), _dw(b, layer), atol=1e-5)
    return she


# ---------------------------------------------------------------------- the layout, in plaintext
def _plain_server(layout, clients, budgets):
    """The server's algorithm (ckks.packed) on plaintext slots: np.roll for rotations."""
    s, out = layout.slots, []
    rot = lambda x, k: np.roll(x, -k)  # noqa: E731  (left rotation: slot t gets t + k)
    for ci, c in enumerate(layout.classes):
        for o in range(c.outputs(max(budgets))):
            acc = np.zeros(s)
            for (flat, rank, mats), k in zip(clients, budgets, strict=True):
                where = {(g[0], g[1]): g[2:] for g in layout.groups(rank, k)}
                if (ci, o) not in where:
                    continue
                ct, pos = where[ci, o]
                span = rank * c.per_output
                x0 = np.zeros(s)
                x0[pos : pos + span] = flat[ct * s + pos : ct * s + pos + span]
                x0 = rot(x0, pos)
                x = x0
                for count, doubling in replication_counts(c.copies(rank)):
                    x = x + rot(x if doubling else x0, -count * span)
                blocks = [
                    None
                    if blk is None or blk.position >= k
                    else mats[blk.layer][blk.row0 : blk.row0 + blk.rows]
                    for blk in c.output_blocks(o)
                ]
                diag = PackedEvaluator.diagonals(blocks, rank, s)
                acc += sum(diag[d] * rot(x, d * c.per_output) for d in range(rank))
            out.append(acc)
    return np.concatenate(out) if out else np.zeros(0)


@pytest.mark.parametrize(
    ("rows", "ranks", "budgets", "slots"),
    [
        ({"a": 24, "b": 24, "c": 40}, (8, 16, 32), (2, 4, 8), 4096),
        ({"q": 576}, (8, 16, 32), (2, 4, 8), 4096),
        ({"a": 100, "b": 7}, (3, 5), (1, 3), 512),  # ranks and heights of no special form
        ({"big": 1000, "small": 30}, (4, 8), (2, 1), 512),  # rows split into blocks
    ],
)
def test_layout_and_server_algorithm_reproduce_the_products_in_plaintext(
    rows, ranks, budgets, slots
):
    # Prepare
    layout = PackedLayout.build(rows, max(budgets), max(ranks), slots)
    rng = np.random.default_rng(0)
    clients, ref = [], {layer: np.zeros((m, max(budgets))) for layer, m in rows.items()}
    for r, k in zip(ranks, budgets, strict=True):
        b = {layer: rng.normal(size=(m, r)) for layer, m in rows.items()}
        a = {layer: rng.normal(size=(r, k)) for layer in rows}
        clients.append((layout.pack(r, k, a), r, b))
        for layer in rows:
            ref[layer][:, :k] += b[layer] @ a[layer]
    # Execute
    got = layout.unpack(_plain_server(layout, clients, budgets), max(budgets), rows)
    # Assert: exact products; groups inside the slots and disjoint; outputs nest with budgets
    for layer in rows:
        np.testing.assert_allclose(got[layer], ref[layer], atol=1e-9)
    for r, k in zip(ranks, budgets, strict=True):
        spans = sorted(
            (ct * slots + pos, ct * slots + pos + r * layout.classes[ci].per_output)
            for ci, _, ct, pos in layout.groups(r, k)
        )
        assert all(e0 <= s1 for (_, e0), (s1, _) in zip(spans, spans[1:], strict=False))
        assert all(e - s <= slots and s // slots == (e - 1) // slots for s, e in spans)
    assert [layout.outputs(k) for k in range(max(budgets) + 1)] == sorted(
        layout.outputs(k) for k in range(max(budgets) + 1)
    )
    for c in layout.classes:
        assert c.per_output * c.width <= slots


def test_rotation_steps_compose_from_power_of_two_keys():
    for step in (1, 3, 7, 192, -1728, 4095, 2048):
        assert sum(naf(step)) == step and all(abs(t) & (abs(t) - 1) == 0 for t in naf(step))
        s = normalize_step(step, 4096)
        assert (s - step) % 4096 == 0 and -4096 < s < 4096
    layout = PackedLayout.build({"q": 576}, 8, 32, 4096)
    steps = layout.galois_steps(zip(RANKS, BUDGETS, strict=True), compose=True)
    assert all(abs(s) & (abs(s) - 1) == 0 for s in steps) and len(steps) <= 23


# ---------------------------------------------------------------------- through real messages
@pytest.mark.parametrize("seeded", [False, True])
def test_packed_round_equals_flexlora_for_heterogeneous_ranks_and_budgets(packed, seeded):
    cfg = _cfg(seeded_uploads=seeded)
    trace = _against_flexlora(cfg, SHAPES, packed)
    layout = PackedLayout.build({k: m for k, (m, _) in SHAPES.items()}, 8, 32, 4096)
    ups = trace.upload_messages()
    assert [u.header["ciphertexts"] for u in ups] == [
        layout.inputs(r, k) for r, k in zip(RANKS, BUDGETS, strict=True)
    ]
    assert trace.broadcast_message().header["ciphertexts"] == layout.outputs(8)
    assert all(u.header["cipher_mode"] == "packed" for u in ups)
    if seeded:
        assert all(u.tensors["enc|0"][0] == 0 for u in ups)  # the seeded format's zero byte


def test_packed_round_when_the_largest_budget_does_not_answer(packed):
    # clients 0 and 1 answer (budgets 2 and 4): the outputs up to position 4, read with k_eff 4
    shapes = {"q": (576, 12), "l0": (24, 16)}
    cfg = _cfg(shapes)
    adapters, cols = _adapters(shapes, RANKS)[:2], _columns(shapes, 8)
    she = run_round(cfg, adapters, client_ids=[0, 1], num_examples=SIZES[:2], columns=cols,
                    client_crypto=packed.client(), server_crypto=packed.server(),
                    receive_ranks=[8, 32])  # fmt: skip
    flex = run_round(cfg.replace(method="flexlora"), adapters, client_ids=[0, 1],
                     num_examples=SIZES[:2], receive_ranks=[8, 32])  # fmt: skip
    layout = PackedLayout.build({k: m for k, (m, _) in shapes.items()}, 8, 32, 4096)
    assert she.broadcast_message().header["ciphertexts"] == layout.outputs(4) < layout.outputs(8)
    for a, b in zip(she.received, flex.received, strict=True):
        for layer in shapes:
            np.testing.assert_allclose(_dw(a, layer), _dw(b, layer), atol=1e-5)


def test_packed_round_splits_tall_layers_into_blocks(packed):
    shapes = {"tall": (4200, 8), "short": (16, 8)}
    cfg = _cfg(shapes, ranks=(4, 8), budgets=(1, 2))
    layout = PackedLayout.build({k: m for k, (m, _) in shapes.items()}, 2, 8, 4096)
    assert [len(c.blocks) for c in layout.classes] == [2, 4]  # 'short', then 'tall' in 2 blocks
    _against_flexlora(cfg, shapes, packed)


def test_smollm2_shaped_layer_with_exactly_the_layouts_galois_keys():
    # Prepare: keys for exactly the steps this layout's server makes
    shapes = {"model.layers.0.self_attn.q_proj": (576, 576)}
    layout = PackedLayout.build({k: m for k, (m, _) in shapes.items()}, 8, 32, 4096)
    steps = layout.galois_steps(zip(RANKS, BUDGETS, strict=True))
    kh = KeyHolder.generate("packed", galois_steps=steps)
    server = kh.server()
    # Assert: the public context holds those keys, no more, and no secret key
    assert server.context.galois_keys().data.size() == len(steps)
    assert not server.context.is_private() and not server.context.has_secret_key()
    assert server.fingerprint == kh.fingerprint == kh.client().fingerprint
    # Execute + Assert: FlexLoRA's aggregate within CKKS error
    trace = _against_flexlora(_cfg(shapes), shapes, kh, server=server)
    assert trace.broadcast_message().header["ciphertexts"] == layout.outputs(8) == 2


def test_server_holds_no_secret_key_and_the_evaluator_refuses_a_secret_context(packed):
    server = packed.server()
    assert not server.context.is_private()
    with pytest.raises(PermissionError):
        server.decrypt([b""], 1)
    with pytest.raises(CKKSError, match="must never hold the secret key"):
        ServerCrypto(packed.secret_bytes())
    with pytest.raises(CKKSError, match="public context only"):
        PackedEvaluator(packed.client())


# ---------------------------------------------------------------------- refusals
def _upload(cfg, kh, *, client_id=1, fingerprint=None):
    method = get_method("shelora", cfg)
    adapter = _adapters(SHAPES, cfg.ranks)[client_id]
    msg = method.make_upload(adapter, round_=1, client_id=client_id, num_examples=5,
                             crypto=kh.client(), columns=_columns(SHAPES, 8))  # fmt: skip
    if fingerprint is not None:
        msg.header["fingerprint"] = fingerprint
    return msg


def _refusal(cfg, msg, server):
    with pytest.raises(RoundError) as err:
        server_step(cfg, [encode(msg)], round_=1, crypto=server)
    (rej,) = err.value.rejected
    return rej


def test_ciphertexts_under_another_key_are_refused(packed):
    cfg = _cfg(min_clients=1)
    other = KeyHolder.generate("packed", galois_steps=[1])
    rej = _refusal(cfg, _upload(cfg, other), packed.server())
    assert rej["reason"] == "key" and "another key" in rej["error"]
    # a forged header fingerprint: the seeded ciphertexts still name their key
    seeded = cfg.replace(seeded_uploads=True)
    msg = _upload(seeded, other, fingerprint=packed.fingerprint)
    rej = _refusal(seeded, msg, packed.server())
    assert rej["reason"] == "ciphertext" and f"under key {other.fingerprint}" in rej["error"]


def test_a_tampered_ciphertext_count_is_refused_by_name(packed):
    cfg = _cfg(min_clients=1)
    msg = _upload(cfg, packed)
    assert msg.header["ciphertexts"] == 1
    msg.tensors["enc|1"] = msg.tensors["enc|0"]
    msg.header["ciphertexts"] = 2
    rej = _refusal(cfg, msg, packed.server())
    assert rej["reason"] == "ciphertexts"
    assert (
        "carries 2 ciphertexts (header: 2); its budget 4, rank and layer shapes need 1"
        in (rej["error"])
    )


def test_a_ciphertext_that_is_not_fresh_is_refused(packed):
    cfg = _cfg(min_clients=1)
    msg = _upload(cfg, packed)
    ctx = ts.context_from(packed.secret_bytes())
    lower = ts.ckks_vector(ctx, [0.0] * 4096) * 1.0  # rescaled: one level down
    msg.tensors["enc|0"] = np.frombuffer(lower.serialize(), np.uint8)
    rej = _refusal(cfg, msg, packed.server())
    assert rej["reason"] == "ciphertext" and "must be freshly encrypted" in rej["error"]


def test_a_server_without_the_needed_galois_keys_says_which_steps(packed):
    cfg = _cfg()
    few = KeyHolder.generate("packed", galois_steps=[1, 2])
    adapters = _adapters(SHAPES, RANKS)
    with pytest.raises(CKKSError, match=r"cannot make the rotations by \[.*galois_steps="):
        run_round(cfg, adapters, columns=_columns(SHAPES, 8), client_crypto=few.client(),
                  server_crypto=few.server(), receive_ranks=())  # fmt: skip


def test_a_broadcast_with_a_wrong_ciphertext_count_is_refused_by_the_client(packed):
    from shelora_core.messages import MessageError

    cfg = _cfg()
    trace = run_round(cfg, _adapters(SHAPES, RANKS), columns=_columns(SHAPES, 8),
                      client_crypto=packed.client(), server_crypto=packed.server(),
                      receive_ranks=())  # fmt: skip
    bc = trace.broadcast_message()
    n = bc.header["ciphertexts"]
    del bc.tensors[f"enc|{n - 1}"]
    bc.header["ciphertexts"] = n - 1
    method = get_method("shelora", cfg)
    with pytest.raises(MessageError, match=f"holds {n - 1} ciphertexts; its layout needs {n}"):
        method.client_weights(decode(encode(bc)), rank=8, alpha=16.0, crypto=packed.client())


def test_galois_steps_that_are_no_rotation_are_refused():
    for bad in ([0], [4096], [-5000]):
        with pytest.raises(CKKSError, match="not rotations: a step must be non-zero and below"):
            KeyHolder.generate("packed", galois_steps=bad)
