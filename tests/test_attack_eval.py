"""The attack grid reads only what the server receives (shelora_core.attacks: threat, victim, grid)."""

import json

import numpy as np
import pytest
import torch

from shelora_core.attacks.grid import (
    OPTIMISATION,
    Cell,
    apply_overrides,
    attack_plan,
    run_grid,
    summarize,
)
from shelora_core.attacks.threat import (
    ServerView,
    attack_upload,
    observed_update,
    server_knowledge,
    server_view,
    try_decrypt,
)
from shelora_core.attacks.victim import Victim, client_upload
from shelora_core.ckks import KeyHolder
from shelora_core.config import FederatedConfig
from shelora_core.lora import AdapterWeights
from shelora_core.messages import decode
from shelora_core.methods import FirstLayersSHELoRA

SENTENCE = "a gorgeous , witty , seductive movie ."
RANK = 64
LR = 1e3


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def victim():
    return Victim((RANK,), seed=0)


@pytest.fixture(scope="module")
def public_model():
    from shelora_core.assets import load_classifier

    return load_classifier("smollm2", num_labels=2, seed=0)


@pytest.fixture(scope="module")
def columns(victim):
    """The negotiated column list G (2 clients, OPE, server negotiation) for rank RANK."""
    return victim.columns(
        RANK, 4, [[SENTENCE, "the film oozes craft ."], ["a dull , lifeless film ."]]
    )


def _step(victim, update, sentences=(SENTENCE,)):
    batch = victim.batch(list(sentences), max_length=24)
    start = victim.start(RANK, update)
    after = victim.train(start, batch, [1] * len(sentences), update=update, lr=LR)
    return batch, start, after


def _attack(victim, public_model, method, upload, start, update, *, attacker="oblivious", **kw):
    knowledge = server_knowledge(method, start, update=update, lr=LR, bos_id=1, batch_size=1, **kw)
    return attack_upload(
        upload,
        method=method,
        knowledge=knowledge,
        public_model=public_model,
        server_crypto=victim.server_crypto(method),
        attacker=attacker,
        max_length=24,
    )


def _text(victim, res):
    return [victim.tokenizer.decode(s) for s in res.sequences]


# ---------------------------------------------------------------------------- the wire
def test_server_crypto_cannot_decrypt_the_shelora_ciphertexts(victim, columns):
    batch, start, after = _step(victim, "later")
    upload, _, _ = client_upload(
        "shelora", victim, after, start, batch=batch, labels=[1], budget=4, columns=columns
    )
    server = victim.server_crypto("shelora")

    view = server_view(upload, method="shelora", server_crypto=server)

    assert not server.context.is_private()
    assert len(view.ciphertexts) == decode(upload).header["ciphertexts"] > 0
    with pytest.raises(PermissionError, match="no secret key"):
        server.decrypt(view.ciphertexts, server.slots)
    with pytest.raises(ValueError, match="secret_key"):
        server.load(view.ciphertexts[0]).decrypt()
    assert "secret" in try_decrypt(server, view.ciphertexts)
    # the client, holding the secret key, reads the very same bytes
    client = victim.client_crypto("shelora")
    assert np.all(np.isfinite(client.decrypt(view.ciphertexts[:1], client.slots)))


def test_server_view_refuses_a_context_with_the_secret_key(victim, columns):
    batch, start, after = _step(victim, "round1")
    upload, _, _ = client_upload(
        "shelora", victim, after, start, batch=batch, labels=[1], budget=4, columns=columns
    )

    class Leaky:  # a "server" handed the clients' secret context
        context = victim.client_crypto("shelora").context

    with pytest.raises(ValueError, match="secret key"):
        server_view(upload, method="shelora", server_crypto=Leaky())


def test_the_hidden_columns_true_values_do_not_change_what_the_attacker_outputs(
    victim, public_model, columns
):
    batch, start, after = _step(victim, "later")
    rng = np.random.default_rng(0)
    other = AdapterWeights(after.rank, after.alpha, {}, after.head)
    for name, (b, a) in after.factors.items():  # rewrite A[:, G[:4]] of every layer
        a2 = a.copy()
        a2[:, columns[name][:4]] = rng.normal(0, 1, size=(a.shape[0], 4))
        other.factors[name] = (b, a2)
    ups = [
        client_upload(
            "shelora", victim, w, start, batch=batch, labels=[1], budget=4, columns=columns
        )[0]
        for w in (after, other)
    ]

    runs = [
        _attack(
            victim,
            public_model,
            "shelora",
            u,
            start,
            "later",
            attacker="adaptive",
            columns=columns,
            budget=4,
        )  # fmt: skip
        for u in ups
    ]

    assert ups[0] != ups[1]  # the ciphertexts differ ...
    (res0, view0), (res1, view1) = runs
    for name in view0.after.factors:  # ... the plaintext the server reads does not
        np.testing.assert_array_equal(view0.after.factors[name][1], view1.after.factors[name][1])
    assert res0.sequences == res1.sequences
    np.testing.assert_array_equal(res0.token_distances, res1.token_distances)
    assert _text(victim, res0) == [SENTENCE]  # and the adaptive attacker wins anyway


# ---------------------------------------------------------------------------- the attacks
def test_unprotected_flexlora_at_batch_1_recovers_the_sentence_from_the_upload_bytes(
    victim, public_model
):
    from shelora_core.attacks.dager import score_reconstruction

    batch, start, after = _step(victim, "round1")
    upload, _, _ = client_upload("flexlora", victim, after, start, batch=batch, labels=[1])

    res, view = _attack(victim, public_model, "flexlora", upload, start, "round1")

    assert view.ciphertexts == [] and res.route == "grad_b"
    assert score_reconstruction(_text(victim, res), [SENTENCE])["rouge1"] >= 0.9


def test_shelora_hides_nothing_in_round_1_and_only_from_the_oblivious_attacker_later(
    victim, public_model, columns
):
    out = {}
    for update in ("round1", "later"):
        batch, start, after = _step(victim, update)
        upload, _, _ = client_upload(
            "shelora", victim, after, start, batch=batch, labels=[1], budget=4, columns=columns
        )
        for attacker in ("oblivious", "adaptive"):
            res, _ = _attack(victim, public_model, "shelora", upload, start, update,
                             attacker=attacker, columns=columns, budget=4)  # fmt: skip
            out[update, attacker] = _text(victim, res)

    assert out["round1", "oblivious"] == [SENTENCE]  # B is plaintext and A0 is public
    assert out["later", "oblivious"] == []  # the paper's collapse
    assert out["later", "adaptive"] == [SENTENCE]  # the column list is in the upload header


def test_dp_noise_at_the_authors_epsilon_drops_recovery_and_tiny_noise_does_not(
    victim, public_model
):
    batch, start, after = _step(victim, "round1")
    texts = {}
    for label, kw in (("eps10", {"dp_epsilon": 10.0}), ("tiny", {"dp_sigma": 1e-13})):
        upload, _, _ = client_upload(
            "flexlora-dp", victim, after, start, batch=batch, labels=[1], lr=LR, **kw
        )
        res, _ = _attack(victim, public_model, "flexlora-dp", upload, start, "round1")
        texts[label] = (_text(victim, res), res.rank_layer1)

    assert texts["tiny"][0] == [SENTENCE]
    assert texts["eps10"][0] == [] and texts["eps10"][1] == RANK  # noise fills every direction


def test_dager_recovers_the_sentence_from_a_two_step_sgd_update_as_from_one_step(
    victim, public_model
):
    # the steps drift the second layer's inputs: true ones sit at ~1e-3 of the span, wrong ones
    # beyond 1e-2, so the attacker widens DAGER's threshold to 1e-2 (both updates alike)
    texts = {}
    for update, steps in (("later", 1), ("multistep-sgd", 2)):
        batch = victim.batch([SENTENCE], max_length=24)
        start = victim.start(RANK, update)
        after = victim.train(start, batch, [1], update=update, lr=LR, local_steps=steps)
        upload, _, _ = client_upload("flexlora", victim, after, start, batch=batch, labels=[1])
        knowledge = server_knowledge(
            "flexlora", start, update=update, lr=LR * steps, bos_id=1, batch_size=1
        )
        res, _ = attack_upload(upload, method="flexlora", knowledge=knowledge,
                               public_model=public_model, max_length=24, span_tol=1e-2)  # fmt: skip
        texts[steps] = (_text(victim, res), res.rank_layer2)

    assert texts[1][0] == texts[2][0] == [SENTENCE]
    assert texts[2][1] > texts[1][1]  # two sets of layer-2 inputs: a wider span


def test_grid_flags_a_diverged_local_sgd_and_records_the_refused_shelora_upload(
    tmp_path, victim, public_model, columns
):
    plan = {
        "cells": [
            Cell("flexlora", "oblivious", 1, RANK, "multistep-sgd", lr=1e5, steps=2),
            Cell("shelora", "adaptive", 1, RANK, "multistep-sgd", budget=4, lr=1e5, steps=2),
        ],
        "n_batches": 1,
        "max_tokens": 12,
        "negotiation_clients": 1,
        "calibration_examples": 2,
    }

    flex, she = run_grid(plan, checkpoint=tmp_path / "records.jsonl", victim=victim,
                         public_model=public_model, progress=False)  # fmt: skip

    assert flex["loss_end"] > flex["loss_start"] and flex["diverged"] and she["diverged"]
    assert flex["upload_bytes"] > 0 and flex["rank_layer1"] is not None  # attacked anyway
    assert she["upload_bytes"] == 0 and she["note"].startswith("nothing uploaded")
    assert "exceeds" in she["note"] and she["rouge1"] == 0.0
    assert she["refused"] and not flex["refused"]
    assert summarize([flex])[0]["diverged_batches"] == 1


def test_b_channel_attacker_reads_only_b_and_recovers_the_sentence(victim, public_model, columns):
    out = {}
    for method, update in (("flexlora", "later"), ("shelora", "round1")):
        batch, start, after = _step(victim, update)
        upload, _, _ = client_upload(
            method, victim, after, start, batch=batch, labels=[1], budget=4, columns=columns
        )
        res, view = _attack(victim, public_model, method, upload, start, update,
                            attacker="b-channel", columns=columns, budget=4)  # fmt: skip
        knowledge = server_knowledge(method, start, update=update, lr=LR, bos_id=1, batch_size=1,
                                     columns=columns, budget=4)  # fmt: skip
        seen = observed_update(view, knowledge, attacker="b-channel")
        assert all(not lu.grad_a.any() and lu.grad_b.any() for lu in seen.layers.values())
        out[method] = (_text(victim, res), res.route)

    # later round: B != 0, DAGER would read grad A; this attacker reads grad B only
    assert out["flexlora"] == ([SENTENCE], "grad_b")
    # round 1: the initial A is public and B is never encrypted
    assert out["shelora"] == ([SENTENCE], "grad_b")
    batch, start, after = _step(victim, "round1")
    upload, _, _ = client_upload("full_he", victim, after, start, batch=batch, labels=[1])
    res, view = _attack(victim, public_model, "full_he", upload, start, "round1",
                        attacker="b-channel")  # fmt: skip
    assert res is None and view.after is None
    plain, _, _ = client_upload("flexlora", victim, after, start, batch=batch, labels=[1])
    knowledge = server_knowledge("flexlora", start, update="round1", lr=LR, bos_id=1, batch_size=1)
    with pytest.raises(ValueError, match="reads only grad B"):
        attack_upload(plain, method="flexlora", knowledge=knowledge, public_model=public_model,
                      attacker="b-channel", route="grad_a")  # fmt: skip


def test_shelora_dp_noises_the_plaintext_part_only_and_stops_the_adaptive_attacker(
    victim, public_model, columns
):
    batch, start, after = _step(victim, "later")
    kw = dict(batch=batch, labels=[1], budget=4, columns=columns, lr=LR)
    plain, _, _ = client_upload("shelora", victim, after, start, **kw)
    noisy, _, _ = client_upload("shelora-dp", victim, after, start, dp_epsilon=10.0, **kw)
    server = victim.server_crypto("shelora-dp")
    v_plain = server_view(plain, method="shelora", server_crypto=server)
    v_noisy = server_view(noisy, method="shelora-dp", server_crypto=server)

    for name, (b, a) in v_plain.after.factors.items():
        b_dp, a_dp = v_noisy.after.factors[name]
        hidden = v_noisy.unknown_a[name][0]
        assert hidden.sum() == 4 and np.array_equal(hidden, v_plain.unknown_a[name][0])
        assert np.all(a_dp[:, hidden] == 0) and np.all(a[:, hidden] == 0)  # encrypted columns
        assert np.all(b_dp != b) and np.all(a_dp[:, ~hidden] != a[:, ~hidden])  # noise elsewhere
    # the encrypted columns are SHE-LoRA's exact ones
    client = victim.client_crypto("shelora-dp")
    assert len(v_plain.ciphertexts) == len(v_noisy.ciphertexts) > 0
    for c_plain, c_noisy in zip(v_plain.ciphertexts, v_noisy.ciphertexts, strict=True):
        x, y = (client.decrypt([c], client.slots) for c in (c_plain, c_noisy))
        np.testing.assert_allclose(y, x, atol=1e-5 * max(1.0, np.abs(x).max()))

    res, _ = _attack(victim, public_model, "shelora-dp", noisy, start, "later",
                     attacker="adaptive", columns=columns, budget=4)  # fmt: skip
    assert _text(victim, res) == [] and res.rank_layer1 == RANK  # noise fills every direction


@pytest.mark.parametrize("method", ["full_he", "fedshield"])
def test_encrypting_every_factor_gives_the_attacker_nothing(victim, public_model, method):
    batch, start, after = _step(victim, "round1")
    upload, _, _ = client_upload(method, victim, after, start, batch=batch, labels=[1])

    res, view = _attack(victim, public_model, method, upload, start, "round1")

    msg = decode(upload)
    assert res is None and view.after is None
    assert {k.split("|")[0] for k in msg.tensors} == {"enc", "head"}  # no plaintext factor
    assert "secret" in try_decrypt(victim.server_crypto(method), view.ciphertexts)


def test_first_layers_variant_sends_no_plaintext_of_layers_0_and_1(victim, public_model, columns):
    batch, start, after = _step(victim, "round1")
    upload, _, _ = client_upload(
        "shelora+first-layers", victim, after, start, batch=batch, labels=[1], budget=4,
        columns=columns,
    )  # fmt: skip

    res, view = _attack(victim, public_model, "shelora+first-layers", upload, start, "round1",
                        columns=columns, budget=4)  # fmt: skip

    assert res is None
    layers = {int(n.split("layers.")[1].split(".")[0]) for n in view.after.factors}
    assert layers.isdisjoint({0, 1}) and len(layers) == 28


# ---------------------------------------------------------------------------- pure parts
def test_first_layers_round_gives_every_client_the_flexlora_update_of_every_layer():
    from shelora_core.engine import run_round

    rng = np.random.default_rng(1)
    names = [f"model.layers.{i}.self_attn.q_proj" for i in range(3)]
    cfg = FederatedConfig(
        method="shelora+first-layers", num_clients=2, ranks=(4, 8), he_budgets=(2, 2)
    )
    keys = KeyHolder.generate("add_only")
    cols = {n: [3, 7] for n in names}
    clients = [
        AdapterWeights(
            r,
            16.0,
            {n: (rng.normal(0, 0.01, (12, r)), rng.normal(0, 0.1, (r, 10))) for n in names},
            {},
        )  # fmt: skip
        for r in (4, 8)
    ]
    sizes = [30, 10]

    trace = run_round(cfg, clients, num_examples=sizes, client_crypto=keys.client(),
                      server_crypto=keys.server(), columns=cols, receive_ranks=[10])  # fmt: skip

    ups = trace.upload_messages()
    assert all(f"{n}|A" not in u.tensors and f"{n}|B" not in u.tensors
               for u in ups for n in names[:2])  # fmt: skip
    got = trace.received[0]
    for name in names:  # layers 0-1 from the first-layer sums, layer 2 from SHE-LoRA
        want = sum(n * (16.0 / w.rank) * w.factors[name][0] @ w.factors[name][1]
                   for w, n in zip(clients, sizes, strict=True)) / sum(sizes)  # fmt: skip
        b, a = got.factors[name]
        np.testing.assert_allclose((16.0 / 10) * b.astype(np.float64) @ a, want, atol=1e-6)
    she, extra = FirstLayersSHELoRA.split_upload(ups[0])
    assert she.header["ciphertexts"] + len(extra) == ups[0].header["ciphertexts"]
    assert len(extra) == ups[0].header["first_layers"]["ciphertexts"] > 0


def test_adaptive_attacker_drops_grad_b_rows_with_unknown_entries_oblivious_reads_zeros():
    m, r, n = 6, 3, 5
    name0, name1 = "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"
    start = AdapterWeights(
        r, 3.0, {k: (np.zeros((m, r)), np.ones((r, n))) for k in (name0, name1)}, {}
    )
    after = AdapterWeights(r, 3.0, {k: (np.full((m, r), -2.0), np.ones((r, n))) for k in (name0, name1)}, {})  # fmt: skip
    hidden_b = np.zeros((m, r), bool)
    hidden_b[[1, 4], 0] = True
    view = ServerView("maskcrypt", after, {}, {name0: hidden_b}, [], 0)
    knowledge = server_knowledge("maskcrypt", start, update="round1", lr=2.0, bos_id=1,
                                 batch_size=1)  # fmt: skip

    obl = observed_update(view, knowledge, attacker="oblivious").layers[0]
    ada = observed_update(view, knowledge, attacker="adaptive").layers[0]

    assert obl.grad_b.shape == (m, r) and obl.grad_b[1, 0] == 0 and obl.grad_b[0, 0] == 1.0
    assert ada.grad_b.shape == (m - 2, r) and np.all(ada.grad_b == 1.0)


def test_plans_and_overrides():
    quick = attack_plan("quick")
    methods = {c.method for c in quick["cells"]}

    small, ignored = apply_overrides(quick, {"batch_sizes": [1], "n_batches": 2, "rounds": 1})

    assert methods == {"flexlora", "flexlora-dp", "maskcrypt", "shelora", "shelora+first-layers",
                       "shelora-dp", "fedshield", "full_he"}  # fmt: skip
    assert {c.attacker for c in quick["cells"]} == {
        "oblivious",
        "adaptive",
        "b-channel",
        "optimisation",
    }
    assert {c.steps for c in quick["cells"] if c.update == "multistep-sgd"} == {2}
    assert small["n_batches"] == 2 and ignored == ["rounds"]
    assert {c.batch_size for c in small["cells"]} == {1}
    with pytest.raises(ValueError, match="leave no cell"):
        apply_overrides(quick, {"ranks": [3]})
    with pytest.raises(ValueError, match="unknown profile"):
        attack_plan("huge")


def test_run_grid_writes_records_incrementally_and_resumes_without_recomputing(
    tmp_path, victim, public_model
):
    plan = {
        "cells": [Cell("flexlora", "oblivious", 1, RANK, "round1")],
        "n_batches": 1,
        "max_tokens": 12,
        "negotiation_clients": 1,
        "calibration_examples": 2,
    }
    ckpt = tmp_path / "attack_records.jsonl"

    first = run_grid(plan, checkpoint=ckpt, victim=victim, public_model=public_model,
                     progress=False)  # fmt: skip
    lines = ckpt.read_text().splitlines()
    again = run_grid(plan, checkpoint=ckpt, victim=None, public_model=None, progress=False)

    assert len(lines) == 1 and len(ckpt.read_text().splitlines()) == 1
    assert again == first  # read back, not recomputed (no model was given the second time)
    row = summarize(first)[0]
    assert row["rouge1"] >= 0.9 and row["n_batches"] == 1
    assert json.loads(lines[0])["examples"][0]["reference"] == row["examples"][0]["reference"]


@pytest.mark.slow
def test_the_optimisation_attacker_reads_the_upload_bytes_in_the_grid(
    tmp_path, victim, public_model
):
    cell = Cell("shelora", OPTIMISATION, 1, RANK, "later", budget=4, opt_iters=2, opt_seconds=8.0)
    plan = {"cells": [cell], "n_batches": 1, "max_tokens": 8, "negotiation_clients": 1,
            "calibration_examples": 2}  # fmt: skip

    rec = run_grid(plan, checkpoint=tmp_path / "records.jsonl", victim=victim,
                   public_model=public_model, progress=False)[0]  # fmt: skip

    assert rec["route"] == OPTIMISATION and 1 <= rec["iterations"] <= 2
    assert rec["stopped"] in ("iterations", "time") and rec["ciphertexts"] > 0
    assert set(rec["hidden_columns"].values()) == {4}  # SHE-LoRA's encrypted columns, layers 0-1
    # the true batch matches what the server decoded (adaptive masking); two steps do not
    assert rec["true_distance"] < 1e-3 < rec["opt_distance"]
    assert 0.0 <= rec["rouge1"] <= 1.0 and len(rec["examples"]) == 1
