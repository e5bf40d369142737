"""TenSEAL contexts and ciphertexts as bytes: loading, inspecting and fingerprinting them.

Notes
-----
Everything that crosses a boundary is ``bytes``: TenSEAL objects do not pickle, they serialize.
:func:`load_context` and :func:`load_vector` turn bytes back into TenSEAL objects and raise
:class:`~shelora_core.ckks.CKKSError` on bytes that are not a CKKS context / ciphertext.
A ciphertext encrypted under another key decrypts *silently* to garbage, so messages carry the
key's :func:`context_fingerprint` and receivers call :func:`check_fingerprint`.
:func:`context_info` reads ``N``, the modulus chain, the levels and the key material back from a
context; :func:`context_params` turns that into a :class:`~shelora_core.ckks.CKKSParams` and
:func:`check_context` runs :func:`~shelora_core.ckks.check_security` on it. A context that comes
as bytes was generated elsewhere, so :func:`load_context` (and with it every role,
:class:`~shelora_core.ckks.ClientCrypto` and :class:`~shelora_core.ckks.ServerCrypto`) refuses
one whose parameters :meth:`~shelora_core.ckks.KeyHolder.generate` would have refused: without
that check, a chain whose inner prime differs from the scale (scale 2^24 with ``[60, 40, 60]``)
loads and a mean of 0.1 and 0.1 decrypts to 102.4.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

import tenseal as ts

from .errors import CKKSError
from .params import CKKSParams, check_security

__all__ = [
    "ContextInfo",
    "check_context",
    "check_fingerprint",
    "context_fingerprint",
    "context_info",
    "context_params",
    "load_context",
    "load_vector",
]

_FINGERPRINT_HEX = 16


@dataclass(frozen=True)
class ContextInfo:
    """What a (public or secret) TenSEAL context says about itself.

    Attributes:
        poly_modulus_degree: ``N``.
        level_bits: total data-modulus bits at each level, fresh ciphertexts first
            (``[60]`` for ``[60, 49]``; ``[140, 100, 60]`` for ``[60, 40, 40, 60]``).
        global_scale_bits: ``log2`` of the context's global scale.
        is_private: whether the context holds the secret key.
        has_galois_keys: whether rotations are possible.
        has_relin_keys: whether ciphertext x ciphertext products are possible.
        coeff_mod_bit_sizes: bit sizes of the primes of the modulus chain, first to last (the
            last one is the special key-switching prime), as :class:`CKKSParams` has them;
            empty if unknown. SEAL does not expose its primes through TenSEAL, so they are read
            as differences of the levels' total bit counts (see :func:`context_info`).
    """

    poly_modulus_degree: int
    level_bits: tuple[int, ...]
    global_scale_bits: float
    is_private: bool
    has_galois_keys: bool
    has_relin_keys: bool
    coeff_mod_bit_sizes: tuple[int, ...] = ()

    @property
    def slots(self) -> int:
        """Values per ciphertext (``N / 2``)."""
        return self.poly_modulus_degree // 2

    @property
    def depth(self) -> int:
        """Multiplications a fresh ciphertext can still take (levels below the top)."""
        return len(self.level_bits) - 1


def context_info(ctx: ts.Context) -> ContextInfo:
    """Read ``N``, the modulus chain, the levels and the key material of a context.

    TenSEAL does not expose SEAL's primes, only the total bit count of the modulus at each
    level: the key level (every prime), then the data levels, each one prime shorter. The chain
    is rebuilt from the differences: the first prime is the last level's total, each rescaling
    prime the step between two levels, the special prime the step from the first data level to
    the key level. The total (what the security bound limits) is exact; the single sizes are
    exact for the primes SEAL generates (each just below ``2**bits``, so a product of primes of
    ``b1 + b2 + ...`` bits has exactly that many bits) and may be one bit off for hand-picked
    ones.

    Args:
        ctx: a TenSEAL context (public or secret).

    Returns:
        The :class:`ContextInfo`.
    """
    seal = ctx.seal_context().data
    key = seal.key_context_data()
    n = int(key.parms().poly_modulus_degree())
    levels: list[int] = []
    cd = seal.first_context_data()
    while cd is not None:
        levels.append(int(cd.total_coeff_modulus_bit_count()))
        cd = cd.next_context_data()
    chain = [levels[-1]] + [levels[k - 1] - levels[k] for k in range(len(levels) - 1, 0, -1)]
    special = int(key.total_coeff_modulus_bit_count()) - levels[0]
    if special > 0:  # a one-prime chain has no key level of its own (no key switching)
        chain.append(special)
    try:
        scale_bits = math.log2(ctx.global_scale)
    except ValueError:  # global scale not set (TenSEAL raises)
        scale_bits = float("nan")
    return ContextInfo(
        poly_modulus_degree=n,
        level_bits=tuple(levels),
        global_scale_bits=scale_bits,
        is_private=bool(ctx.is_private()),
        has_galois_keys=bool(ctx.has_galois_keys()),
        has_relin_keys=bool(ctx.has_relin_keys()),
        coeff_mod_bit_sizes=tuple(chain),
    )


def context_params(ctx: ts.Context | ContextInfo, name: str = "loaded context") -> CKKSParams:
    """The :class:`CKKSParams` a context was built with, as far as the context tells.

    Args:
        ctx: a TenSEAL context or its :class:`ContextInfo`.
        name: the ``name`` of the returned parameters (it prefixes the messages of
            :func:`check_security`).

    Returns:
        ``N``, the modulus chain (:attr:`ContextInfo.coeff_mod_bit_sizes`), the scale's bits,
        and ``galois`` / ``relin_keys`` as the context holds them.

    Raises:
        CKKSError: the context has no global scale, or one that is not a power of two (every
            key this package generates has ``2**global_scale_bits``; the scale checks of
            :func:`check_security` are stated in bits).
    """
    info = ctx if isinstance(ctx, ContextInfo) else context_info(ctx)
    bits = info.global_scale_bits
    if not math.isfinite(bits):
        raise CKKSError(
            f"{name}: the context has no global scale, so values cannot be encoded; the key "
            "holder must set one (KeyHolder.generate sets 2**global_scale_bits)"
        )
    if abs(bits - round(bits)) > 1e-9:
        raise CKKSError(
            f"{name}: the global scale 2^{bits:.4f} is not a power of two; generate the key "
            "with KeyHolder.generate, whose scale is 2**global_scale_bits (e.g. 2^40)"
        )
    return CKKSParams(
        name=name,
        poly_modulus_degree=info.poly_modulus_degree,
        coeff_mod_bit_sizes=info.coeff_mod_bit_sizes,
        global_scale_bits=int(round(bits)),
        galois=info.has_galois_keys,
        relin_keys=info.has_relin_keys,
    )


def check_context(ctx: ts.Context | ContextInfo, role: str = "load_context") -> CKKSParams:
    """Run :func:`check_security` on the parameters of a context that was built elsewhere.

    :meth:`KeyHolder.generate <shelora_core.ckks.KeyHolder.generate>` checks the parameters
    it is given; a context that arrives as bytes has not been through that check, so every
    role runs it again when it loads one (:func:`load_context`). The warnings of
    :func:`check_security` (toy scale, little headroom, small special prime) are emitted as
    they are at generation, naming ``role``.

    Args:
        ctx: a TenSEAL context (public or secret) or its :class:`ContextInfo`.
        role: who loads it, for the message (``"the client's ClientCrypto"``, ...).

    Returns:
        The context's parameters (:func:`context_params`).

    Raises:
        CKKSError: naming ``role``, the context's ``N`` and scale, what is wrong with them (the
            message of :func:`check_security`, which names the chain) and the fix.
    """
    info = ctx if isinstance(ctx, ContextInfo) else context_info(ctx)
    name = (
        f"the CKKS context loaded by {role} (N={info.poly_modulus_degree}, "
        f"scale 2^{info.global_scale_bits:g})"
    )
    try:
        return check_security(context_params(info, name))
    except CKKSError as exc:
        raise CKKSError(
            f"{exc}. Refused: a loaded context must pass the check KeyHolder.generate runs; ask "
            "the key holder for keys generated with a set that passes check_security (e.g. "
            "'add_only' or 'fedshield')"
        ) from exc


def _as_bytes(data: Any, what: str) -> bytes:
    if isinstance(data, bytes):
        return data
    if isinstance(data, bytearray | memoryview):
        return bytes(data)
    raise CKKSError(f"{what} must be bytes, got {type(data).__name__}")


def load_context(data: bytes, *, role: str = "load_context") -> ts.Context:
    """Deserialize a TenSEAL context (public or secret) from bytes and check its parameters.

    Args:
        data: bytes from :meth:`KeyHolder.public_bytes` or :meth:`KeyHolder.secret_bytes`.
        role: who loads it, named in the error (the roles pass ``"the client's ClientCrypto"``
            and ``"the server's ServerCrypto"``).

    Returns:
        The TenSEAL context.

    Raises:
        CKKSError: the bytes are not a serialized TenSEAL CKKS context, or its parameters fail
            :func:`check_context` (the checks of :func:`check_security`). To look at a refused
            context, deserialize it with ``tenseal.context_from`` and read :func:`context_info`.
    """
    data = _as_bytes(data, "a serialized context")
    if not data:
        raise CKKSError("empty bytes are not a TenSEAL context")
    try:
        ctx = ts.context_from(data)
    except Exception as exc:  # TenSEAL raises ValueError or RuntimeError from C++
        raise CKKSError(
            f"these {len(data)} bytes are not a TenSEAL context (truncated, corrupted or another "
            f"kind of object): {exc}"
        ) from exc
    scheme = ctx.seal_context().data.key_context_data().parms().scheme()
    if scheme != ts.SCHEME_TYPE.CKKS.value:
        raise CKKSError(f"this TenSEAL context uses the {scheme} scheme, not CKKS")
    check_context(ctx, role)
    return ctx


def context_fingerprint(ctx: ts.Context) -> str:
    """A short hex digest that identifies the key pair (and parameters) of a context.

    Identical for the key holder, every client (secret context) and the server (public
    context) of one key; different for any other key.

    How: SHA-256 over the context serialized with the public key only (no secret, relin or
    Galois keys), truncated to 16 hex characters. That blob is a protobuf holding the SEAL
    encryption parameters, the SEAL-serialized (zstd-compressed) public key, the auto flags and
    the global scale, all of which are the same for every holder of the key. We checked that it
    is byte-for-byte deterministic across calls, across a public *and* a secret round trip
    through bytes, and across processes (tests/test_ckks.py); relin and Galois keys are left out
    because a secret context *regenerates* them on load (with fresh randomness).

    Args:
        ctx: a TenSEAL context (public or secret).

    Returns:
        16 lowercase hex characters.
    """
    blob = ctx.serialize(
        save_public_key=True, save_secret_key=False, save_galois_keys=False, save_relin_keys=False
    )
    return hashlib.sha256(blob).hexdigest()[:_FINGERPRINT_HEX]


def check_fingerprint(expected: str, got: str) -> None:
    """Raise unless a ciphertext's key fingerprint matches this context's.

    Args:
        expected: this context's :func:`context_fingerprint`.
        got: the fingerprint carried by the incoming message.

    Raises:
        CKKSError: the ciphertext was encrypted under another key (it would decrypt to garbage
            without any error from TenSEAL).
    """
    if expected != got:
        raise CKKSError(
            f"ciphertext was encrypted under key {got}, this context is {expected}: it comes "
            "from another key / session (decrypting it would silently give garbage)"
        )


def load_vector(ctx: ts.Context, data: bytes, *, max_size: int | None = None) -> ts.CKKSVector:
    """Deserialize one ciphertext and link it to ``ctx``.

    Args:
        ctx: the context to link the ciphertext to (public or secret).
        data: bytes from ``CKKSVector.serialize()``.
        max_size: if given, the largest number of values accepted (usually the slot count).

    Returns:
        The encrypted vector.

    Raises:
        CKKSError: truncated / garbage bytes, a ciphertext for other parameters, or an empty
            vector. A byte flipped inside the ciphertext polynomials is *not* detectable here
            (it decrypts to garbage); the message layer's SHA-256 catches it.
    """
    data = _as_bytes(data, "a serialized ciphertext")
    if not data:
        # TenSEAL accepts b"" as an empty vector: reject it explicitly.
        raise CKKSError("empty bytes are not a CKKS ciphertext")
    try:
        vec = ts.ckks_vector_from(ctx, data)
    except Exception as exc:
        raise CKKSError(
            f"these {len(data)} bytes are not a CKKS ciphertext for this context (truncated, "
            f"corrupted, or encrypted with other parameters): {exc}"
        ) from exc
    size = vec.size()
    if size == 0:
        raise CKKSError("the ciphertext holds no values")
    if max_size is not None and size > max_size:
        raise CKKSError(f"the ciphertext holds {size} values, more than the {max_size} slots")
    return vec
