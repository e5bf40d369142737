"""The round engine: one path for every method, and a server side that needs no torch."""

import json
import subprocess
import sys

import numpy as np
import pytest

from shelora_core.ckks import KeyHolder
from shelora_core.client import propose_masks, upload
from shelora_core.config import METHODS, FederatedConfig
from shelora_core.engine import run_round
from shelora_core.he_cost import synthetic_adapter
from shelora_core.methods import ckks_params_for

LAYERS = {f"model.layers.{i}.self_attn.q_proj": (24, 16) for i in range(3)}
COLUMNS = {k: [1, 5, 9, 2] for k in LAYERS}


def _cfg(method: str) -> FederatedConfig:
    return FederatedConfig(
        method=method,
        model="smollm2",
        num_clients=3,
        ranks=(2, 4, 8),
        he_budgets=(1, 2, 4),
        dp_noise_multiplier=0.5 if method == "flexlora-dp" else None,
    )


def _adapters(seed: int = 0):
    rng = np.random.default_rng(seed)
    head = {"weight": np.zeros((2, 16), np.float32)}
    return [synthetic_adapter(LAYERS, r, rng, head=dict(head)) for r in (2, 4, 8)]


@pytest.fixture(scope="module")
def keys():
    return {p: KeyHolder.generate(p) for p in ("add_only", "fedshield", "paper_mm")}


def test_every_registered_method_runs_one_round_through_the_engine(keys):
    for method in METHODS:
        cfg = _cfg(method)
        params = ckks_params_for(cfg)
        kh = keys[params] if params else None
        grads = [w.factors for w in _adapters(2)] if method == "maskcrypt" else None

        trace = run_round(cfg, _adapters(), client_crypto=kh.client() if kh else None,
                          server_crypto=kh.server() if kh else None, columns=COLUMNS,
                          starts=_adapters(1), grads=grads)  # fmt: skip

        assert len(trace.uploads) == 3 and trace.broadcast
        assert [w.rank for w in trace.received] == [2, 4, 8], method
        assert set(trace.received[2].factors) == set(LAYERS), method


def test_server_step_runs_for_every_method_where_torch_cannot_be_imported(keys, tmp_path):
    # Prepare: every method's client side produces real bytes in this process
    cases = {}
    for method in METHODS:
        cfg = _cfg(method)
        params = ckks_params_for(cfg)
        kh = keys[params] if params else None
        crypto = kh.client() if kh else None
        ads, starts = _adapters(), _adapters(1)
        case = {"config": cfg.to_dict(), "public": None, "proposals": [], "uploads": []}
        if kh:
            (tmp_path / f"{method}.ctx").write_bytes(kh.public_bytes())
            case["public"] = f"{method}.ctx"
        if method == "maskcrypt":
            grads = _adapters(2)
            for i, (w, w0, g) in enumerate(zip(ads, starts, grads, strict=True)):
                blob = propose_masks(cfg, w, w0, g.factors, round_=1, client_id=i)
                (tmp_path / f"{method}.prop{i}").write_bytes(blob)
                case["proposals"].append(f"{method}.prop{i}")
            from shelora_core.server import server_consensus

            consensus = server_consensus(cfg, [(tmp_path / p).read_bytes()
                                               for p in case["proposals"]], round_=1)  # fmt: skip
        else:
            consensus = None
        for i, (w, w0) in enumerate(zip(ads, starts, strict=True)):
            blob = upload(cfg, w, round_=1, client_id=i, num_examples=10 + i, crypto=crypto,
                          columns=COLUMNS, consensus=consensus, start=w0)  # fmt: skip
            (tmp_path / f"{method}.up{i}").write_bytes(blob)
            case["uploads"].append(f"{method}.up{i}")
        cases[method] = case
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    script = r"""
import builtins, json, pathlib, sys
real_import = builtins.__import__
def guarded(name, *args, **kwargs):
    if name.split(".")[0] in ("torch", "transformers", "peft"):
        raise ImportError(f"the server side imported {name}")
    return real_import(name, *args, **kwargs)
builtins.__import__ = guarded
d = pathlib.Path(sys.argv[1])
from shelora_core.ckks import ServerCrypto
from shelora_core.config import FederatedConfig
from shelora_core.server import server_consensus, server_step
out = {}
for method, case in json.loads((d / "cases.json").read_text()).items():
    cfg = FederatedConfig.from_dict(case["config"])
    crypto = ServerCrypto((d / case["public"]).read_bytes()) if case["public"] else None
    consensus = None
    if case["proposals"]:
        consensus = server_consensus(cfg, [(d / p).read_bytes() for p in case["proposals"]], round_=1)
    ups = [(d / u).read_bytes() for u in case["uploads"]]
    out[method] = len(server_step(cfg, ups, round_=1, crypto=crypto, consensus=consensus))
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "peft"))
print(json.dumps({"sizes": out, "loaded": loaded}))
"""

    # Execute: a fresh interpreter where torch, transformers and peft cannot be imported
    res = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True,
                         text=True, timeout=300)  # fmt: skip

    # Assert
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["loaded"] == []
    assert sorted(got["sizes"]) == sorted(METHODS)
    assert all(size > 0 for size in got["sizes"].values())


def test_the_server_rejects_two_uploads_from_one_client(keys):
    cfg = _cfg("flexlora")
    ads = _adapters()
    ups = [upload(cfg, w, round_=1, client_id=0, num_examples=10) for w in ads[:2]]
    from shelora_core.errors import RoundError
    from shelora_core.server import server_round

    # Act: only the duplicated client answered: nothing valid remains
    with pytest.raises(RoundError, match="2 uploads from client 0") as err:
        server_round(cfg, ups, round_=1)
    # a third, honest client: the round completes without either copy
    ups.append(upload(cfg, ads[1], round_=1, client_id=1, num_examples=10))
    res = server_round(cfg, ups, round_=1)

    # Assert
    assert [r["reason"] for r in err.value.rejected] == ["duplicate"]
    assert res.clients == [1]
    assert [(r["client_id"], r["reason"]) for r in res.rejected] == [(0, "duplicate")]


def test_factor_averaging_methods_revive_missing_components_alike(keys):
    # full HE decrypts ciphertexts (CKKS noise where no client had a component); FedAvg sees zeros
    cfg = _cfg("fedavg").replace(ranks=(2, 4, 8))
    ads = _adapters()[:2]  # ranks 2 and 4 answer; rank 8's components 4..7 are empty
    plain = run_round(cfg, ads, round_=3, receive_ranks=[8])
    kh = keys["fedshield"]
    enc = run_round(cfg.replace(method="full_he"), ads, round_=3, client_crypto=kh.client(),
                    server_crypto=kh.server(), receive_ranks=[8])  # fmt: skip

    for layer in LAYERS:
        b0, a0 = plain.received[0].factors[layer]
        b1, a1 = enc.received[0].factors[layer]
        assert np.abs(a0[4:]).max() > 0.01  # revived, not left empty
        np.testing.assert_allclose(a1, a0, atol=1e-5)
        np.testing.assert_allclose(b1, b0, atol=1e-5)


def test_first_layers_server_refuses_a_wrong_ciphertext_count_and_withhold_is_refused(keys):
    from shelora_core.messages import MessageError, decode, encode
    from shelora_core.server import server_round

    cfg = _cfg("shelora+first-layers")
    kh = keys["add_only"]
    ups = [upload(cfg, w, round_=1, client_id=i, num_examples=10, crypto=kh.client(),
                  columns=COLUMNS) for i, w in enumerate(_adapters())]  # fmt: skip
    bad = decode(ups[1])
    bad.header["first_layers"]["ciphertexts"] += 1

    res = server_round(cfg, [ups[0], encode(bad), ups[2]], round_=1, crypto=kh.server())
    assert res.clients == [0, 2]  # the round completes without the bad upload
    [rej] = res.rejected
    assert rej["client_id"] == 1 and "2 first-layer ciphertexts" in rej["error"]
    with pytest.raises(MessageError, match="first-layer ciphertexts"):
        server_round(cfg, [encode(bad)], round_=1, crypto=kh.server())
    with pytest.raises(ValueError, match="shelora_protect"):
        cfg.replace(shelora_protect="withhold")
