"""Faults: bad clients refused by name, rounds that go on, crashes and damaged state survived.

The message-level cases come from :mod:`shelora_core.faults` (the same cases ``make faults``
records in results/<profile>/faults.json); the crash and disk cases from
:mod:`shelora_core.fault_crash`, on a real MiniLM run.
"""

import numpy as np
import pytest

from shelora_core import faults
from shelora_core.ckks import CKKSError, ClientCrypto, ServerCrypto
from shelora_core.errors import ConfigError, ProtocolError, RoundError
from shelora_core.fault_crash import crash_cases, disk_cases
from shelora_core.federation import Federation


@pytest.fixture(scope="module")
def keys():
    return faults.make_keys()


@pytest.fixture(scope="module")
def cases(keys):
    return faults.run_cases(keys=keys)


def test_every_fault_is_refused_by_name_or_is_out_of_the_threat_model(cases):
    # Assert: nothing passes silently, nothing ends in an error that names no one
    unexpected = [(c.method, c.kind, c.name, c.observed, c.detail[:120]) for c in cases
                  if c.observed != c.expected]  # fmt: skip
    assert unexpected == []
    totals = faults.summarize(cases)
    assert totals["tried"] >= 300
    assert totals["silently_accepted"] == totals["obscure"] == totals["data_lost"] == 0
    # every registered method met the upload and the broadcast faults
    kinds = {(c.method, c.kind) for c in cases}
    for method in faults.METHODS:
        assert (method, "upload") in kinds and (method, "broadcast") in kinds


def test_only_forged_foreign_ciphertexts_pass_and_only_for_encrypted_methods(cases):
    passed = {(c.method, c.name) for c in cases if c.observed == "undetectable"}
    encrypted = {m for m in faults.METHODS if faults._encrypted(m)}
    assert passed == {(m, next(iter(faults.UNDETECTABLE))) for m in encrypted}


def test_a_round_with_one_faulty_client_completes_for_the_others(keys):
    fed = faults.Federation3("shelora", keys)
    bad = bytearray(fed.uploads[1])
    bad[-30] ^= 1

    res = fed.server_round([fed.uploads[0], bytes(bad), fed.uploads[2]])
    alone = fed.server_round([fed.uploads[0], fed.uploads[2]], senders=[0, 2])

    assert res.clients == [0, 2]
    [rej] = res.rejected
    assert rej["client_id"] == 1 and rej["reason"] == "malformed"
    assert "client 1" in rej["error"] and "SHA-256" in rej["error"]
    # the broadcast is the two honest clients' aggregate, re-weighted over them
    from shelora_core.client import receive

    a = receive(fed.cfg, res.broadcast, rank=8, crypto=fed.client)
    b = receive(fed.cfg, alone.broadcast, rank=8, crypto=fed.client)
    for layer in a.factors:
        np.testing.assert_allclose(a.factors[layer][0] @ a.factors[layer][1],
                                   b.factors[layer][0] @ b.factors[layer][1], atol=1e-6)  # fmt: skip


def test_too_few_valid_uploads_fail_the_round_with_every_refusal_listed(keys):
    fed = faults.Federation3("flexlora", keys)
    fed.cfg = fed.cfg.replace(min_clients=3)
    bad = fed.uploads[1][:-3]

    with pytest.raises(RoundError, match="2 valid upload.*min_clients = 3.*client 1") as err:
        fed.server_round([fed.uploads[0], bad, fed.uploads[2]])

    assert [r["client_id"] for r in err.value.rejected] == [1]


def test_a_round_where_every_sampled_client_refuses_names_their_reasons(
    tiny_config, tmp_path, monkeypatch
):
    # a diverged local update: each client refuses to encrypt it, so nothing reaches the server;
    # the error must say why (the server alone would report "0 valid uploads of 0; refused: none")
    import shelora_core.federation as federation

    def refuse(cfg, model, data, *, client_id, **kwargs):
        raise CKKSError(f"a value of 4.5e+06 to encrypt exceeds 1.05e+05 (client {client_id})")

    monkeypatch.setattr(federation, "client_step", refuse)
    fed = Federation(tiny_config.replace(rounds=1), results_dir=tmp_path)
    with pytest.raises(RoundError, match=r"0 valid upload.*2 sampled client\(s\) refused") as err:
        fed.run()
    assert "client 0: a value of 4.5e+06" in str(err.value)
    assert sorted(r["client_id"] for r in err.value.rejected) == [0, 1]


def test_a_grid_run_can_stop_at_a_round_it_cannot_aggregate_and_is_reused_as_stopped(
    tiny_config, tmp_path, monkeypatch
):
    import shelora_core.federation as federation

    real = federation.client_step

    def diverge_in_round_2(cfg, model, data, *, client_id, round_, **kwargs):
        if round_ == 2:
            raise CKKSError(f"a value of 4.5e+06 to encrypt exceeds 1.05e+05 (client {client_id})")
        return real(cfg, model, data, client_id=client_id, round_=round_, **kwargs)

    monkeypatch.setattr(federation, "client_step", diverge_in_round_2)
    cfg = tiny_config.replace(rounds=3, eval_every=2)
    with pytest.raises(ValueError, match="on_round_error='skip'"):
        Federation(cfg, results_dir=tmp_path).run(on_round_error="skip")
    res = Federation(cfg, results_dir=tmp_path).run(on_round_error="stop")
    assert [h["round"] for h in res.history] == [1] and res.stopped["round"] == 2
    assert "client 1: a value of 4.5e+06" in res.stopped["error"]
    summary = res.summary()
    assert summary["rounds"] == 1 and summary["stopped"]["round"] == 2
    assert summary["final_accuracy"] is not None  # the last aggregated round is evaluated
    # a finished grid reuses the stopped run instead of training it again
    monkeypatch.setattr(federation, "client_step", None)  # any training would fail
    again = Federation(cfg, results_dir=tmp_path).run(reuse_complete=True)
    assert again.meta["reused"] and again.stopped["round"] == 2
    assert again.history == res.history


def test_encrypted_sums_cannot_leave_the_ckks_range(keys):
    # three legal uploads at 0.46x the bound used to decrypt to a wrapped-around sum
    crypto = keys["add_only"].client()
    fed = faults.Federation3("shelora", keys)
    from shelora_core.methods import get_method

    method = get_method("shelora", fed.cfg)
    with pytest.raises(CKKSError, match="share of each of 3 clients"):
        method._encrypt_summed(crypto, np.array([0.46 * crypto.max_abs]))
    ok = method._encrypt_summed(crypto, np.array([0.3 * crypto.max_abs]))
    summed = keys["add_only"].server().add([ok, ok, ok])
    assert crypto.decrypt(summed, 1)[0] == pytest.approx(0.9 * crypto.max_abs, rel=1e-6)
    with pytest.raises(ConfigError, match="sums up to"):
        method.check_sum_range(10**6, crypto.max_abs)


def test_a_client_refuses_a_stale_broadcast_in_its_round_step(tiny_config, minilm_model, tmp_path):
    from shelora_core.client import client_step

    cfg = tiny_config.replace(rounds=3, local_steps=1, eval_examples=16)
    fed = Federation(cfg, results_dir=tmp_path, model=minilm_model)
    fed.run(stop_after_round=1)
    first = fed.last_broadcast()

    with pytest.raises(ProtocolError, match="stale or replayed"):
        client_step(cfg, minilm_model, fed.clients[0], client_id=0, round_=3, broadcast=first)


def test_a_faulty_client_in_a_federated_run_is_recorded_and_the_run_goes_on(
    tiny_config, minilm_model, tmp_path, monkeypatch
):
    from shelora_core import federation

    real = federation.client_step

    def flaky(cfg, model, data, *, client_id, **kw):
        up, loss, secs = real(cfg, model, data, client_id=client_id, **kw)
        return (up[:-1] if client_id == 1 else up), loss, secs

    monkeypatch.setattr(federation, "client_step", flaky)
    cfg = tiny_config.replace(local_steps=1, eval_examples=16)

    hist = Federation(cfg, results_dir=tmp_path, model=minilm_model).run().history

    assert [h["clients"] for h in hist] == [1, 1]
    for h in hist:
        [rej] = h["rejected"]
        assert rej["client_id"] == 1 and "truncated" in rej["error"]
        assert h["accuracy"] is not None


def test_each_role_has_its_own_directory_and_the_servers_holds_no_secret(
    tiny_config, minilm_model, tmp_path
):
    cfg = tiny_config.replace(method="shelora", he_budgets=(1, 2), rounds=1, local_steps=1,
                              calibration_examples=8, eval_examples=16)  # fmt: skip
    fed = Federation(cfg, results_dir=tmp_path, model=minilm_model)
    fed.run()
    server = fed.role_dir("server")

    names = sorted(p.name for p in server.iterdir())
    assert names == ["checkpoint.bin", "public.ctx"]
    ServerCrypto((server / "public.ctx").read_bytes())  # a public context (refuses a secret one)
    with pytest.raises(CKKSError, match="public context"):
        ClientCrypto((server / "public.ctx").read_bytes())
    for i in range(cfg.num_clients):
        client = fed.role_dir("client", i)
        assert {"secret.ctx", "ope.key", "columns.json"} <= {p.name for p in client.iterdir()}
        ClientCrypto((client / "secret.ctx").read_bytes())
    assert (fed.role_dir("evaluator") / "secret.ctx").exists()
    assert not any(p.suffix == ".key" for p in server.rglob("*"))


def test_damaged_state_is_refused_by_name_and_keys_are_never_rewritten(minilm_model, tmp_path):
    got = list(disk_cases(tmp_path, model=minilm_model))

    assert len(got) >= 12
    assert [(c.name, c.observed) for c in got if c.observed != "rejected"] == []


@pytest.mark.parametrize(("method", "every"), [("flexlora", 1), ("shelora", 4)])
def test_a_run_killed_at_any_write_point_resumes_to_the_uninterrupted_result(
    method, every, minilm_model, tmp_path
):
    # FlexLoRA: every write point, exactly; SHE-LoRA: every 4th point (key setup, negotiation,
    # checkpoints), up to CKKS noise (make faults runs every point)
    got = list(crash_cases(tmp_path, (method,), model=minilm_model, every=every))

    assert len(got) >= 5
    assert [(c.name, c.observed, c.detail) for c in got if c.observed != "recovered"] == []
