"""Every role runs the CKKS security check when it loads a context (issue 12, item 7).

Contexts are built directly with TenSEAL, as a careless or hostile key holder could, so the
parameters never went through ``KeyHolder.generate``'s check. Each bad one must be refused by
``ClientCrypto`` (secret serialization), ``ServerCrypto`` (public serialization) and
``load_context``, naming the role and what is wrong; good ones must still load.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import tenseal as ts

from shelora_core.ckks import (
    PARAM_SETS,
    CKKSError,
    ClientCrypto,
    ContextInfo,
    KeyHolder,
    ServerCrypto,
    check_context,
    context_info,
    context_params,
    load_context,
)


def _context(n: int, chain: list[int], scale: float | None) -> ts.Context:
    ctx = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=n, coeff_mod_bit_sizes=chain)
    if scale is not None:
        ctx.global_scale = scale
    return ctx


def _secret(ctx: ts.Context) -> bytes:
    return ctx.serialize(save_public_key=True, save_secret_key=True)


def _public(ctx: ts.Context) -> bytes:
    return ctx.serialize(
        save_public_key=True, save_secret_key=False, save_galois_keys=False, save_relin_keys=False
    )


#: (id, N, chain, scale, a fragment of the reason the refusal must give)
BAD = [
    ("inner_prime_not_scale", 8192, [60, 40, 60], 2.0**24, "does not match the inner"),
    ("scale_too_close_to_first_prime", 4096, [50, 50], 2.0**49, "scale out of bounds"),
    ("scale_not_a_power_of_two", 8192, [60, 40, 40, 60], 1.5 * 2.0**40, "not a power of two"),
    ("no_global_scale", 4096, [60, 49], None, "no global scale"),
]


@pytest.fixture(scope="module", params=BAD, ids=[b[0] for b in BAD])
def bad(request) -> tuple[ts.Context, str]:
    _, n, chain, scale, reason = request.param
    return _context(n, chain, scale), reason


def test_inner_prime_not_scale_is_silently_wrong_without_the_check() -> None:
    """Why the check matters: through TenSEAL alone, a weighted mean of 0.1 and 0.1 is wrong."""
    ctx = _context(8192, [60, 40, 60], 2.0**24)
    a, b = ts.ckks_vector(ctx, [0.1]), ts.ckks_vector(ctx, [0.1])
    mean = (a * 0.5 + b * 0.5).decrypt()[0]
    assert abs(mean - 0.1) > 0.05  # off by 2^(24 - 40), no error raised


def test_client_refuses_bad_secret_context(bad: tuple[ts.Context, str]) -> None:
    ctx, reason = bad
    with pytest.raises(CKKSError, match=reason) as exc:
        ClientCrypto(_secret(ctx))
    msg = str(exc.value)
    assert "the client's ClientCrypto" in msg and "Refused" in msg and "check_security" in msg


def test_server_refuses_bad_public_context(bad: tuple[ts.Context, str]) -> None:
    ctx, reason = bad
    with pytest.raises(CKKSError, match=reason) as exc:
        ServerCrypto(_public(ctx))
    msg = str(exc.value)
    assert "the server's ServerCrypto" in msg and "Refused" in msg
    assert f"N={ctx.seal_context().data.key_context_data().parms().poly_modulus_degree()}" in msg


def test_load_context_refuses_bad_context_in_both_serializations(
    bad: tuple[ts.Context, str],
) -> None:
    ctx, reason = bad
    for data in (_secret(ctx), _public(ctx)):
        with pytest.raises(CKKSError, match=reason):
            load_context(data)


def test_the_refusal_names_the_chain() -> None:
    ctx = _context(8192, [60, 40, 60], 2.0**24)
    with pytest.raises(CKKSError, match=r"\[60, 40, 60\]") as exc:
        ServerCrypto(_public(ctx))
    assert "global_scale_bits=40" in str(exc.value)  # the fix


def test_over_the_128_bit_bound_tenseal_refuses_to_build_and_the_check_refuses_too() -> None:
    # N=4096 allows 109 bits; TenSEAL (SEAL at 128-bit security) will not build 200 bits ...
    with pytest.raises(ValueError, match="not set correctly"):
        _context(4096, [60, 40, 40, 60], 2.0**40)
    # ... and if such a context ever arrived (hand-made bytes), the check would refuse it.
    info = ContextInfo(
        poly_modulus_degree=4096,
        level_bits=(140, 100, 60),
        global_scale_bits=40.0,
        is_private=False,
        has_galois_keys=False,
        has_relin_keys=False,
        coeff_mod_bit_sizes=(60, 40, 40, 60),
    )
    with pytest.raises(CKKSError, match="insecure") as exc:
        check_context(info, "the server's ServerCrypto")
    msg = str(exc.value)
    assert "the server's ServerCrypto" in msg and "200" in msg and "109" in msg


@pytest.mark.parametrize(
    ("n", "chain"),
    [
        (4096, [60, 49]),
        (8192, [60, 40, 40, 60]),
        (8192, [50, 30, 30, 30, 50]),
        (16384, [60, 40, 40, 40, 40, 40, 40, 40, 60]),
    ],
)
def test_context_info_reads_the_modulus_chain(n: int, chain: list[int]) -> None:
    ctx = _context(n, chain, 2.0 ** chain[1] if len(chain) > 2 else 2.0**40)
    for loaded in (ts.context_from(_secret(ctx)), ts.context_from(_public(ctx))):
        assert context_info(loaded).coeff_mod_bit_sizes == tuple(chain)


@pytest.mark.parametrize("name", sorted(PARAM_SETS))
def test_named_sets_load_in_every_role_without_warnings(name: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        holder = KeyHolder.generate(name)
        client, server = ClientCrypto(holder.secret_bytes()), ServerCrypto(holder.public_bytes())
        for ctx in (load_context(holder.secret_bytes()), load_context(holder.public_bytes())):
            p = context_params(ctx)
            assert p.poly_modulus_degree == PARAM_SETS[name].poly_modulus_degree
            assert p.coeff_mod_bit_sizes == PARAM_SETS[name].coeff_mod_bit_sizes
            assert p.global_scale_bits == PARAM_SETS[name].global_scale_bits
    x = np.array([0.1, -0.25, 0.5])
    got = client.decrypt(server.add([client.encrypt(x), client.encrypt(x)]), 3)
    np.testing.assert_allclose(got, 2 * x, atol=1e-6)


def test_good_context_built_with_tenseal_loads_in_both_roles() -> None:
    ctx = _context(8192, [60, 40, 40, 60], 2.0**40)
    client, server = ClientCrypto(_secret(ctx)), ServerCrypto(_public(ctx))
    assert client.fingerprint == server.fingerprint
    x = np.array([0.1, 0.1])
    mean = client.decrypt(
        server.weighted_sum([client.encrypt(x), client.encrypt(x)], [0.5, 0.5]), 2
    )
    np.testing.assert_allclose(mean, x, atol=1e-6)


def test_a_usable_toy_context_loads_with_the_warning_naming_the_role() -> None:
    ctx = _context(2048, [30, 24], 2.0**16)  # passes, but a scale of 2^16 is visibly imprecise
    with pytest.warns(UserWarning, match="the server's ServerCrypto.*scale 2\\^16 is small"):
        ServerCrypto(_public(ctx))
