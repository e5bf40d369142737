"""TenSEAL contexts and ciphertexts as bytes: loading, inspecting and fingerprinting them.

Notes
-----
Everything that crosses a boundary is ``bytes``: TenSEAL objects do not pickle, they serialize.
:func:`load_context` and :func:`load_vector` turn bytes back into TenSEAL objects and raise
:class:`~shelora_core.ckks.CKKSError` on bytes that are not a CKKS context / ciphertext.
A ciphertext encrypted under another key decrypts *silently* to garbage, so messages carry the
key's :func:`context_fingerprint` and receivers call :func:`check_fingerprint`.
:func:`context_info` reads ``N``, the levels and the key material back from a context.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

import tenseal as ts

from .errors import CKKSError

__all__ = [
    "ContextInfo",
    "check_fingerprint",
    "context_fingerprint",
    "context_info",
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
    """

    poly_modulus_degree: int
    level_bits: tuple[int, ...]
    global_scale_bits: float
    is_private: bool
    has_galois_keys: bool
    has_relin_keys: bool

    @property
    def slots(self) -> int:
        """Values per ciphertext (``N / 2``)."""
        return self.poly_modulus_degree // 2

    @property
    def depth(self) -> int:
        """Multiplications a fresh ciphertext can still take (levels below the top)."""
        return len(self.level_bits) - 1


def context_info(ctx: ts.Context) -> ContextInfo:
    """Read ``N``, the levels and the key material of a context.

    Args:
        ctx: a TenSEAL context (public or secret).

    Returns:
        The :class:`ContextInfo`.
    """
    seal = ctx.seal_context().data
    n = int(seal.key_context_data().parms().poly_modulus_degree())
    levels: list[int] = []
    cd = seal.first_context_data()
    while cd is not None:
        levels.append(int(cd.total_coeff_modulus_bit_count()))
        cd = cd.next_context_data()
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
    )


def _as_bytes(data: Any, what: str) -> bytes:
    if isinstance(data, bytes):
        return data
    if isinstance(data, bytearray | memoryview):
        return bytes(data)
    raise CKKSError(f"{what} must be bytes, got {type(data).__name__}")


def load_context(data: bytes) -> ts.Context:
    """Deserialize a TenSEAL context (public or secret) from bytes.

    Args:
        data: bytes from :meth:`KeyHolder.public_bytes` or :meth:`KeyHolder.secret_bytes`.

    Returns:
        The TenSEAL context.

    Raises:
        CKKSError: the bytes are not a serialized TenSEAL CKKS context.
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
