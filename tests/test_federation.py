"""The federation loop: methods, determinism, resume, roles."""

import json

import numpy as np
import pytest

from shelora_core import records
from shelora_core.aggregation import lora_scaling
from shelora_core.federation import Federation
from shelora_core.lora import AdapterWeights
from shelora_core.messages import decode, encode
from shelora_core.methods import get_method
from shelora_core.methods.wire import adapter_to_upload
from shelora_core.server import sample_clients, server_step


def _random_adapter(rank, shapes, head, seed):
    rng = np.random.default_rng(seed)
    f = {
        k: (
            rng.normal(size=(m, rank)).astype(np.float32),
            rng.normal(size=(rank, n)).astype(np.float32),
        )
        for k, (m, n) in shapes.items()
    }
    return AdapterWeights(
        rank=rank, alpha=16.0, factors=f, head={k: v + seed for k, v in head.items()}
    )


def _uploads(method, ranks, sizes, shapes=None, head=None):
    shapes = shapes or {"l0": (12, 10), "l1": (12, 10)}
    head = head or {"weight": np.zeros((2, 12), np.float32)}
    ws = [_random_adapter(r, shapes, head, i) for i, r in enumerate(ranks)]
    ups = [
        encode(adapter_to_upload(w, method=method, round_=1, client_id=i, num_examples=n))
        for i, (w, n) in enumerate(zip(ws, sizes, strict=False))
    ]
    return ws, ups


def test_flexlora_server_step_gives_each_client_the_best_rank_r_approximation(tiny_config):
    # Prepare: three clients with ranks 2/4/8 and 10/30/60 examples
    cfg = tiny_config.replace(ranks=(2, 4, 8), num_clients=3)
    ws, ups = _uploads("flexlora", (2, 4, 8), (10, 30, 60))
    p = np.array([10, 30, 60]) / 100
    # Execute
    bc = decode(server_step(cfg, ups, round_=1), expect_kind="broadcast")
    # Assert: dW = sum p_i s_i B_i A_i, truncated per client by Eckart-Young
    dw = sum(
        pi * lora_scaling(16.0, w.rank) * w.factors["l0"][0].astype(float) @ w.factors["l0"][1]
        for pi, w in zip(p, ws, strict=False)
    )
    u, s, vt = np.linalg.svd(dw)
    for r in (2, 4, 8):
        mine = get_method("flexlora").client_weights(bc, rank=r, alpha=16.0)
        b, a = mine.factors["l0"]
        best = (u[:, :r] * s[:r]) @ vt[:r]
        np.testing.assert_allclose(lora_scaling(16.0, r) * b.astype(float) @ a, best, atol=1e-4)
    np.testing.assert_allclose(
        bc.tensors["head|weight"], sum(pi * i for i, pi in enumerate(p)), atol=1e-6
    )


def test_fedavg_server_step_averages_zero_padded_factors(tiny_config):
    cfg = tiny_config.replace(method="fedavg", ranks=(2, 4))
    ws, ups = _uploads("fedavg", (2, 4), (25, 75))
    bc = decode(server_step(cfg, ups, round_=1), expect_kind="broadcast")
    b = bc.tensors["l0|B"]
    expect = 0.75 * ws[1].factors["l0"][0]
    expect[:, :2] += 0.25 * ws[0].factors["l0"][0]
    np.testing.assert_allclose(b, expect, atol=1e-6)


def test_server_step_refuses_an_upload_from_another_round(tiny_config):
    _, ups = _uploads("flexlora", (2, 4), (10, 10))
    with pytest.raises(ValueError, match="for round 1, not 2"):
        server_step(tiny_config, ups, round_=2)


def test_weights_renormalise_over_clients_that_answered(tiny_config):
    # a dropout: only client 1 answers, so its update is the aggregate (p = 1)
    ws, ups = _uploads("flexlora", (2, 4), (10, 30))
    bc = decode(server_step(tiny_config, ups[1:], round_=1), expect_kind="broadcast")
    mine = get_method("flexlora").client_weights(bc, rank=4, alpha=16.0)
    b, a = mine.factors["l0"]
    np.testing.assert_allclose(
        b.astype(float) @ a,
        ws[1].factors["l0"][0].astype(float) @ ws[1].factors["l0"][1],
        atol=1e-4,
    )


def test_client_sampling_is_seeded_and_sized(tiny_config):
    cfg = tiny_config.replace(num_clients=10, client_fraction=0.3, train_examples=None)
    assert sample_clients(cfg, 1) == sample_clients(cfg, 1)
    assert len(sample_clients(cfg, 1)) == 3
    assert any(sample_clients(cfg, r) != sample_clients(cfg, 1) for r in range(2, 6))


def test_two_runs_with_one_seed_give_identical_metrics(tiny_config, minilm_model, tmp_path):
    a = Federation(tiny_config, results_dir=tmp_path / "a", model=minilm_model).run()
    b = Federation(tiny_config, results_dir=tmp_path / "b", model=minilm_model).run()
    keys = ("train_loss", "accuracy", "macro_f1", "upload_bytes", "broadcast_bytes")
    assert [[h[k] for k in keys] for h in a.history] == [[h[k] for k in keys] for h in b.history]
    c = Federation(
        tiny_config.replace(seed=1), results_dir=tmp_path / "c", model=minilm_model
    ).run()
    assert [h["train_loss"] for h in c.history] != [h["train_loss"] for h in a.history]


def test_interrupted_run_resumes_and_equals_an_uninterrupted_run(
    tiny_config, minilm_model, tmp_path
):
    cfg = tiny_config.replace(rounds=3, method="fedavg")
    full = Federation(cfg, results_dir=tmp_path / "full", model=minilm_model).run()
    first = Federation(cfg, results_dir=tmp_path / "cut", model=minilm_model).run(
        stop_after_round=1
    )
    assert len(first.history) == 1
    resumed = Federation(cfg, results_dir=tmp_path / "cut", model=minilm_model).run()
    keys = ("round", "train_loss", "accuracy", "upload_bytes")
    assert [[h[k] for k in keys] for h in resumed.history] == [
        [h[k] for k in keys] for h in full.history
    ]
    lines = (
        (tmp_path / "cut" / "federated_tuning" / f"{cfg.run_name}.jsonl").read_text().splitlines()
    )
    assert [json.loads(x)["round"] for x in lines] == [1, 2, 3]
    assert resumed.meta["resumed_after_round"] == 1 and "resumed_after_round" not in full.meta
    # resuming a checkpoint that already holds every round recomputes nothing, so the summary
    # keeps the provenance of the run that computed it instead of today's commit and time
    fed = Federation(cfg, results_dir=tmp_path / "cut", model=minilm_model)
    before = fed.summary_path.read_text()
    again = fed.run()
    assert again.meta["reused"] is True
    assert again.meta["time_utc"] == resumed.meta["time_utc"]
    assert fed.summary_path.read_text() == before


def test_a_complete_run_is_reused_only_when_asked_and_only_from_current_code(
    tiny_config, minilm_model, tmp_path, monkeypatch
):
    import shutil

    from shelora_core import federation

    cfg = tiny_config.replace(rounds=2, method="fedavg")
    full = Federation(cfg, results_dir=tmp_path, model=minilm_model).run()
    fed = Federation(cfg, results_dir=tmp_path, model=minilm_model)
    shutil.rmtree(fed.checkpoint_dir)  # checkpoints are not committed; the JSONL is

    def no_training(*args, **kwargs):
        raise AssertionError("a complete run was trained again")

    monkeypatch.setattr(federation, "client_step", no_training)
    again = fed.run(reuse_complete=True)
    assert again.history == json.loads(json.dumps(full.history))
    assert again.meta["reused"] is True
    assert again.meta["git_commit"] == full.meta["git_commit"]
    summary = json.loads(fed.summary_path.read_text())
    assert summary["final_accuracy"] == full.final_accuracy and summary["rounds"] == 2
    with pytest.raises(AssertionError, match="trained again"):
        fed.run()  # without reuse_complete: trains
    monkeypatch.setattr(records, "RESULTS_VERSION", records.RESULTS_VERSION + 1)
    assert fed.completed_history() is None  # older code's results are not reused
    with pytest.raises(AssertionError, match="trained again"):
        fed.run(reuse_complete=True)


def test_upload_bytes_are_measured_message_lengths(tiny_config, minilm_model, tmp_path):
    res = Federation(tiny_config.replace(rounds=1), results_dir=tmp_path, model=minilm_model).run()
    h = res.history[0]
    # 2 clients with ranks 2 and 4 on 6 layers of 384 x 384, float32, plus the head and a header
    floats = sum(6 * 2 * 384 * r for r in (2, 4)) + 2 * (2 * 384 + 2)
    assert floats * 4 < h["upload_bytes"] < floats * 4 + 2 * 4096
    s = res.summary()
    assert {"method", "ranks", "partition", "final_accuracy", "rounds"} <= set(s)


def test_shelora_ablations_run_through_the_federation(tiny_config, minilm_model, tmp_path):
    # Prepare: withhold + sensitivity-ranked (negotiated) columns vs encrypt + random columns
    base = tiny_config.replace(
        method="shelora",
        he_budgets=(1, 2),
        rounds=1,
        local_steps=1,
        calibration_examples=8,
        eval_examples=16,
    )
    withhold = Federation(
        base.replace(shelora_protect="withhold"), results_dir=tmp_path, model=minilm_model
    )
    encrypt = Federation(
        base.replace(column_order="random"), results_dir=tmp_path, model=minilm_model
    )
    # Execute
    w, e = withhold.run().history[0], encrypt.run().history[0]
    # Assert: withholding needs no keys and sends fewer bytes; round 1 trains the same adapters
    assert withhold.client_crypto is None and withhold.server_crypto is None
    assert w["key_bytes_public"] == 0 < e["key_bytes_public"]
    assert w["upload_bytes"] < e["upload_bytes"]
    assert w["train_loss"] == pytest.approx(e["train_loss"], abs=1e-6)
    assert w["accuracy"] is not None and e["accuracy"] is not None
    assert w["negotiation_upload_bytes"] > 0 and "negotiation_upload_bytes" not in e
    assert withhold.columns != encrypt.columns  # negotiated vs random G
    bc = decode(withhold.last_broadcast())
    assert bc.header["protect"] == "withhold" and bc.header["ciphertexts"] == 0


def test_maskcrypt_runs_through_the_federation_with_a_mask_exchange(
    tiny_config, minilm_model, tmp_path
):
    cfg = tiny_config.replace(
        method="maskcrypt",
        he_budgets=(1, 2),
        rounds=1,
        local_steps=1,
        calibration_examples=8,
        eval_examples=16,
    )
    fed = Federation(cfg, results_dir=tmp_path, model=minilm_model)
    res = fed.run()
    h = res.history[0]
    assert not fed.server_crypto.context.is_private()
    assert h["consensus_upload_bytes"] > 0 and h["consensus_broadcast_bytes"] > 0
    assert h["client_mask_seconds"] > 0 and h["accuracy"] is not None
    bc = decode(fed.last_broadcast())
    # budgets 1 and 2 columns of 384-row layers on 6 layers: 2 x 384 x 6 values at most
    assert bc.header["encrypted_values"] == 2 * 384 * 6
    s = res.summary()
    assert s["cipher_mode"] == "delta" and s["consensus_bytes_per_round"] > 0


def test_renegotiation_every_k_rounds_records_its_cost_and_resume_reuses_each_list(
    tiny_config, minilm_model, tmp_path
):
    # Prepare: 3 rounds, negotiations before rounds 1 and 3, interrupted after round 2
    cfg = tiny_config.replace(
        method="shelora",
        he_budgets=(1, 2),
        rounds=3,
        local_steps=1,
        calibration_examples=8,
        renegotiate_every=2,
        eval_examples=16,
    )
    first = Federation(cfg, results_dir=tmp_path, model=minilm_model)
    keys = first.role_dir("client", 1)  # every client keeps its OPE key and the lists
    # Execute
    cut = first.run(stop_after_round=2).history
    g1 = json.loads((keys / "columns.json").read_text())["columns"]
    assert not (keys / "columns_r3.json").exists()
    ope_key = (keys / "ope.key").read_bytes()
    resumed = Federation(cfg, results_dir=tmp_path, model=minilm_model)
    full = resumed.run().history
    # Assert: the cost of each negotiation sits in the record of the round it precedes
    assert [("negotiation_upload_bytes" in h) for h in full] == [True, False, True]
    assert full[:2] == cut
    assert full[2]["negotiation_broadcast_bytes"] > 0
    g3 = json.loads((keys / "columns_r3.json").read_text())["columns"]
    assert resumed.columns == g3 and (keys / "ope.key").read_bytes() == ope_key
    assert json.loads((keys / "columns.json").read_text())["columns"] == g1
    bc = decode(resumed.last_broadcast())
    assert bc.header["columns"] == {k: v[:2] for k, v in g3.items()}
    # a finished run reloads the list of its last negotiation
    again = Federation(cfg, results_dir=tmp_path, model=minilm_model)
    assert len(again.run().history) == 3 and again.columns == g3


@pytest.mark.slow
def test_renegotiated_run_interrupted_before_a_negotiation_equals_an_uninterrupted_one(
    tiny_config, minilm_model, tmp_path
):
    cfg = tiny_config.replace(
        method="shelora", he_budgets=(1, 2), rounds=3, calibration_examples=8, renegotiate_every=2
    )
    full = Federation(cfg, results_dir=tmp_path / "full", model=minilm_model)
    ref = full.run().history
    Federation(cfg, results_dir=tmp_path / "cut", model=minilm_model).run(stop_after_round=2)
    resumed = Federation(cfg, results_dir=tmp_path / "cut", model=minilm_model)
    got = resumed.run().history
    # equal up to CKKS noise (each run has its own keys and encryption randomness)
    assert [h["train_loss"] for h in got] == pytest.approx([h["train_loss"] for h in ref], abs=1e-5)
    assert [h["accuracy"] for h in got] == [h["accuracy"] for h in ref]
    assert [("negotiation_upload_bytes" in h) for h in got] == [True, False, True]
    assert resumed.columns == full.columns


def test_logit_adjusted_loss_shifts_logits_by_the_smoothed_log_prior():
    import torch

    from shelora_core.client import batch_loss, log_label_prior

    prior = log_label_prior(torch.tensor([1, 1, 1, 0, 1]), 3)
    torch.testing.assert_close(prior.exp(), torch.tensor([2.0, 5.0, 1.0]) / 8)
    logits, labels = torch.randn(4, 3), torch.tensor([0, 1, 2, 1])
    want = torch.nn.functional.cross_entropy(logits + prior, labels)
    torch.testing.assert_close(
        batch_loss(logits, labels, loss="logit_adjusted", log_prior=prior), want
    )
    torch.testing.assert_close(
        batch_loss(logits, labels), torch.nn.functional.cross_entropy(logits, labels)
    )
    with pytest.raises(ValueError, match="log label prior"):
        batch_loss(logits, labels, loss="logit_adjusted")


def test_local_train_uses_the_client_prior_and_the_head_learning_rate(minilm_model):
    # a client that holds only label 1: under logit adjustment its skew is explained by the
    # offset log(17/18) vs log(1/18), so the loss starts near -log(17/18) instead of log 2;
    # and the head moves head_lr_scale times as far as the adapter's rate in one Adam step
    import torch

    from shelora_core.client import local_train
    from shelora_core.data import ClientData

    torch.manual_seed(0)
    ids = torch.randint(1000, 5000, (16, 8))
    data = ClientData(ids, torch.ones_like(ids), torch.ones(16, dtype=torch.long))
    start = minilm_model.init_weights(2, seed=0)
    losses, moves = {}, {}
    for loss, scale in (("ce", 1.0), ("logit_adjusted", 1.0), ("ce", 10.0)):
        minilm_model.load(start)
        bias0 = minilm_model.head_parameters()[1].detach().clone()
        losses[loss, scale] = local_train(
            minilm_model,
            data,
            steps=1,
            batch_size=16,
            lr=1e-3,
            weight_decay=0.0,
            seed=0,
            loss=loss,
            head_lr_scale=scale,
        )
        moves[loss, scale] = float((minilm_model.head_parameters()[1] - bias0).abs().max())
    assert losses["logit_adjusted", 1.0] < 0.3 < 0.5 < losses["ce", 1.0]
    assert moves["ce", 10.0] == pytest.approx(10 * moves["ce", 1.0], rel=0.05)
    assert moves["ce", 1.0] == pytest.approx(1e-3, rel=0.05)


def test_dp_and_first_layers_variants_train_through_the_federation(
    tiny_config, minilm_model, tmp_path
):
    # Prepare: FlexLoRA with local DP (no noise, clipped: must equal FlexLoRA when the bound is
    # loose) and the first-layers defence on blocks 0-1 of MiniLM's 6
    base = tiny_config.replace(rounds=2, local_steps=1, eval_examples=16)
    loose = base.replace(method="flexlora-dp", dp_noise_multiplier=0.0, dp_clip=1e6)
    first = base.replace(method="shelora+first-layers", he_budgets=(1, 2), column_order="random")

    # Execute
    plain = Federation(base, results_dir=tmp_path, model=minilm_model).run()
    dp = Federation(loose, results_dir=tmp_path, model=minilm_model).run()
    fl_fed = Federation(first, results_dir=tmp_path, model=minilm_model)
    fl = fl_fed.run()

    # Assert
    for a, b in zip(plain.history, dp.history, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-6)
        assert a["upload_bytes"] == b["upload_bytes"]  # to the server a DP upload is FlexLoRA's
    assert dp.final_accuracy == pytest.approx(plain.final_accuracy, abs=1e-9)
    bc = decode(fl_fed.last_broadcast())
    assert bc.header["method"] == "shelora+first-layers"
    assert sorted(bc.header["first_layers"]["layers"]) == sorted(
        bc.header["first_layers"]["shapes"]
    )
    assert all(".layer.0." in n or ".layer.1." in n for n in bc.header["first_layers"]["shapes"])
    assert not any(
        (".layer.0." in k or ".layer.1." in k) and k.endswith(("|U", "|Vt", "|S"))
        for k in bc.tensors
    )
    assert fl.history[-1]["accuracy"] is not None
