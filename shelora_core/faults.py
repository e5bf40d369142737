"""Fault injection: the faults a server, a client or a run on disk can meet, tried for real.

Every case goes through the real message path with real TenSEAL keys: three clients build their
uploads (:func:`shelora_core.client.upload`), one of them is made faulty, and the server's round
step (:func:`shelora_core.server.server_round`) must refuse that upload by name and aggregate the
other two; a client must refuse a bad broadcast (:func:`shelora_core.client.receive`); a bad
configuration must fail when it is built; a run killed at any write point must resume to the
result of an uninterrupted one (:func:`crash_cases`, with a model: slower).

Each case records the expected and the observed outcome:

* ``rejected``: refused with a shelora error that names the client (server side) or the reason
  (client, configuration, disk); for uploads the round completed without it;
* ``recovered``: a run killed at a write point resumed to its uninterrupted result;
* ``undetectable``: well-formed but wrong ciphertexts under a forged key fingerprint: a server
  without the secret key cannot tell (the papers' threat model is a semi-honest server and honest
  clients; ``docs/design.md``);
* ``silently_accepted``: a detectable fault that passed;
* ``obscure``: an error that is not a shelora error (``KeyError``, ``TypeError``, ...) or that
  does not name the faulty client;
* ``data_lost``: a crash or a disk fault after which the run cannot be resumed to its
  uninterrupted result, or key material was replaced.

``python -m shelora_core.faults --profile quick`` (``make faults``) writes
``results/<profile>/faults.json`` with every case and the totals.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .adapters import AdapterWeights
from .ckks import KeyHolder
from .config import METHODS, FederatedConfig
from .errors import SheloraError
from .messages import Message, decode, encode

__all__ = ["Case", "OUTCOMES", "broadcast_cases", "run_cases", "summarize", "upload_cases"]

OUTCOMES = ("rejected", "recovered", "undetectable", "silently_accepted", "obscure", "data_lost")

#: the synthetic federation the message-level cases run on: 3 clients, ranks 2/4/8, budgets
#: 1/2/4, three 24 x 16 layers (a real model is not needed to build real messages)
LAYERS = {f"model.layers.{i}.self_attn.q_proj": (24, 16) for i in range(3)}
COLUMNS = {k: [1, 5, 9, 2] for k in LAYERS}
ROUND = 2
FAULTY = 1


@dataclass
class Case:
    """One fault: where it is injected, what it is, what must happen and what did."""

    method: str
    kind: str  # "upload", "broadcast", "config", "disk", "crash", "range", "context"
    name: str
    expected: str = "rejected"
    observed: str = ""
    detail: str = ""

    def expect_refusal(self, fn: Callable[[], Any], *, names: str | None = None) -> Case:
        """Run ``fn``; a shelora error (whose message contains ``names``, when given) is
        ``rejected``, any other error ``obscure``, no error ``silently_accepted``."""
        try:
            fn()
        except SheloraError as exc:
            named = names is None or names in str(exc)
            self.observed = "rejected" if named else "obscure"
            self.detail = f"{type(exc).__name__}: {exc}"
        except Exception as exc:
            self.observed, self.detail = "obscure", f"{type(exc).__name__}: {exc}"
        else:
            self.observed = "silently_accepted"
        return self

    def record(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "kind": self.kind,
            "case": self.name,
            "expected": self.expected,
            "observed": self.observed,
            "ok": self.observed == self.expected,
            "detail": self.detail[:300],
        }


def _config(method: str) -> FederatedConfig:
    return FederatedConfig(
        method=method,
        model="smollm2",
        num_clients=3,
        ranks=(2, 4, 8),
        he_budgets=(1, 2, 4),
        dp_noise_multiplier=0.5 if method == "flexlora-dp" else None,
    )


def _adapters(seed: int) -> list[AdapterWeights]:
    from .he_cost import synthetic_adapter

    rng = np.random.default_rng(seed)
    head = {"weight": np.zeros((2, 16), np.float32), "bias": np.zeros(2, np.float32)}
    return [synthetic_adapter(LAYERS, r, rng, head=copy.deepcopy(head)) for r in (2, 4, 8)]


class Federation3:
    """Three clients' real round-``ROUND`` uploads for one method, and the server's inputs."""

    def __init__(self, method: str, keys: dict[str, KeyHolder]) -> None:
        from .client import propose_masks, upload
        from .methods import ckks_params_for
        from .server import server_consensus

        self.method = method
        self.cfg = _config(method)
        params = ckks_params_for(self.cfg)
        self.kh = keys.get(params) if params else None
        self.other = keys.get(f"{params}:other") if params else None
        self.client = self.kh.client() if self.kh else None
        self.server = self.kh.server() if self.kh else None
        ads, starts = _adapters(0), _adapters(1)
        self.consensus = None
        if self.cfg.method == "maskcrypt":
            grads = _adapters(2)
            props = [
                propose_masks(self.cfg, w, w0, g.factors, round_=ROUND, client_id=i)
                for i, (w, w0, g) in enumerate(zip(ads, starts, grads, strict=True))
            ]
            self.consensus = server_consensus(self.cfg, props, round_=ROUND)

        def make(i: int, crypto: Any = None) -> bytes:
            return upload(
                self.cfg,
                ads[i],
                round_=ROUND,
                client_id=i,
                num_examples=10 + 5 * i,
                crypto=crypto or self.client,
                columns=COLUMNS,
                consensus=self.consensus,
                start=starts[i],
            )

        self.uploads = [make(i) for i in range(3)]
        # the faulty client's upload encrypted under another key (its own, true fingerprint)
        self.foreign = make(FAULTY, self.other.client()) if self.other else None

    def server_round(
        self, uploads: list[Any], sampled: list[int] | None = None, senders: list | None = None
    ) -> Any:
        """The server's round step over ``uploads`` (delivered by ``senders``)."""
        from .server import server_round

        return server_round(
            self.cfg,
            uploads,
            senders=[0, 1, 2] if senders is None and len(uploads) == 3 else senders,
            round_=ROUND,
            crypto=self.server,
            consensus=self.consensus,
            sampled=[0, 1, 2] if sampled is None else sampled,
            layers=LAYERS,
        )


# ----------------------------------------------------------------------------- upload faults
def _edit(fn: Callable[[Message], None]) -> Callable[[bytes, Federation3], bytes]:
    """A fault that edits the decoded upload and re-encodes it (a well-formed message)."""

    def apply(data: bytes, fed: Federation3) -> bytes:
        msg = decode(data)
        fn(msg)
        return encode(msg)

    return apply


def _flip(offset: int) -> Callable[[bytes, Federation3], bytes]:
    def apply(data: bytes, fed: Federation3) -> bytes:
        b = bytearray(data)
        b[offset % len(b)] ^= 0x40
        return bytes(b)

    return apply


def _layer(msg: Message) -> str:
    """The first layer the message carries in plaintext (else the first layer)."""
    return next((k for k in sorted(LAYERS) if f"{k}|B" in msg.tensors), sorted(LAYERS)[0])


def _set(field: str, value: Any) -> Callable[[Message], None]:
    return lambda m: m.header.__setitem__(field, value)


def _drop(field: str) -> Callable[[Message], None]:
    return lambda m: m.header.pop(field, None)


def _tensor(name: str, fn: Callable[[np.ndarray], np.ndarray]) -> Callable[[Message], None]:
    def apply(m: Message) -> None:
        key = name.replace("<L>", _layer(m))
        m.tensors[key] = fn(m.tensors[key])

    return apply


def _del_tensor(name: str) -> Callable[[Message], None]:
    return lambda m: m.tensors.pop(name.replace("<L>", _layer(m)))


def _enc(fn: Callable[[np.ndarray], np.ndarray]) -> Callable[[Message], None]:
    return _tensor("enc|0", fn)


def _put(arr: np.ndarray, value: float) -> np.ndarray:
    out = np.array(arr, copy=True)
    out.flat[0] = value
    return out


def _has_factors(method: str) -> bool:
    return method not in ("fedshield", "full_he")


def _encrypted(method: str) -> bool:
    return method not in ("fedavg", "flexlora", "flexlora-dp")


def _columns_edit(fn: Callable[[list[int]], list[int]]) -> Callable[[Message], None]:
    def apply(m: Message) -> None:
        cols = m.header["columns"]
        key = sorted(cols)[0]
        cols[key] = fn(list(cols[key]))

    return apply


def _plain_protected(m: Message) -> None:
    layer = sorted(m.header["columns"])[0]
    g = m.header["columns"][layer][: int(m.header["budget"])]
    a = np.array(m.tensors[f"{layer}|A"], copy=True)
    a[:, g] = 0.5
    m.tensors[f"{layer}|A"] = a


def _extra_layer(m: Message) -> None:
    src = _layer(m)
    for key in ("A", "B"):
        if f"{src}|{key}" in m.tensors:
            m.tensors[f"model.layers.99.self_attn.q_proj|{key}"] = m.tensors[f"{src}|{key}"]


def _first(fn: Callable[[dict], None]) -> Callable[[Message], None]:
    return lambda m: fn(m.header["first_layers"])


#: (name, applies to method?, fault); a fault returns the bytes the server receives instead of
#: the faulty client's upload, or a list of them
UPLOAD_FAULTS: list[tuple[str, Callable[[str], bool], Callable[[bytes, Federation3], Any]]] = [
    # bytes
    ("truncated", lambda m: True, lambda d, f: d[:-7]),
    ("padded", lambda m: True, lambda d, f: d + b"\0"),
    ("payload bit flip", lambda m: True, _flip(-100)),
    ("digest bit flip", lambda m: True, _flip(20)),
    ("foreign magic", lambda m: True, lambda d, f: b"XXXX" + d[4:]),
    ("future protocol version", lambda m: True, lambda d, f: d[:4] + struct.pack("<H", 9) + d[6:]),
    ("not bytes", lambda m: True, lambda d, f: "an upload"),
    ("empty", lambda m: True, lambda d, f: b""),
    # sender
    ("client_id missing", lambda m: True, _edit(_drop("client_id"))),
    ("client_id a string", lambda m: True, _edit(_set("client_id", "1"))),
    ("client_id a float", lambda m: True, _edit(_set("client_id", 1.5))),
    ("client_id a bool", lambda m: True, _edit(_set("client_id", True))),
    ("client_id out of range", lambda m: True, _edit(_set("client_id", 99))),
    ("client_id negative", lambda m: True, _edit(_set("client_id", -1))),
    ("same client twice", lambda m: True, lambda d, f: [d, d]),
    # round and method
    ("stale round (replay)", lambda m: True, _edit(_set("round", ROUND - 1))),
    ("future round", lambda m: True, _edit(_set("round", ROUND + 1))),
    ("round a string", lambda m: True, _edit(_set("round", str(ROUND)))),
    ("round missing", lambda m: True, _edit(_drop("round"))),
    ("another method", lambda m: True, _edit(_set("method", "no-such-method"))),
    # sample counts
    ("num_examples zero", lambda m: True, _edit(_set("num_examples", 0))),
    ("num_examples negative", lambda m: True, _edit(_set("num_examples", -5))),
    ("num_examples a string", lambda m: True, _edit(_set("num_examples", "20"))),
    ("num_examples a float", lambda m: True, _edit(_set("num_examples", 2.5))),
    ("num_examples a bool", lambda m: True, _edit(_set("num_examples", True))),
    ("num_examples missing", lambda m: True, _edit(_drop("num_examples"))),
    # rank and alpha
    ("rank header wrong", lambda m: True, _edit(_set("rank", 3))),
    ("alpha header wrong", lambda m: True, _edit(_set("alpha", 64.0))),
    # shapes
    ("B with an extra row", _has_factors, _edit(_tensor("<L>|B", lambda a: np.vstack([a, a[:1]])))),
    ("A with an extra column", _has_factors, _edit(_tensor("<L>|A", lambda a: np.hstack([a, a[:, :1]])))),
    ("B of another rank", _has_factors, _edit(_tensor("<L>|B", lambda a: a[:, :-1]))),
    ("A missing", _has_factors, _edit(_del_tensor("<L>|A"))),
    ("a layer missing", _has_factors, _edit(lambda m: [m.tensors.pop(f"{_layer(m)}|{k}") for k in "AB"])),
    ("an extra layer", _has_factors, _edit(_extra_layer)),
    ("an unknown tensor", lambda m: True, _edit(lambda m: m.tensors.__setitem__("foo|X", np.ones(3, np.float32)))),
    ("head of another shape", lambda m: True, _edit(_tensor("head|weight", lambda a: np.vstack([a, a])))),
    ("head tensor missing", lambda m: True, _edit(_del_tensor("head|bias"))),
    # values
    ("finite 3e38 in B", _has_factors, _edit(_tensor("<L>|B", lambda a: _put(a, 3e38)))),
    ("1e5 in A", _has_factors, _edit(_tensor("<L>|A", lambda a: _put(a, 1e5)))),
    ("1e6 in the head", lambda m: True, _edit(_tensor("head|weight", lambda a: _put(a, 1e6)))),
    ("NaN in the head", lambda m: True, _edit(_tensor("head|weight", lambda a: _put(a, np.nan)))),
    # ciphertexts
    ("ciphertext count +1 in header", _encrypted, _edit(lambda m: m.header.__setitem__("ciphertexts", m.header["ciphertexts"] + 1))),
    ("ciphertext count -1 in header", _encrypted, _edit(lambda m: m.header.__setitem__("ciphertexts", m.header["ciphertexts"] - 1))),
    ("a ciphertext missing", _encrypted, _edit(_del_tensor("enc|0"))),
    ("garbage ciphertext bytes", _encrypted, _edit(_enc(lambda a: np.random.default_rng(0).integers(0, 256, a.size).astype(np.uint8)))),
    ("truncated ciphertext", _encrypted, _edit(_enc(lambda a: a[:-16]))),
    ("ciphertext as floats", _encrypted, _edit(_enc(lambda a: a.astype(np.float32)))),
    ("forged fingerprint", _encrypted, _edit(_set("fingerprint", "0123456789abcdef"))),
    ("encrypted under another key", _encrypted, lambda d, f: f.foreign),
    # method fields
    ("budget wrong", lambda m: m.startswith("shelora"), _edit(_set("budget", 3))),
    ("cipher mode wrong", lambda m: m.startswith("shelora") or m == "maskcrypt", _edit(_set("cipher_mode", "paper"))),
    ("column out of range", lambda m: m.startswith("shelora"), _edit(_columns_edit(lambda g: [*g[:-1], 99]))),
    ("column repeated", lambda m: m.startswith("shelora"), _edit(_columns_edit(lambda g: [*g[:-1], g[0]]))),
    ("column list short", lambda m: m.startswith("shelora"), _edit(_columns_edit(lambda g: g[:-1]))),
    ("another column list", lambda m: m.startswith("shelora"), _edit(_columns_edit(lambda g: [3, 4, 6, 7]))),
    ("column list missing", lambda m: m.startswith("shelora"), _edit(_drop("columns"))),
    ("protected columns in plaintext", lambda m: m.startswith("shelora"), _edit(_plain_protected)),
    ("r_max wrong", lambda m: m in ("fedshield", "full_he", "maskcrypt"), _edit(_set("r_max", 4))),
    ("declared shapes wrong", lambda m: m in ("fedshield", "full_he"), _edit(lambda m: m.header["shapes"].__setitem__(_layer(m), [25, 16]))),
    ("declared shapes missing", lambda m: m in ("fedshield", "full_he"), _edit(_drop("shapes"))),
    ("mask digest wrong", lambda m: m == "maskcrypt", _edit(_set("mask_digest", "00"))),
    ("encrypted value count wrong", lambda m: m == "maskcrypt", _edit(lambda m: m.header.__setitem__("encrypted_values", m.header["encrypted_values"] + 1))),
    ("first-layer ciphertexts +1", lambda m: m == "shelora+first-layers", _edit(_first(lambda fl: fl.__setitem__("ciphertexts", fl["ciphertexts"] + 1)))),
    ("first layers as factors", lambda m: m == "shelora+first-layers", _edit(_first(lambda fl: fl.__setitem__("encrypt", "factors")))),
    ("first layers list short", lambda m: m == "shelora+first-layers", _edit(_first(lambda fl: fl.__setitem__("layers", fl["layers"][:-1])))),
    ("first layers header missing", lambda m: m == "shelora+first-layers", _edit(_drop("first_layers"))),
]  # fmt: skip

#: faults a server without the secret key cannot detect (outside the semi-honest threat model)
UNDETECTABLE = {"ciphertexts of another key under this key's fingerprint"}


def _forged_foreign(d: bytes, f: Federation3) -> bytes:
    msg = decode(f.foreign)
    msg.header["fingerprint"] = f.kh.fingerprint
    return encode(msg)


UPLOAD_FAULTS.append(
    ("ciphertexts of another key under this key's fingerprint", _encrypted, _forged_foreign)
)


def _names_client(exc: Exception, cid: Any) -> bool:
    return f"client {cid}" in str(exc)


def upload_cases(fed: Federation3) -> Iterator[Case]:
    """Every upload fault that applies to ``fed``'s method, run through the server's round."""
    honest = fed.uploads
    for name, applies, fault in UPLOAD_FAULTS:
        if not applies(fed.method):
            continue
        case = Case(
            fed.method, "upload", name, "undetectable" if name in UNDETECTABLE else "rejected"
        )
        try:
            bad = fault(honest[FAULTY], fed)
            bad = bad if isinstance(bad, list) else [bad]
            sent = [honest[0], *bad, honest[2]]
            res = fed.server_round(sent, senders=[0, *([FAULTY] * len(bad)), 2])
        except SheloraError as exc:  # the whole round failed, by name
            case.observed, case.detail = "obscure", f"round failed: {type(exc).__name__}: {exc}"
        except Exception as exc:
            case.observed, case.detail = "obscure", f"{type(exc).__name__}: {exc}"
        else:
            mine = [r for r in res.rejected if r["client_id"] == FAULTY]
            if (
                res.clients == [0, 2]
                and mine
                and all(_names_client(Exception(r["error"]), r["client_id"]) for r in mine)
            ):
                case.observed = "rejected"
                case.detail = f"{mine[0]['reason']}: {mine[0]['error']}"
            elif FAULTY in res.clients:
                case.observed = (
                    "undetectable" if case.expected == "undetectable" else "silently_accepted"
                )
                case.detail = f"aggregated clients {res.clients}; rejected {res.rejected}"
            else:
                case.observed = "obscure"
                case.detail = f"aggregated clients {res.clients}; rejected {res.rejected}"
        yield case
    # a sender that was not asked this round
    case = Case(fed.method, "upload", "client not sampled this round")
    res = fed.server_round(honest, sampled=[0, 2])
    ok = res.clients == [0, 2] and [r["reason"] for r in res.rejected] == ["sender"]
    case.observed = "rejected" if ok else "silently_accepted"
    case.detail = str(res.rejected)[:300]
    yield case


# ----------------------------------------------------------------------------- broadcast faults
class _Template:
    """Stands in for the client's model: what a broadcast must give it (layers, ranks, head)."""

    def __init__(self, template: AdapterWeights) -> None:
        self.shapes = template.shapes
        self.head = {k: v.shape for k, v in template.head.items()}

    def validate(self, weights: AdapterWeights) -> None:
        head = {k: v.shape for k, v in weights.head.items()}
        if weights.shapes != self.shapes or head != self.head:
            raise ValueError(f"layers {weights.shapes} / head {head} do not match the model")


def broadcast_cases(fed: Federation3) -> Iterator[Case]:
    """A client starting round ``ROUND + 1`` must refuse a bad broadcast with a named error."""
    from .client import receive

    good = fed.server_round(fed.uploads).broadcast
    cfg = fed.cfg

    def edited(fn: Callable[[Message], None]) -> bytes:
        msg = decode(good)
        fn(msg)
        return encode(msg)

    first_tensor = sorted(decode(good).tensors)[0]
    faults: list[tuple[str, Callable[[], Any]]] = [
        ("stale broadcast (replayed)", lambda: edited(_set("round", ROUND - 1))),
        ("broadcast from the future", lambda: edited(_set("round", ROUND + 1))),
        ("another method's broadcast", lambda: edited(_set("method", "x"))),
        ("truncated broadcast", lambda: good[:-5]),
        ("corrupted broadcast", lambda: _flip(-50)(good, fed)),
        ("an upload instead of a broadcast", lambda: fed.uploads[0]),
        ("a tensor missing", lambda: edited(lambda m: m.tensors.pop(first_tensor))),
        ("a tensor reshaped", lambda: edited(lambda m: m.tensors.__setitem__(first_tensor, m.tensors[first_tensor].reshape(-1)[:-1]))),
        ("a header field missing", lambda: edited(_drop("max_rank"))),
    ]  # fmt: skip
    if "total_examples" in decode(good).header:
        faults.append(("total_examples zero", lambda: edited(_set("total_examples", 0))))
    faults.append(("max_rank a string", lambda: edited(_set("max_rank", "8"))))
    if _encrypted(fed.method):
        faults.append(
            ("broadcast under another key", lambda: edited(_set("fingerprint", "0" * 16)))
        )
    template = receive(cfg, good, client_id=0, round_=ROUND + 1, crypto=fed.client)
    model = _Template(template)
    for name, make in faults:
        yield Case(fed.method, "broadcast", name).expect_refusal(
            lambda make=make: receive(
                cfg, make(), client_id=0, round_=ROUND + 1, crypto=fed.client, model=model
            )
        )


# ----------------------------------------------------------------------------- configuration
CONFIG_FAULTS: list[tuple[str, dict[str, Any]]] = [
    ("lr NaN", {"lr": float("nan")}),
    ("lr Inf", {"lr": float("inf")}),
    ("lr negative", {"lr": -1e-3}),
    ("lora_alpha NaN", {"lora_alpha": float("nan")}),
    ("rounds 2.5", {"rounds": 2.5}),
    ("rounds 0", {"rounds": 0}),
    ("num_clients 2.5", {"num_clients": 2.5}),
    ("num_clients 0", {"num_clients": 0}),
    ("seed -1", {"seed": -1}),
    ("ranks (8.7,)", {"ranks": (8.7,)}),
    ("ranks 8", {"ranks": 8}),
    ("ranks ('a',)", {"ranks": ("a",)}),
    ("ranks ()", {"ranks": ()}),
    ("he_budgets (-1,)", {"he_budgets": (-1,)}),
    ("client_fraction 0", {"client_fraction": 0.0}),
    ("client_fraction 1.5", {"client_fraction": 1.5}),
    ("batch_size True", {"batch_size": True}),
    ("local_steps '10'", {"local_steps": "10"}),
    ("method unknown", {"method": "fedsgd"}),
    ("model unknown", {"model": "gpt2"}),
    ("cipher_mode unknown", {"cipher_mode": "fast"}),
    ("ckks_params unknown", {"ckks_params": "tiny"}),
    ("dirichlet_alpha 0", {"dirichlet_alpha": 0.0}),
    ("eval_examples 0", {"eval_examples": 0}),
    ("min_clients 0", {"min_clients": 0}),
    ("min_clients above the clients per round", {"min_clients": 99}),
]


def config_cases() -> Iterator[Case]:
    """Bad configuration values must fail when the config is built, naming the field."""
    for name, change in CONFIG_FAULTS:
        yield Case("config", "config", name).expect_refusal(
            lambda change=change: FederatedConfig(**{"method": "shelora", **change}),
            names=next(iter(change)),
        )


# ----------------------------------------------------------------------------- range and contexts
def range_cases(keys: dict[str, KeyHolder]) -> Iterator[Case]:
    """Encrypted sums that could leave CKKS's range: refused at setup and at encryption."""
    from .methods import get_method

    crypto = keys["add_only"].client()
    for method in ("shelora", "maskcrypt", "shelora+first-layers"):
        m = get_method(method, _config(method))
        yield Case(method, "range", "setup whose sums exceed the CKKS range").expect_refusal(
            lambda m=m: m.check_sum_range(10**6, crypto.max_abs)
        )
        yield Case(method, "range", "a value whose share of the sum does not fit").expect_refusal(
            lambda m=m: m._encrypt_summed(crypto, np.array([0.46 * crypto.max_abs]))
        )


def context_cases(keys: dict[str, KeyHolder]) -> Iterator[Case]:
    """Contexts of the wrong role or failing the security check are refused when loaded."""
    import tenseal as ts

    from .ckks import ClientCrypto, ServerCrypto

    kh = keys["add_only"]
    weak = ts.context(ts.SCHEME_TYPE.CKKS, 8192, coeff_mod_bit_sizes=[60, 40, 60])
    weak.global_scale = 2**24  # the authors' key file: products decrypt to noise
    weak_public = weak.copy()
    weak_public.make_context_public()
    tries = [
        ("server given the secret context", lambda: ServerCrypto(kh.secret_bytes())),
        ("client given the public context", lambda: ClientCrypto(kh.public_bytes())),
        ("client given bytes that are not a context", lambda: ClientCrypto(b"\0" * 64)),
        ("client given a context failing the security check", lambda: ClientCrypto(weak.serialize(save_secret_key=True))),
        ("server given a context failing the security check", lambda: ServerCrypto(weak_public.serialize())),
    ]  # fmt: skip
    for name, fn in tries:
        yield Case("ckks", "context", name).expect_refusal(fn)


# ----------------------------------------------------------------------------- running
def make_keys() -> dict[str, KeyHolder]:
    """One key pair per parameter set, and a second one (``<set>:other``) for foreign keys."""
    keys = {}
    for p in ("add_only", "fedshield", "paper_mm"):
        keys[p] = KeyHolder.generate(p)
        keys[f"{p}:other"] = KeyHolder.generate(p)
    return keys


def run_cases(methods: tuple[str, ...] = METHODS, *, keys: dict | None = None) -> list[Case]:
    """Every message-level, configuration, range and context case (seconds, no model)."""
    keys = make_keys() if keys is None else keys
    cases: list[Case] = []
    for method in methods:
        fed = Federation3(method, keys)
        cases += list(upload_cases(fed))
        cases += list(broadcast_cases(fed))
    cases += list(config_cases())
    cases += list(range_cases(keys))
    cases += list(context_cases(keys))
    return cases


def summarize(cases: list[Case]) -> dict[str, Any]:
    """Totals: tried, and how many ended in each outcome (and how many as expected)."""
    totals: dict[str, Any] = {"tried": len(cases)}
    for o in OUTCOMES:
        totals[o] = sum(1 for c in cases if c.observed == o)
    totals["as_expected"] = sum(1 for c in cases if c.observed == c.expected)
    by_method: dict[str, dict[str, int]] = {}
    for c in cases:
        row = by_method.setdefault(c.method, {o: 0 for o in OUTCOMES})
        row[c.observed] = row.get(c.observed, 0) + 1
    totals["by_method"] = by_method
    return totals


def main(argv: list[str] | None = None) -> int:
    from .provenance import run_meta

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="quick")
    ap.add_argument("--results", default=None, help="results folder (default results/<profile>)")
    ap.add_argument("--no-crash", action="store_true", help="skip the kill-at-every-write cases")
    args = ap.parse_args(argv)
    out = Path(args.results or Path("results") / args.profile)
    t0 = time.perf_counter()
    cases = run_cases()
    if not args.no_crash:
        from .fault_crash import crash_cases, disk_cases

        work = out / "checkpoints" / "faults"
        cases += list(disk_cases(work))
        cases += list(crash_cases(work))
        shutil.rmtree(work, ignore_errors=True)
    totals = summarize(cases)
    record = {
        "meta": {**run_meta(0), "seconds": time.perf_counter() - t0},
        "totals": totals,
        "cases": [c.record() for c in cases],
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "faults.json").write_text(json.dumps(record, indent=1))
    bad = [c for c in cases if c.observed != c.expected]
    print(
        f"faults: {totals['tried']} cases, {totals['rejected']} rejected by name, "
        f"{totals['recovered']} crashes recovered, "
        f"{totals['undetectable']} undetectable (out of threat model), "
        f"{totals['silently_accepted']} silently accepted, {totals['obscure']} obscure, "
        f"{totals['data_lost']} data lost -> {out / 'faults.json'}"
    )
    for c in bad:
        print(f"  UNEXPECTED {c.method} / {c.kind} / {c.name}: {c.observed} ({c.detail[:160]})")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
