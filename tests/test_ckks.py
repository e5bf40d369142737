"""Tests for shelora_core.ckks: roles, bytes API, fingerprints, packing, parameters, precision.

Everything goes through bytes, as it would between machines. Fast: one key per parameter set per
module (key generation for ``paper_mm`` with Galois keys takes ~0.6 s).
"""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import tenseal as ts
from hypothesis import given, settings
from hypothesis import strategies as st

from shelora_core.ckks import (
    MAX_COEFF_BITS_128,
    PARAM_SETS,
    CKKSError,
    CKKSParams,
    ClientCrypto,
    KeyHolder,
    PackingLayout,
    ServerCrypto,
    check_fingerprint,
    check_security,
    ciphertext_bytes,
    context_fingerprint,
    context_info,
    get_params,
    load_context,
    load_vector,
    measure_precision,
)

TOL = 1e-5  # abs tolerance for sums of ~N(0, 0.02) values (measured errors are ~1e-8)
SLOTS = PARAM_SETS["add_only"].slots  # 2048


@pytest.fixture(scope="module")
def holder() -> KeyHolder:
    return KeyHolder.generate("add_only")


@pytest.fixture(scope="module")
def other_holder() -> KeyHolder:
    return KeyHolder.generate("add_only")


@pytest.fixture(scope="module")
def client(holder: KeyHolder) -> ClientCrypto:
    return ClientCrypto(holder.secret_bytes())


@pytest.fixture(scope="module")
def server(holder: KeyHolder) -> ServerCrypto:
    return ServerCrypto(holder.public_bytes())


@pytest.fixture(scope="module")
def fedshield() -> KeyHolder:
    return KeyHolder.generate("fedshield")


@pytest.fixture(scope="module")
def paper_mm() -> KeyHolder:
    return KeyHolder.generate("paper_mm")


def _updates(n_clients: int, length: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(0.0, 0.02, length) for _ in range(n_clients)]


# --- encrypted aggregation through bytes ---------------------------------------------------


@pytest.mark.parametrize("length", [1, 1000, SLOTS, SLOTS + 1, 3 * SLOTS + 17])
def test_encrypted_sum_of_three_clients_matches_plaintext(
    client: ClientCrypto, server: ServerCrypto, length: int
) -> None:
    xs = _updates(3, length)
    blobs = [client.encrypt(x) for x in xs]
    assert all(len(b) == -(-length // SLOTS) for b in blobs)
    assert all(isinstance(c, bytes) for b in blobs for c in b)
    summed = server.add(blobs)
    assert all(isinstance(c, bytes) for c in summed)
    got = client.decrypt(summed, length)
    assert got.shape == (length,)
    np.testing.assert_allclose(got, np.sum(xs, axis=0), rtol=0, atol=TOL)


def test_weighted_sum_with_fedshield_matches_weighted_mean(fedshield: KeyHolder) -> None:
    client, server = fedshield.client(), fedshield.server()
    xs = _updates(3, 5000)  # 2 ciphertexts of 4096 slots
    counts = np.array([120.0, 30.0, 50.0])
    weights = (counts / counts.sum()).tolist()
    out = server.weighted_sum([client.encrypt(x) for x in xs], weights)
    got = client.decrypt(out, 5000)
    expected = sum(w * x for w, x in zip(weights, xs, strict=True))
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)


def test_weighted_sum_with_add_only_raises_clear_error(
    client: ClientCrypto, server: ServerCrypto
) -> None:
    blobs = [client.encrypt(x) for x in _updates(2, 10)]
    with pytest.raises(CKKSError, match="longer modulus chain.*pre-weight on the client side"):
        server.weighted_sum(blobs, [0.5, 0.5])


def test_weighted_sum_uses_one_level_per_call(fedshield: KeyHolder) -> None:
    # fedshield has depth 2: weighting twice works, a third time runs out of levels.
    client, server = fedshield.client(), fedshield.server()
    x = _updates(1, 8)[0]
    once = server.weighted_sum([client.encrypt(x)], [0.5])
    twice = server.weighted_sum([once], [0.5])
    np.testing.assert_allclose(client.decrypt(twice, 8), 0.25 * x, atol=1e-6)
    with pytest.raises(CKKSError, match="longer modulus chain"):
        server.weighted_sum([twice], [0.5])


def test_add_rejects_mismatched_inputs(client: ClientCrypto, server: ServerCrypto) -> None:
    a = client.encrypt(np.zeros(SLOTS + 5))
    b = client.encrypt(np.zeros(5))
    c = client.encrypt(np.zeros(6))
    with pytest.raises(CKKSError, match="same PackingLayout"):
        server.add([a, b])
    with pytest.raises(CKKSError, match="different numbers of values"):
        server.add([b, c])
    with pytest.raises(CKKSError, match="no ciphertext lists"):
        server.add([])
    with pytest.raises(CKKSError, match="expected length"):
        client.decrypt(b, 6)


def test_encrypt_rejects_bad_values(client: ClientCrypto) -> None:
    with pytest.raises(CKKSError, match="1-D"):
        client.encrypt(np.zeros((2, 2)))
    with pytest.raises(CKKSError, match="NaN"):
        client.encrypt(np.array([0.0, np.nan]))
    with pytest.raises(CKKSError, match="does not fit"):
        client.encrypt(np.array([1e12]))  # add_only holds |x| < 2^19
    assert client.encrypt(np.zeros(0)) == []
    assert client.decrypt([], 0).shape == (0,)


# --- roles: the server cannot decrypt ------------------------------------------------------


def test_server_cannot_decrypt(
    holder: KeyHolder, client: ClientCrypto, server: ServerCrypto
) -> None:
    blobs = client.encrypt(np.ones(4))
    with pytest.raises(PermissionError, match="no secret key"):
        server.decrypt(blobs, 4)
    # The public bytes really hold no secret key ...
    public_ctx = load_context(holder.public_bytes())
    assert public_ctx.is_private() is False
    assert public_ctx.is_public() is True
    assert server.context.is_private() is False
    # ... so TenSEAL's own decrypt fails on a ciphertext linked to the public context.
    vec = ts.ckks_vector_from(public_ctx, blobs[0])
    with pytest.raises(ValueError, match="secret"):
        vec.decrypt()
    # The secret bytes do hold it.
    assert load_context(holder.secret_bytes()).is_private() is True


def test_server_refuses_secret_context_and_client_refuses_public(holder: KeyHolder) -> None:
    with pytest.raises(CKKSError, match="server must never hold the secret key"):
        ServerCrypto(holder.secret_bytes())
    with pytest.raises(CKKSError, match="clients need the secret context"):
        ClientCrypto(holder.public_bytes())


def test_load_context_rejects_garbage(holder: KeyHolder) -> None:
    for bad in [b"", b"not a context", holder.public_bytes()[:1000]]:
        with pytest.raises(CKKSError, match="not a TenSEAL context"):
            load_context(bad)
    with pytest.raises(CKKSError, match="must be bytes"):
        load_context("a string")  # type: ignore[arg-type]


def test_public_context_holds_no_relin_keys_and_secret_bytes_no_galois(paper_mm: KeyHolder) -> None:
    server = paper_mm.server()
    assert server.info.has_galois_keys and not server.info.has_relin_keys
    client = paper_mm.client()
    assert not client.info.has_galois_keys  # serialized before Galois key generation


# --- fingerprints --------------------------------------------------------------------------


def test_fingerprint_same_for_all_roles_of_one_key(
    holder: KeyHolder, client: ClientCrypto, server: ServerCrypto, other_holder: KeyHolder
) -> None:
    fp = holder.fingerprint
    assert len(fp) == 16 and int(fp, 16) >= 0
    assert client.fingerprint == fp
    assert server.fingerprint == fp
    # Deterministic across calls and across a second round trip through bytes.
    assert context_fingerprint(holder.context) == fp
    reloaded = load_context(server.context.serialize())
    assert context_fingerprint(reloaded) == fp
    assert other_holder.fingerprint != fp


def test_fingerprint_same_in_another_process(holder: KeyHolder, tmp_path: Path) -> None:
    path = tmp_path / "public.ctx"
    path.write_bytes(holder.public_bytes())
    root = Path(__file__).resolve().parents[1]
    code = (
        f"import sys; sys.path.insert(0, {str(root)!r});"
        "from shelora_core.ckks import ServerCrypto;"
        f"print(ServerCrypto(open({str(path)!r}, 'rb').read()).fingerprint)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == holder.fingerprint


def test_fingerprint_ignores_galois_keys(paper_mm: KeyHolder) -> None:
    assert paper_mm.server().fingerprint == paper_mm.client().fingerprint == paper_mm.fingerprint


def test_check_fingerprint(holder: KeyHolder, other_holder: KeyHolder) -> None:
    check_fingerprint(holder.fingerprint, holder.fingerprint)
    with pytest.raises(CKKSError) as info:
        check_fingerprint(holder.fingerprint, other_holder.fingerprint)
    msg = str(info.value)
    assert holder.fingerprint in msg and other_holder.fingerprint in msg
    assert "another key" in msg


def test_ciphertext_from_another_key_decrypts_to_garbage(
    client: ClientCrypto, other_holder: KeyHolder
) -> None:
    # TenSEAL raises nothing: the ciphertext loads and "decrypts". This is why messages carry
    # the key fingerprint and receivers call check_fingerprint.
    x = _updates(1, 100)[0]
    foreign = other_holder.client().encrypt(x)
    got = client.decrypt(foreign, 100)
    assert np.max(np.abs(got - x)) > 1e3 * TOL


# --- corrupted ciphertext bytes ------------------------------------------------------------


def test_corrupted_ciphertext_bytes_raise(client: ClientCrypto, server: ServerCrypto) -> None:
    blob = client.encrypt(_updates(1, SLOTS)[0])[0]
    bad = {
        "truncated half": blob[: len(blob) // 2],
        "truncated by one": blob[:-1],
        "garbage": b"garbage" * 20,
        "random": np.random.default_rng(1).bytes(len(blob)),
        "empty": b"",  # TenSEAL itself accepts b"" as an empty vector
    }
    header = bytearray(blob)
    header[10] ^= 0xFF  # inside SEAL's ciphertext header
    bad["flipped header byte"] = bytes(header)
    for data in bad.values():
        with pytest.raises(CKKSError):
            load_vector(client.context, data)
        with pytest.raises(CKKSError):
            server.add([[data], [blob]])


def test_flipped_byte_in_the_middle_is_not_detected_by_tenseal(client: ClientCrypto) -> None:
    # Finding (TenSEAL 0.3.18): a byte flipped inside the compressed ciphertext polynomials
    # loads without error and decrypts to garbage (~1e10). Nothing in the ciphertext format
    # detects it; the message layer's SHA-256 (shelora_core.messages) does.
    x = _updates(1, SLOTS)[0]
    blob = bytearray(client.encrypt(x)[0])
    blob[len(blob) // 2] ^= 0xFF
    try:
        got = client.decrypt([bytes(blob)], SLOTS)
    except CKKSError:  # a future TenSEAL that detects it is fine too
        return
    assert np.max(np.abs(got - x)) > 1e3 * TOL


def test_flipped_scale_field_gives_plausible_wrong_values(client: ClientCrypto) -> None:
    # Finding: the protobuf's trailing `double scale = 3` field is not checked either. Flipping
    # a low mantissa byte changes the decrypted values by a tiny *relative* amount: silently
    # wrong yet plausible. Again only the message-layer digest catches it.
    x = np.full(8, 0.5)
    blob = bytearray(client.encrypt(x)[0])
    assert blob[-9] == 0x19  # tag of field 3, wire type 64-bit
    blob[-8] ^= 0x01  # least significant mantissa byte of the scale (2^40 has zero mantissa)
    got = client.decrypt([bytes(blob)], 8)
    assert 0 < np.max(np.abs(got - x)) < 1e-3


# --- parameters and security ---------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PARAM_SETS))
def test_named_sets_pass_check_security(name: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_security(name) is PARAM_SETS[name]
    p = PARAM_SETS[name]
    assert p.slots == p.poly_modulus_degree // 2
    assert p.total_coeff_bits <= MAX_COEFF_BITS_128[p.poly_modulus_degree]


def test_named_set_values() -> None:
    fs = PARAM_SETS["fedshield"]
    assert (fs.poly_modulus_degree, fs.coeff_mod_bit_sizes, fs.global_scale_bits) == (
        8192,
        (60, 40, 40, 60),
        40,
    )
    assert not fs.galois and fs.with_galois().galois and fs.with_galois().depth == 2
    ao = PARAM_SETS["add_only"]
    assert (ao.poly_modulus_degree, ao.coeff_mod_bit_sizes, ao.total_coeff_bits) == (
        4096,
        (60, 49),
        109,
    )
    assert ao.depth == 0
    assert PARAM_SETS["paper_mm"].galois
    with pytest.raises(CKKSError, match="unknown CKKS parameter set"):
        get_params("nope")


def test_check_security_rejects_too_many_bits() -> None:
    with pytest.raises(ValueError) as info:
        check_security(CKKSParams("big", 4096, (60, 60, 60), 40))
    msg = str(info.value)
    assert "N=4096" in msg and "180" in msg and "109" in msg and "insecure" in msg


def test_check_security_rejects_bad_primes_and_degree() -> None:
    with pytest.raises(CKKSError, match="out of range"):
        check_security(CKKSParams("p", 8192, (61, 40, 60), 40))
    with pytest.raises(CKKSError, match="power of two"):
        check_security(CKKSParams("n", 3000, (30, 30), 20))
    with pytest.raises(CKKSError, match="at least two primes"):
        check_security(CKKSParams("one", 4096, (60,), 30))


def test_check_security_rejects_scale_out_of_bounds() -> None:
    # [40, 40] with scale 2^39: TenSEAL raises "scale out of bounds" at encryption.
    with pytest.raises(CKKSError, match="scale out of bounds.*smaller scale.*longer"):
        check_security(CKKSParams("s", 8192, (40, 40), 39))
    # Scale larger than the inner primes: products would be silently off by 2^(s - p).
    with pytest.raises(CKKSError, match="cannot be supported"):
        check_security(CKKSParams("s", 8192, (60, 40, 40, 60), 45))
    with pytest.raises(CKKSError, match="inner"):
        check_security(CKKSParams("s", 8192, (60, 40, 40, 60), 38))


def test_check_security_warns_for_toy_choices() -> None:
    with pytest.warns(UserWarning, match="small"):
        check_security(CKKSParams("toy", 2048, (30, 24), 16))
    with pytest.warns(UserWarning, match="integer bits"):
        check_security(CKKSParams("tight", 4096, (60, 49), 55))


def test_generate_rejects_insecure_params() -> None:
    with pytest.raises(CKKSError, match="insecure"):
        KeyHolder.generate(CKKSParams("big", 4096, (60, 60, 60), 40))


# --- packing -------------------------------------------------------------------------------


def test_packing_layout_round_trip_and_counts() -> None:
    layout = PackingLayout.build([("a", 3000), ("b", 10), ("c", 1200)], slots=SLOTS)
    assert layout.total == 4210
    assert layout.num_ciphertexts == 3
    assert layout.fill_ratio == pytest.approx(4210 / (3 * SLOTS))
    rng = np.random.default_rng(0)
    arrays = {"a": rng.normal(size=3000), "b": rng.normal(size=10), "c": rng.normal(size=1200)}
    flat = layout.pack(arrays)
    assert flat.shape == (4210,)
    assert layout.slice_of("b") == slice(3000, 3010)
    back = layout.unpack(flat)
    assert list(back) == ["a", "b", "c"]
    for k in arrays:
        np.testing.assert_array_equal(back[k], arrays[k])


def test_packing_layout_errors() -> None:
    layout = PackingLayout.build([("lora_A", 8), ("lora_B", 4)], slots=16)
    with pytest.raises(CKKSError, match=r"'lora_B' has length 5.*expects length 4"):
        layout.pack({"lora_A": np.zeros(8), "lora_B": np.zeros(5)})
    with pytest.raises(CKKSError, match="missing segments"):
        layout.pack({"lora_A": np.zeros(8)})
    with pytest.raises(CKKSError, match="1-D"):
        layout.pack({"lora_A": np.zeros((2, 4)), "lora_B": np.zeros(4)})
    with pytest.raises(CKKSError, match="expects length 12"):
        layout.unpack(np.zeros(13))
    with pytest.raises(CKKSError, match="duplicate"):
        PackingLayout.build([("x", 1), ("x", 2)], slots=16)
    with pytest.raises(CKKSError, match="invalid length"):
        PackingLayout.build([("x", -1)], slots=16)


def test_packed_layout_aggregates_across_clients(
    client: ClientCrypto, server: ServerCrypto
) -> None:
    segments = [("q.lora_A", 1500), ("q.lora_B", 900), ("v.lora_A", 1500)]
    layout = PackingLayout.build(segments, client.slots)
    rng = np.random.default_rng(3)
    per_client = [{n: rng.normal(0, 0.02, k) for n, k in segments} for _ in range(3)]
    blobs = [client.encrypt(layout.pack(d)) for d in per_client]
    assert all(len(b) == layout.num_ciphertexts == 2 for b in blobs)
    total = layout.unpack(client.decrypt(server.add(blobs), layout.total))
    for n, _ in segments:
        np.testing.assert_allclose(total[n], sum(d[n] for d in per_client), atol=TOL)


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(min_value=0, max_value=300), min_size=1, max_size=8),
    slots=st.sampled_from([1, 7, 64, 256]),
)
def test_packing_layout_property(lengths: list[int], slots: int) -> None:
    segments = [(f"s{i}", n) for i, n in enumerate(lengths)]
    layout = PackingLayout.build(segments, slots)
    assert layout.total == sum(lengths)
    assert layout.num_ciphertexts == -(-sum(lengths) // slots)
    if layout.total:
        assert (layout.num_ciphertexts - 1) * slots < layout.total <= layout.num_ciphertexts * slots
        assert 0 < layout.fill_ratio <= 1
    arrays = {
        name: np.arange(n, dtype=np.float64) + 1000 * i for i, (name, n) in enumerate(segments)
    }
    back = layout.unpack(layout.pack(arrays))
    assert back.keys() == arrays.keys()
    for name in arrays:
        np.testing.assert_array_equal(back[name], arrays[name])
    # Same segments -> same layout on every side.
    assert PackingLayout.build(segments, slots) == layout


# --- measurements --------------------------------------------------------------------------


def test_measure_precision_add_only() -> None:
    r = measure_precision("add_only", n_values=4096, n_summands=32)
    assert r["max_abs_error"] < TOL  # measured ~3e-8 (scale 2^40; 2^30 gave ~2.5e-5)
    assert r["max_rel_error"] < 1e-6
    assert r["bytes_per_value"] <= 40
    assert r["bytes_per_value"] == pytest.approx(32.07, rel=0.1)  # 65,676 B / 2048 slots
    assert r["ciphertext_bytes"] == pytest.approx(65_676, rel=0.1)
    assert r["num_ciphertexts"] == 2
    assert r["encrypt_values_per_s"] > 1e4  # ~1e6 measured; a loose floor


def test_ciphertext_bytes_fedshield() -> None:
    # 3 data primes (140 bits) x 2 polynomials x 8192 coefficients: ~331 KB, 81 B per value.
    assert ciphertext_bytes("fedshield") == pytest.approx(331_600, rel=0.1)


def test_galois_keys_only_when_requested(holder: KeyHolder, paper_mm: KeyHolder) -> None:
    add_only_public = len(holder.public_bytes())
    paper_public = len(paper_mm.public_bytes())
    # Measured: add_only public 124,760 B (public key only), secret 187,095 B;
    # paper_mm public 33.9 MB (Galois keys), secret 697,763 B.
    assert add_only_public == pytest.approx(124_760, rel=0.1)
    assert len(holder.secret_bytes()) == pytest.approx(187_100, rel=0.1)
    assert paper_public == pytest.approx(33_900_000, rel=0.1)
    assert paper_public > 100 * add_only_public
    assert not context_info(load_context(holder.public_bytes())).has_galois_keys
    assert context_info(load_context(paper_mm.public_bytes())).has_galois_keys


def test_paper_mm_server_can_multiply_by_plaintext_matrix(paper_mm: KeyHolder) -> None:
    # What the Galois keys are for: ciphertext (vector) x plaintext matrix on the server.
    client, server = paper_mm.client(), paper_mm.server()
    rng = np.random.default_rng(0)
    x, m = rng.normal(0, 0.02, 16), rng.normal(0, 0.02, (16, 8))
    product = server.load(client.encrypt(x)[0]).mm(m).serialize()
    np.testing.assert_allclose(client.decrypt([product], 8), x @ m, atol=1e-6)
