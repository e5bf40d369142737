"""Seeded (seed-compressed symmetric) uploads: half the bytes, the same aggregates, the same checks."""

import struct

import numpy as np
import pytest

from shelora_core.aggregation import lora_scaling
from shelora_core.ckks import (
    SEEDED_MAGIC,
    CKKSError,
    KeyHolder,
    SeededEncryptor,
    ciphertext_bytes,
    is_seeded,
    load_vector,
    seeded_header,
    seeded_to_tenseal,
)
from shelora_core.ckks.seeded import _tenseal_vector_proto
from shelora_core.client import upload
from shelora_core.config import FederatedConfig
from shelora_core.engine import run_round
from shelora_core.he_cost import synthetic_adapter
from shelora_core.messages import decode, encode
from shelora_core.methods import ckks_params_for
from shelora_core.methods.wire import is_ciphertext
from shelora_core.server import server_round

LAYERS = {f"model.layers.{i}.self_attn.q_proj": (24, 16) for i in range(3)}
COLUMNS = {k: [1, 5, 9, 2] for k in LAYERS}

#: every configuration whose clients encrypt fresh ciphertexts
ENCRYPTED = {
    "shelora-delta": dict(method="shelora"),
    "shelora-paper": dict(method="shelora", cipher_mode="paper"),
    "maskcrypt-delta": dict(method="maskcrypt"),
    "maskcrypt-paper": dict(method="maskcrypt", cipher_mode="paper"),
    "fedshield": dict(method="fedshield"),
    "full_he": dict(method="full_he"),
    "first-layers-dw": dict(method="shelora+first-layers"),
}


def _cfg(**kw) -> FederatedConfig:
    return FederatedConfig(
        model="smollm2", num_clients=3, ranks=(2, 4, 8), he_budgets=(1, 2, 4), **kw
    )


def _adapters(seed: int = 0):
    rng = np.random.default_rng(seed)
    head = {"weight": np.zeros((2, 16), np.float32)}
    return [synthetic_adapter(LAYERS, r, rng, head=dict(head)) for r in (2, 4, 8)]


@pytest.fixture(scope="module")
def keys():
    return {p: KeyHolder.generate(p) for p in ("add_only", "fedshield", "paper_mm")}


def _round(cfg: FederatedConfig, kh: KeyHolder):
    grads = [w.factors for w in _adapters(2)] if cfg.method == "maskcrypt" else None
    return run_round(cfg, _adapters(), client_crypto=kh.client(), server_crypto=kh.server(),
                     columns=COLUMNS, starts=_adapters(1), grads=grads,
                     num_examples=[10, 20, 30])  # fmt: skip


def _cipher_blobs(upload: bytes) -> list[bytes]:
    msg = decode(upload, expect_kind="upload")
    names = sorted((k for k in msg.tensors if is_ciphertext(k)), key=lambda k: int(k.split("|")[1]))
    return [msg.tensors[k].tobytes() for k in names]


def _proto_fields(data: bytes) -> list[tuple[int, int, bytes]]:
    """``(field, wire type, raw value)`` of a protobuf message (varint, 64-bit, bytes only)."""
    out, i = [], 0

    def varint():
        nonlocal i
        n = shift = 0
        while True:
            b = data[i]
            i += 1
            n |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                return n

    while i < len(data):
        key = varint()
        field, wire = key >> 3, key & 7
        if wire == 2:
            n = varint()
            out.append((field, wire, data[i : i + n]))
            i += n
        elif wire == 1:
            out.append((field, wire, data[i : i + 8]))
            i += 8
        else:
            raise AssertionError(f"unexpected wire type {wire}")
    return out


# ------------------------------------------------------------------ the format


def test_the_proto_wrapper_writes_tenseals_bytes_for_tenseals_own_ciphertext(keys):
    client = keys["add_only"].client()
    for n in (5, 300, client.slots):
        blob = client.encrypt(np.linspace(-0.1, 0.1, n))[0]
        fields = _proto_fields(blob)
        assert [f for f, _, _ in fields] == [1, 2, 3]
        seal, scale = fields[1][2], struct.unpack("<d", fields[2][2])[0]

        assert _tenseal_vector_proto(n, seal, scale) == blob


def test_seeded_ciphertexts_are_tagged_and_the_server_tells_them_apart(keys):
    kh = keys["add_only"]
    client, server = kh.client(), kh.server()
    x = np.random.default_rng(0).normal(0, 0.02, client.slots + 7)

    seeded = client.encrypt(x, seeded=True)
    regular = client.encrypt(x)

    assert len(seeded) == len(regular) == 2
    assert all(b.startswith(SEEDED_MAGIC) and is_seeded(b) for b in seeded)
    assert not any(is_seeded(b) for b in regular)
    head = seeded_header(seeded[1])
    assert head["fingerprint"] == kh.fingerprint and head["size"] == 7
    assert [server.load(b).size() for b in seeded] == [client.slots, 7]
    # the sums are TenSEAL bytes (full size): the seed only describes a fresh ciphertext
    summed = server.add([seeded, regular, seeded])
    assert not any(is_seeded(b) for b in summed)
    np.testing.assert_allclose(client.decrypt(summed, x.size), 3 * x, atol=1e-7)
    np.testing.assert_allclose(client.decrypt(seeded, x.size), x, atol=1e-8)


def test_seeded_encryption_refuses_empty_or_oversized_chunks(keys):
    client = keys["add_only"].client()
    enc = SeededEncryptor(client.context, client.fingerprint)

    for bad in (np.zeros(0), np.zeros(client.slots + 1)):
        with pytest.raises(CKKSError, match="holds 1 to 2048 values"):
            enc.encrypt([bad])
    with pytest.raises(CKKSError, match="not 16 hex characters"):
        SeededEncryptor(client.context, "abc")


def test_a_seeded_client_default_and_the_per_call_switch(keys):
    kh = keys["add_only"]
    x = np.full(10, 0.25)
    default_seeded = kh.client(seeded=True)

    assert is_seeded(default_seeded.encrypt(x)[0])
    assert not is_seeded(default_seeded.encrypt(x, seeded=False)[0])
    assert not is_seeded(kh.client().encrypt(x)[0])


@pytest.mark.parametrize("params", ["add_only", "paper_mm", "fedshield"])
def test_a_seeded_ciphertext_is_under_0_6_of_tenseals(keys, params):
    client = keys[params].client()
    x = np.random.default_rng(1).normal(0, 0.02, client.slots)

    seeded = len(client.encrypt(x, seeded=True)[0])
    regular = len(client.encrypt(x)[0])

    # measured, not assumed: SEAL drops the random polynomial c1 and sends its seed
    assert seeded < 0.6 * regular, (params, seeded, regular)
    assert seeded > 0.4 * regular  # c0 is still sent in full


def test_ciphertext_bytes_measures_either_format():
    regular = ciphertext_bytes("add_only")
    seeded = ciphertext_bytes("add_only", seeded=True)

    assert seeded < 0.6 * regular
    assert 8 < seeded / 2048 < 20  # bytes per value at N = 4096


def test_seeded_vectors_multiply_like_tenseals(keys):
    # paper mode's server computes enc(A[:, j]) x B^T with TenSEAL's mm, which rotates the
    # vector: the seeded encoding must replicate values over the slots as TenSEAL does
    kh = keys["paper_mm"]
    client, server = kh.client(), kh.server()
    rng = np.random.default_rng(2)
    col, mat = rng.normal(0, 0.02, 8), rng.normal(0, 0.1, (24, 8))

    seeded = server.load(client.encrypt(col, seeded=True)[0]).mm(mat.T.tolist())
    regular = server.load(client.encrypt(col)[0]).mm(mat.T.tolist())

    want = mat @ col
    got_s = client.decrypt([seeded.serialize()], 24)
    got_r = client.decrypt([regular.serialize()], 24)
    np.testing.assert_allclose(got_s, want, atol=1e-6)
    np.testing.assert_allclose(got_s, got_r, atol=1e-6)


# ------------------------------------------------------------------ every method, real messages


@pytest.mark.parametrize("name", sorted(ENCRYPTED))
def test_every_encrypted_method_aggregates_seeded_uploads_like_regular_ones(keys, name):
    cfg = _cfg(**ENCRYPTED[name])
    kh = keys[ckks_params_for(cfg)]
    seeded_cfg = cfg.replace(seeded_uploads=True)

    regular = _round(cfg, kh)
    seeded = _round(seeded_cfg, kh)
    # the server's own checks (validation loads every ciphertext) accept every seeded upload
    res = server_round(seeded_cfg, seeded.uploads, round_=1, crypto=kh.server(),
                       consensus=seeded.consensus)  # fmt: skip

    assert res.rejected == [] and res.clients == [0, 1, 2]
    up_s, up_r = seeded.costs(), regular.costs()
    assert up_s["ciphertexts_up"] == up_r["ciphertexts_up"] and min(up_s["ciphertexts_up"]) > 0
    for u_s, u_r in zip(seeded.uploads, regular.uploads, strict=True):
        assert all(is_seeded(b) for b in _cipher_blobs(u_s))
        assert not any(is_seeded(b) for b in _cipher_blobs(u_r))
    ratio = sum(up_s["upload_cipher_bytes"]) / sum(up_r["upload_cipher_bytes"])
    assert ratio < 0.6, (name, ratio)
    assert not any(is_seeded(b) for b in _cipher_blobs_of_broadcast(seeded.broadcast))
    for w_s, w_r in zip(seeded.received, regular.received, strict=True):
        assert w_s.rank == w_r.rank
        s = lora_scaling(w_s.alpha, w_s.rank)
        for layer in LAYERS:
            (b_s, a_s), (b_r, a_r) = w_s.factors[layer], w_r.factors[layer]
            np.testing.assert_allclose(s * b_s @ a_s, s * b_r @ a_r, atol=1e-5, err_msg=name)
        for k, v in w_r.head.items():
            np.testing.assert_allclose(w_s.head[k], v, atol=1e-5)


def _cipher_blobs_of_broadcast(broadcast: bytes) -> list[bytes]:
    msg = decode(broadcast, expect_kind="broadcast")
    return [v.tobytes() for k, v in msg.tensors.items() if is_ciphertext(k)]


def test_first_layers_factor_uploads_seeded_decrypt_to_the_regular_values(keys):
    # 'factors' is measured for its cost only (the server refuses it): compare the uploads
    cfg = _cfg(method="shelora+first-layers", first_layers_encrypt="factors")
    kh = keys[ckks_params_for(cfg)]
    client, server = kh.client(), kh.server()
    w = _adapters()[2]

    ups = [upload(c, w, round_=1, client_id=2, num_examples=30, crypto=client, columns=COLUMNS)
           for c in (cfg, cfg.replace(seeded_uploads=True))]  # fmt: skip

    regular, seeded = (_cipher_blobs(u) for u in ups)
    assert len(seeded) == len(regular) > 0
    assert all(is_seeded(b) for b in seeded) and not any(is_seeded(b) for b in regular)
    assert sum(map(len, seeded)) < 0.6 * sum(map(len, regular))
    sizes = [server.load(b).size() for b in regular]
    assert [server.load(b).size() for b in seeded] == sizes
    n = sum(sizes)
    np.testing.assert_allclose(client.decrypt(seeded, n), client.decrypt(regular, n), atol=1e-7)


def test_seeded_uploads_is_a_late_config_field():
    base = _cfg(method="shelora")

    assert base.seeded_uploads is False
    assert "seeded_uploads" in base.to_dict()
    assert FederatedConfig.from_dict({**base.to_dict(), "seeded_uploads": True}).seeded_uploads
    # the runs that do not use it keep their names; the ones that do get their own
    assert base.replace(seeded_uploads=False).fingerprint() == base.fingerprint()
    assert base.replace(seeded_uploads=True).fingerprint() != base.fingerprint()


# ------------------------------------------------------------------ keys and refusals


def test_a_seeded_ciphertext_of_another_key_is_refused(keys):
    kh, other = keys["add_only"], KeyHolder.generate("add_only")
    foreign = other.client().encrypt(np.full(4, 0.1), seeded=True)[0]

    for load in (kh.server().load, lambda b: kh.client().decrypt([b], 4)):
        with pytest.raises(CKKSError, match=f"under key {other.fingerprint}.*another key"):
            load(foreign)
    # TenSEAL bytes of the other key load (they carry no key): only the header can tell
    assert kh.server().load(other.client().encrypt(np.full(4, 0.1))[0]).size() == 4


def test_the_server_refuses_seeded_uploads_of_another_key_even_under_this_keys_fingerprint(keys):
    cfg = _cfg(method="shelora", seeded_uploads=True)
    kh, other = keys["add_only"], KeyHolder.generate("add_only")
    ads = _adapters()
    honest = run_round(cfg, ads, client_crypto=kh.client(), server_crypto=kh.server(),
                       columns=COLUMNS, receive_ranks=()).uploads  # fmt: skip
    foreign = run_round(cfg, ads, client_crypto=other.client(), server_crypto=other.server(),
                        columns=COLUMNS, receive_ranks=()).uploads[1]  # fmt: skip
    forged = decode(foreign)
    forged.header["fingerprint"] = kh.fingerprint  # claims this round's key

    res_key = server_round(cfg, [honest[0], foreign, honest[2]], round_=1, crypto=kh.server())
    res_forged = server_round(cfg, [honest[0], encode(forged), honest[2]], round_=1,
                              crypto=kh.server())  # fmt: skip

    assert res_key.clients == res_forged.clients == [0, 2]
    [rej] = res_key.rejected
    assert rej["client_id"] == 1 and rej["reason"] == "key"
    [rej] = res_forged.rejected
    assert rej["client_id"] == 1 and rej["reason"] == "ciphertext"
    assert f"under key {other.fingerprint}" in rej["error"] and "another key" in rej["error"]


def test_the_server_holds_no_secret_key_after_loading_seeded_ciphertexts(keys):
    kh = keys["add_only"]
    server = kh.server()
    server.add([kh.client().encrypt(np.ones(3), seeded=True)] * 2)

    blob = kh.client().encrypt(np.ones(3), seeded=True)[0]

    assert not server.context.is_private()
    with pytest.raises(PermissionError):
        server.decrypt([blob], 3)
    with pytest.raises(ValueError):  # TenSEAL itself: the public context has no secret key
        server.load(blob).decrypt()
    with pytest.raises(CKKSError, match="needs the secret key"):
        SeededEncryptor(server.context, server.fingerprint)


def _with_size(blob: bytes, size: int) -> bytes:
    return blob[:13] + struct.pack("<I", size) + blob[17:]


CORRUPTIONS = {
    "truncated": (lambda b: b[:-16], "states .* bytes but carries"),
    "padded": (lambda b: b + b"\x00" * 8, "states .* bytes but carries"),
    "cut into the header": (lambda b: b[:20], "too short for a seeded ciphertext"),
    "another magic": (lambda b: b"\x00XYZ" + b[4:], "neither a seeded ciphertext"),
    "another version": (lambda b: b[:4] + b"\x07" + b[5:], "format version 7"),
    "no values": (lambda b: _with_size(b, 0), "holds no values"),
    "more values than slots": (lambda b: _with_size(b, 10**6), "more than the 2048 slots"),
    "SEAL header broken": (lambda b: b[:17] + b"\xff\xff" + b[19:], "does not start with a SEAL"),
    "SEAL data garbage": (
        lambda b: b[:33] + np.random.default_rng(0).bytes(len(b) - 33),
        "seeded ciphertext .* did not load: SEAL refused",
    ),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_corrupted_seeded_bytes_are_refused_by_name(keys, case):
    kh = keys["add_only"]
    blob = kh.client().encrypt(np.full(5, 0.1), seeded=True)[0]
    corrupt, needle = CORRUPTIONS[case]

    with pytest.raises(CKKSError, match=needle):
        kh.server().load(corrupt(blob))


def test_a_corrupted_seeded_upload_is_refused_naming_the_client(keys):
    cfg = _cfg(method="maskcrypt", seeded_uploads=True)
    kh = keys["add_only"]
    trace = _round(cfg, kh)
    bad = decode(trace.uploads[2])
    arr = bad.tensors["enc|0"]
    bad.tensors["enc|0"] = arr[:-16]

    res = server_round(cfg, [*trace.uploads[:2], encode(bad)], round_=1, crypto=kh.server(),
                       consensus=trace.consensus)  # fmt: skip

    assert res.clients == [0, 1]
    [rej] = res.rejected
    assert rej["client_id"] == 2 and rej["reason"] == "ciphertext"
    assert "seeded ciphertext" in rej["error"] and "truncated" in rej["error"]


def test_seeded_to_tenseal_gives_bytes_tenseal_loads_directly(keys):
    kh = keys["add_only"]
    server = kh.server()
    blob = kh.client().encrypt(np.arange(6) / 10, seeded=True)[0]

    data = seeded_to_tenseal(blob, fingerprint=kh.fingerprint, scale=server.context.global_scale)

    assert load_vector(server.context, data).size() == 6
    with pytest.raises(CKKSError, match="another key"):
        seeded_to_tenseal(blob, fingerprint="0" * 16, scale=server.context.global_scale)
