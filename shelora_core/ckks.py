"""CKKS homomorphic encryption for federated LoRA: keys, roles, packing and measurements.

CKKS in a few lines
-------------------
CKKS (Cheon, Kim, Kim and Song, "Homomorphic Encryption for Arithmetic of Approximate Numbers",
ASIACRYPT 2017) encrypts a vector of real numbers into one ciphertext: a pair of polynomials of
degree ``N`` (``poly_modulus_degree``) whose coefficients live modulo ``Q``, a product of primes
(the *modulus chain*, ``coeff_mod_bit_sizes``). One ciphertext holds ``N / 2`` numbers ("slots").
A real value ``x`` is stored as the integer ``round(x * 2**scale_bits)``, so CKKS is *approximate*:
every result carries a small error (about ``2**-scale_bits`` times the encryption noise). Anyone
holding the *public* key can encrypt, add ciphertexts slot-wise and multiply them by plaintext
numbers; only the *secret* key decrypts. Each multiplication doubles the scale and is followed by
a *rescale* that drops one prime from the chain, so the number of inner primes is the
multiplicative depth; a chain with no inner prime (``[60, 49]``) supports additions only. The
last prime is the "special" prime used for key switching (relinearisation and rotations, which
need relinearisation / Galois keys). Security depends on ``N`` and the total bit size of ``Q``:
bigger ``Q`` for the same ``N`` is *less* secure (see :func:`check_security`).

We use TenSEAL (Benaissa et al., "TenSEAL: A Library for Encrypted Tensor Operations Using
Homomorphic Encryption", ICLR 2021 workshop on distributed and private ML, arXiv:2104.03152),
a Python wrapper around Microsoft SEAL.

Roles
-----
* :class:`KeyHolder` generates the keys. It hands the **secret** context (as bytes) to clients and
  the **public** context (as bytes, no secret key) to the server.
* :class:`ClientCrypto` (secret context) encrypts a client's update and decrypts the aggregate.
* :class:`ServerCrypto` (public context) adds ciphertexts and multiplies them by plaintext weights;
  it cannot decrypt, by construction (its context holds no secret key).

Everything that crosses a boundary is ``bytes``: TenSEAL objects do not pickle, they serialize.
A ciphertext encrypted under another key decrypts *silently* to garbage, so messages carry the
key's :func:`context_fingerprint` and receivers call :func:`check_fingerprint`.

This module is standalone (numpy, tenseal and the standard library only).
"""

from __future__ import annotations

import hashlib
import math
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, NoReturn

import numpy as np
import tenseal as ts

__all__ = [
    "MAX_COEFF_BITS_128",
    "PARAM_SETS",
    "CKKSError",
    "CKKSParams",
    "ClientCrypto",
    "ContextInfo",
    "KeyHolder",
    "PackingLayout",
    "ServerCrypto",
    "check_fingerprint",
    "check_security",
    "ciphertext_bytes",
    "context_fingerprint",
    "context_info",
    "get_params",
    "load_context",
    "load_vector",
    "measure_precision",
]

#: Largest total coefficient-modulus size (bits) for 128-bit classical security, per ``N``.
#: From the Homomorphic Encryption Standard (Albrecht et al. 2018, homomorphicencryption.org);
#: SEAL's ``CoeffModulus::MaxBitCount(N, sec_level_type::tc128)`` uses the same table.
MAX_COEFF_BITS_128: dict[int, int] = {
    1024: 27,
    2048: 54,
    4096: 109,
    8192: 218,
    16384: 438,
    32768: 881,
}

_MAX_PRIME_BITS = 60  # SEAL_USER_MOD_BIT_COUNT_MAX
_WARN_SCALE_BITS = 20  # below this, CKKS noise is visible at LoRA magnitudes (~1e-2)
_WARN_HEADROOM_BITS = 8  # integer bits left in the first prime for the (summed) values
_FINGERPRINT_HEX = 16


class CKKSError(ValueError):
    """Bad CKKS parameters, bytes that are not a context / ciphertext, or a key mismatch."""


# --------------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CKKSParams:
    """One CKKS parameter set.

    Attributes:
        name: short identifier (a key of :data:`PARAM_SETS` for the named sets).
        poly_modulus_degree: ``N``, a power of two; a ciphertext holds ``N / 2`` values.
        coeff_mod_bit_sizes: bit sizes of the primes of the modulus chain, first to last. The
            last one is the special (key-switching) prime; the inner ones are rescaling primes.
        global_scale_bits: values are encoded as ``round(x * 2**global_scale_bits)``.
        galois: whether Galois (rotation) keys are generated and shipped to the server. They
            are only needed for rotations, e.g. ciphertext x plaintext matrix products
            (``CKKSVector.mm``), and they are large (tens of MB at ``N = 8192``).
        description: one line saying where the set comes from.
        relin_keys: whether relinearisation keys are shipped to the server. Only a
            ciphertext x ciphertext product needs them; none of our protocols multiplies two
            ciphertexts, so they are left out of the public context (it halves its size).
    """

    name: str
    poly_modulus_degree: int
    coeff_mod_bit_sizes: tuple[int, ...]
    global_scale_bits: int
    galois: bool = False
    description: str = ""
    relin_keys: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "coeff_mod_bit_sizes", tuple(int(b) for b in self.coeff_mod_bit_sizes)
        )
        if not isinstance(self.poly_modulus_degree, int) or self.poly_modulus_degree <= 0:
            raise CKKSError(
                f"poly_modulus_degree must be a positive int, got {self.poly_modulus_degree!r}"
            )
        if not isinstance(self.global_scale_bits, int):
            raise CKKSError(f"global_scale_bits must be an int, got {self.global_scale_bits!r}")

    @property
    def slots(self) -> int:
        """Number of real values one ciphertext holds (``N / 2``)."""
        return self.poly_modulus_degree // 2

    @property
    def total_coeff_bits(self) -> int:
        """Total bit size of the coefficient modulus (what the security bound limits)."""
        return sum(self.coeff_mod_bit_sizes)

    @property
    def depth(self) -> int:
        """Multiplicative depth: the number of inner (rescaling) primes."""
        return max(len(self.coeff_mod_bit_sizes) - 2, 0)

    @property
    def global_scale(self) -> float:
        """The encoding scale ``2**global_scale_bits``."""
        return float(2**self.global_scale_bits)

    def with_galois(self) -> CKKSParams:
        """A copy that also generates Galois keys (needed for ``paper``-mode matrix products)."""
        if self.galois:
            return self
        return replace(self, name=f"{self.name}+galois", galois=True)


# add_only: measured with measure_precision (32-way sum of 4096 LoRA-like values, 3 seeds) on
# N=4096, [60, 49]: scale 2^30 -> max abs error 2.5e-5 (fails the 1e-5 bar), 2^35 -> 7.5e-7,
# 2^40 -> 2.4e-8. The ciphertext size does not depend on the scale (32.07 bytes per value), so
# 2^40 is free; it leaves 60 - 40 - 1 = 19 integer bits (|sum| < 5e5). N=2048 (54 bits max) gives
# 9e-4 at best (scale 2^24): too imprecise for LoRA.
PARAM_SETS: dict[str, CKKSParams] = {
    "fedshield": CKKSParams(
        name="fedshield",
        poly_modulus_degree=8192,
        coeff_mod_bit_sizes=(60, 40, 40, 60),
        global_scale_bits=40,
        galois=False,
        description=(
            "FedShield-LLM / MaskCrypt / NVFlare default: N=8192, [60,40,40,60], scale 2^40, "
            "depth 2. No Galois keys: use .with_galois() (or 'paper_mm') for matrix products."
        ),
    ),
    "add_only": CKKSParams(
        name="add_only",
        poly_modulus_degree=4096,
        coeff_mod_bit_sizes=(60, 49),
        global_scale_bits=40,
        galois=False,
        description=(
            "Smallest N that keeps LoRA precision for encrypted sums: N=4096, [60,49] (109 bits, "
            "the 128-bit maximum), scale 2^40, additions only (no multiplicative depth). "
            "Measured 32-way sum max abs error ~3e-8 (scale 2^30 gave ~2.5e-5); 32 B/value."
        ),
    ),
    "paper_mm": CKKSParams(
        name="paper_mm",
        poly_modulus_degree=8192,
        coeff_mod_bit_sizes=(60, 40, 40, 60),
        global_scale_bits=40,
        galois=True,
        description=(
            "SHE-LoRA paper mode: fedshield parameters plus Galois keys so the server can "
            "multiply ciphertexts by plaintext matrices (CKKSVector.mm)."
        ),
    ),
}


def get_params(params: CKKSParams | str) -> CKKSParams:
    """Resolve a parameter-set name (a key of :data:`PARAM_SETS`) or pass a CKKSParams through.

    Args:
        params: a :class:`CKKSParams` or the name of a named set.

    Returns:
        The parameter set.

    Raises:
        CKKSError: the name is unknown.
    """
    if isinstance(params, CKKSParams):
        return params
    try:
        return PARAM_SETS[params]
    except KeyError:
        raise CKKSError(
            f"unknown CKKS parameter set {params!r}; known sets: {sorted(PARAM_SETS)}"
        ) from None


def check_security(params: CKKSParams | str) -> CKKSParams:
    """Reject parameters that are insecure or that TenSEAL cannot use correctly.

    Checks, in order:

    * ``N`` is a power of two in :data:`MAX_COEFF_BITS_128` and the chain has >= 2 primes;
    * every prime has at most 60 bits (SEAL's limit) and more than ``log2(2N)`` bits (SEAL
      needs primes ``= 1 mod 2N``);
    * the total modulus size is within the 128-bit classical security bound of the HE
      standard (homomorphicencryption.org), e.g. 109 bits at ``N = 4096``;
    * the scale fits: the first prime must exceed the scale by >= 2 bits (one sign bit, one
      integer bit), otherwise encryption fails with TenSEAL's classic ``scale out of bounds``
      or the decrypted values wrap around;
    * every inner (rescaling) prime has exactly ``global_scale_bits`` bits. TenSEAL rescales by
      the inner prime after a multiplication and then *resets* the ciphertext's scale to
      ``2**global_scale_bits``; with a mismatch, every product is silently off by
      ``2**(scale_bits - prime_bits)`` (measured: scale 2^38 with 40-bit inner primes returns
      ``x * 0.5 / 4``).

    Warns (``UserWarning``, the parameters remain usable) when the scale is below 2^20
    (visible precision loss), when fewer than 8 integer bits remain for the values, or when
    key switching is used and the special prime is smaller than the largest data prime.

    Args:
        params: a :class:`CKKSParams` or the name of a named set.

    Returns:
        The (resolved) parameters, unchanged.

    Raises:
        CKKSError: (a ``ValueError``) naming the offending quantity, the bound and what to change.
    """
    p = get_params(params)
    n = p.poly_modulus_degree
    chain = p.coeff_mod_bit_sizes
    total = p.total_coeff_bits
    s = p.global_scale_bits
    if n not in MAX_COEFF_BITS_128:
        raise CKKSError(
            f"{p.name}: poly_modulus_degree N={n} is not supported; use a power of two in "
            f"{sorted(MAX_COEFF_BITS_128)}"
        )
    if len(chain) < 2:
        raise CKKSError(
            f"{p.name}: the modulus chain {list(chain)} needs at least two primes (data prime(s) "
            "followed by the special key-switching prime), e.g. [60, 49] at N=4096"
        )
    min_prime_bits = int(math.log2(2 * n)) + 1
    for bits in chain:
        if bits > _MAX_PRIME_BITS or bits <= min_prime_bits:
            raise CKKSError(
                f"{p.name}: prime size {bits} bits in {list(chain)} is out of range: SEAL needs "
                f"{min_prime_bits} < bits <= {_MAX_PRIME_BITS} at N={n}; split large primes "
                "into several smaller ones"
            )
    bound = MAX_COEFF_BITS_128[n]
    if total > bound:
        raise CKKSError(
            f"{p.name}: insecure parameters: N={n} with coeff_mod_bit_sizes={list(chain)} has "
            f"{total} bits of coefficient modulus, above the 128-bit security bound of {bound} "
            f"bits for N={n} (HE standard). Use fewer / smaller primes or a larger N "
            f"(N={2 * n} allows {MAX_COEFF_BITS_128.get(2 * n, 'n/a')} bits)"
        )
    if s < 1:
        raise CKKSError(f"{p.name}: global_scale_bits must be >= 1, got {s}")
    if chain[0] - s < 2:
        raise CKKSError(
            f"{p.name}: scale out of bounds: scale 2^{s} needs a first prime of at least "
            f"{s + 2} bits (sign + integer bits) but the chain {list(chain)} starts with "
            f"{chain[0]} bits. Use a smaller scale (e.g. 2^{chain[0] - 20}) or a larger first "
            "prime (a longer / bigger chain, within the security bound)"
        )
    inner = chain[1:-1]
    bad = [b for b in inner if b != s]
    if bad:
        raise CKKSError(
            f"{p.name}: scale 2^{s} does not match the inner (rescaling) primes {list(inner)} of "
            f"{list(chain)}: TenSEAL rescales by the inner prime after each multiplication and "
            f"resets the scale to 2^{s}, so products would be silently off by "
            f"2^{s - bad[0]}. Use inner primes of exactly {s} bits or global_scale_bits="
            f"{bad[0]}"
            + (" (a scale larger than the inner primes cannot be supported)" if s > bad[0] else "")
        )
    if s < _WARN_SCALE_BITS:
        warnings.warn(
            f"{p.name}: scale 2^{s} is small: CKKS errors around 2^-{s - 10} are visible at LoRA "
            "magnitudes (~1e-2); use a scale of at least 2^20 (toy parameters)",
            UserWarning,
            stacklevel=2,
        )
    if chain[0] - s - 1 < _WARN_HEADROOM_BITS:
        warnings.warn(
            f"{p.name}: only {chain[0] - s - 1} integer bits left in the first prime: values and "
            f"sums of magnitude >= 2^{chain[0] - s - 1} wrap around silently",
            UserWarning,
            stacklevel=2,
        )
    if (p.galois or p.relin_keys) and chain[-1] < max(chain[:-1]):
        warnings.warn(
            f"{p.name}: the special prime ({chain[-1]} bits) is smaller than the largest data "
            f"prime ({max(chain[:-1])} bits): rotations / relinearisation add extra noise",
            UserWarning,
            stacklevel=2,
        )
    return p


# --------------------------------------------------------------------------------------------
# Contexts, fingerprints, ciphertext bytes
# --------------------------------------------------------------------------------------------


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


def _new_context(p: CKKSParams) -> ts.Context:
    try:
        ctx = ts.context(
            ts.SCHEME_TYPE.CKKS,
            poly_modulus_degree=p.poly_modulus_degree,
            coeff_mod_bit_sizes=list(p.coeff_mod_bit_sizes),
        )
    except Exception as exc:
        raise CKKSError(f"{p.name}: TenSEAL/SEAL rejected the parameters: {exc}") from exc
    ctx.global_scale = p.global_scale
    return ctx


class KeyHolder:
    """Generates a CKKS key pair and hands out the secret and public contexts as bytes.

    Use :meth:`generate`; clients get :meth:`secret_bytes`, the server :meth:`public_bytes`.
    """

    def __init__(
        self,
        params: CKKSParams,
        ctx: ts.Context,
        secret: bytes,
        public: bytes,
        seed: int | None = None,
    ) -> None:
        self.params = params
        self.seed = seed
        self._ctx = ctx
        self._secret = secret
        self._public = public
        self._fingerprint = context_fingerprint(ctx)

    @classmethod
    def generate(
        cls, params: CKKSParams | str = "add_only", *, seed: int | None = None
    ) -> KeyHolder:
        """Create a fresh key pair for ``params`` (checked with :func:`check_security`).

        Args:
            params: a :class:`CKKSParams` or the name of a set in :data:`PARAM_SETS`.
            seed: recorded for provenance only. SEAL draws key and encryption randomness from
                the operating system and TenSEAL exposes no way to seed it, so keys, ciphertext
                bytes and fingerprints differ on every run; decrypted aggregates are
                reproducible up to the CKKS noise (~1e-8 for ``add_only``).

        Returns:
            The key holder.

        Raises:
            CKKSError: insecure or unusable parameters.
        """
        p = check_security(params)
        ctx = _new_context(p)
        # Clients only encrypt and decrypt: serialize the secret context *before* generating
        # Galois keys. A secret TenSEAL context never stores relin/Galois keys; it regenerates
        # them on load, which costs ~0.4 s at N=8192 for Galois keys nobody on the client needs.
        secret = ctx.serialize(
            save_public_key=True,
            save_secret_key=True,
            save_galois_keys=False,
            save_relin_keys=False,
        )
        if p.galois:
            ctx.generate_galois_keys()
        public = ctx.serialize(
            save_public_key=True,
            save_secret_key=False,
            save_galois_keys=p.galois,
            save_relin_keys=p.relin_keys,
        )
        return cls(p, ctx, secret, public, seed)

    @property
    def context(self) -> ts.Context:
        """The secret TenSEAL context (never send it to the server)."""
        return self._ctx

    @property
    def fingerprint(self) -> str:
        """:func:`context_fingerprint` of this key."""
        return self._fingerprint

    def secret_bytes(self) -> bytes:
        """The secret context (with the secret key) as bytes: for clients only."""
        return self._secret

    def public_bytes(self) -> bytes:
        """The public context (public key, Galois keys if ``params.galois``): for the server."""
        return self._public

    def client(self) -> ClientCrypto:
        """A :class:`ClientCrypto` built from :meth:`secret_bytes` (through bytes)."""
        return ClientCrypto(self._secret)

    def server(self) -> ServerCrypto:
        """A :class:`ServerCrypto` built from :meth:`public_bytes` (through bytes)."""
        return ServerCrypto(self._public)

    def __repr__(self) -> str:
        return f"KeyHolder(params={self.params.name!r}, fingerprint={self._fingerprint!r})"


class ClientCrypto:
    """A client's view: encrypts updates and decrypts aggregates with the secret context.

    Args:
        secret_context: bytes from :meth:`KeyHolder.secret_bytes`.

    Raises:
        CKKSError: the bytes are not a context, or the context holds no secret key.
    """

    def __init__(self, secret_context: bytes) -> None:
        ctx = load_context(secret_context)
        if not ctx.is_private():
            raise CKKSError(
                "this is a public context (no secret key): clients need the secret context "
                "(KeyHolder.secret_bytes()) to decrypt the aggregate"
            )
        self.context = ctx
        self.info = context_info(ctx)
        self.fingerprint = context_fingerprint(ctx)
        self._max_abs = 2.0 ** (self.info.level_bits[-1] - self.info.global_scale_bits - 1)

    @property
    def slots(self) -> int:
        """Values per ciphertext."""
        return self.info.slots

    def num_ciphertexts(self, length: int) -> int:
        """``ceil(length / slots)``: ciphertexts needed for ``length`` values."""
        return -(-int(length) // self.slots)

    def encrypt(self, values: np.ndarray) -> list[bytes]:
        """Encrypt a 1-D float vector, packed densely: ``ceil(len / slots)`` ciphertexts.

        Args:
            values: 1-D array of finite floats.

        Returns:
            One serialized ciphertext per chunk of ``slots`` values (the last one may be shorter).

        Raises:
            CKKSError: not 1-D, non-finite values, or values too large for the parameters.
        """
        x = np.asarray(values, dtype=np.float64)
        if x.ndim != 1:
            raise CKKSError(f"encrypt takes a 1-D vector, got shape {x.shape}: ravel() it first")
        if not np.all(np.isfinite(x)):
            raise CKKSError("cannot encrypt NaN or infinite values")
        if x.size and float(np.max(np.abs(x))) >= self._max_abs:
            raise CKKSError(
                f"|value| up to {float(np.max(np.abs(x))):.3g} does not fit: these parameters hold "
                f"|x| < {self._max_abs:.3g} (first prime minus scale bits)"
            )
        out: list[bytes] = []
        for start in range(0, x.size, self.slots):
            chunk = x[start : start + self.slots]
            out.append(ts.ckks_vector(self.context, chunk.tolist()).serialize())
        return out

    def decrypt(self, blobs: Sequence[bytes], length: int) -> np.ndarray:
        """Decrypt ciphertexts from :meth:`encrypt` (or an aggregate of them).

        Args:
            blobs: serialized ciphertexts, in order.
            length: the number of values they hold in total (the plaintext length).

        Returns:
            float64 array of ``length`` values.

        Raises:
            CKKSError: corrupted bytes, or the ciphertexts do not hold ``length`` values.
        """
        parts = [
            np.asarray(load_vector(self.context, b, max_size=self.slots).decrypt()) for b in blobs
        ]
        flat = np.concatenate(parts) if parts else np.zeros(0)
        if flat.size != length:
            raise CKKSError(
                f"the {len(blobs)} ciphertexts hold {flat.size} values, expected length {length}"
            )
        return flat.astype(np.float64, copy=False)


class ServerCrypto:
    """The server's view: adds and weights ciphertexts with the public context; cannot decrypt.

    Args:
        public_context: bytes from :meth:`KeyHolder.public_bytes`.

    Raises:
        CKKSError: the bytes are not a context, or they hold the secret key.
    """

    def __init__(self, public_context: bytes) -> None:
        ctx = load_context(public_context)
        if ctx.is_private():
            raise CKKSError(
                "this context holds the secret key: the server must never hold the secret key; "
                "give it KeyHolder.public_bytes()"
            )
        self.context = ctx
        self.info = context_info(ctx)
        self.fingerprint = context_fingerprint(ctx)

    @property
    def slots(self) -> int:
        """Values per ciphertext."""
        return self.info.slots

    def load(self, blob: bytes) -> ts.CKKSVector:
        """Deserialize one ciphertext into the public context (see :func:`load_vector`)."""
        return load_vector(self.context, blob, max_size=self.slots)

    def _load_lists(self, lists: Sequence[Sequence[bytes]]) -> list[list[ts.CKKSVector]]:
        if len(lists) == 0:
            raise CKKSError("nothing to aggregate: no ciphertext lists given")
        n = len(lists[0])
        for i, cts in enumerate(lists):
            if len(cts) != n:
                raise CKKSError(
                    f"client {i} sent {len(cts)} ciphertexts, client 0 sent {n}: all clients must "
                    "use the same PackingLayout"
                )
        vecs = [[self.load(b) for b in cts] for cts in lists]
        for j in range(n):
            sizes = {v[j].size() for v in vecs}
            if len(sizes) != 1:
                raise CKKSError(
                    f"ciphertext {j} holds different numbers of values: {sorted(sizes)}"
                )
        return vecs

    def add(self, lists: Sequence[Sequence[bytes]]) -> list[bytes]:
        """Slot-wise sum of several clients' ciphertext lists.

        Args:
            lists: one list of serialized ciphertexts per client, all of the same length and
                layout.

        Returns:
            The serialized sums, one per position.

        Raises:
            CKKSError: empty input, lists of different lengths / sizes, or corrupted bytes.
        """
        vecs = self._load_lists(lists)
        out: list[bytes] = []
        for j in range(len(vecs[0])):
            acc = vecs[0][j]
            for client in vecs[1:]:
                acc += client[j]
            out.append(acc.serialize())
        return out

    def weighted_sum(
        self, lists: Sequence[Sequence[bytes]], weights: Sequence[float]
    ) -> list[bytes]:
        """``sum_i weights[i] * lists[i]``, multiplying by plaintext scalars then adding.

        Each multiplication consumes one level of the modulus chain (multiply, then rescale), so
        this needs parameters with depth >= 1 such as ``fedshield``. With ``add_only`` either
        pre-weight on the client side (encrypt ``w_i * x_i``) and call :meth:`add`, or use a
        longer modulus chain.

        Args:
            lists: one list of serialized ciphertexts per client.
            weights: one finite plaintext weight per client.

        Returns:
            The serialized weighted sums (one level lower than the inputs).

        Raises:
            CKKSError: the parameters have no multiplicative depth left, mismatched inputs, or
                non-finite weights.
        """
        if len(weights) != len(lists):
            raise CKKSError(f"{len(weights)} weights for {len(lists)} ciphertext lists")
        w = [float(x) for x in weights]
        if not all(math.isfinite(x) for x in w):
            raise CKKSError(f"weights must be finite, got {w}")
        if self.info.depth < 1:
            raise CKKSError(self._no_depth_message())
        vecs = self._load_lists(lists)
        out: list[bytes] = []
        for j in range(len(vecs[0])):
            try:
                acc = vecs[0][j] * w[0]
                for client, wi in zip(vecs[1:], w[1:], strict=True):
                    acc += client[j] * wi
            except ValueError as exc:
                if "scale out of bounds" in str(exc):
                    raise CKKSError(self._no_depth_message() + f" (TenSEAL: {exc})") from exc
                raise
            out.append(acc.serialize())
        return out

    def _no_depth_message(self) -> str:
        return (
            "weighted_sum multiplies ciphertexts by plaintext scalars, which consumes one level of "
            f"the modulus chain, and these ciphertexts have none left (data modulus levels "
            f"{list(self.info.level_bits)} bits; TenSEAL would raise 'scale out of bounds'). "
            "Each scalar multiplication needs a longer modulus chain, one more inner prime (the 'fedshield' "
            "set [60, 40, 40, 60] allows two) - or pre-weight on the client side and use add()"
        )

    def decrypt(self, *args: Any, **kwargs: Any) -> NoReturn:
        """Always raises: the server holds no secret key.

        Raises:
            PermissionError: always.
        """
        raise PermissionError(
            "the server holds no secret key (public context only) and cannot decrypt; only "
            "clients holding the secret context can"
        )


# --------------------------------------------------------------------------------------------
# Packing
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PackingLayout:
    """Dense packing of named 1-D segments into ciphertext slots.

    Segments are concatenated in order into one flat vector that spans ciphertext boundaries
    (no padding between segments). The layout is built from public information only (names,
    lengths, slot count), so every client and the server derive the same one, and the
    ciphertexts of different clients add slot-wise.

    Attributes:
        segments: ``(name, length)`` pairs, in packing order.
        slots: values per ciphertext.
        offsets: start of each segment in the flat vector (same order as ``segments``).
    """

    segments: tuple[tuple[str, int], ...]
    slots: int
    offsets: tuple[int, ...] = field(default=(), repr=False)

    @classmethod
    def build(cls, segments: Sequence[tuple[str, int]], slots: int) -> PackingLayout:
        """Validate the segments and compute offsets.

        Args:
            segments: ``(name, length)`` pairs; names unique, lengths >= 0.
            slots: values per ciphertext (``ClientCrypto.slots``, ``CKKSParams.slots``).

        Returns:
            The layout.

        Raises:
            CKKSError: duplicate / empty names, negative lengths or non-positive slots.
        """
        if int(slots) <= 0:
            raise CKKSError(f"slots must be positive, got {slots}")
        segs: list[tuple[str, int]] = []
        seen: set[str] = set()
        for item in segments:
            name, length = item
            if not isinstance(name, str) or not name:
                raise CKKSError(f"segment names must be non-empty strings, got {name!r}")
            if name in seen:
                raise CKKSError(f"duplicate segment name {name!r}")
            if int(length) != length or int(length) < 0:
                raise CKKSError(f"segment {name!r} has invalid length {length!r}")
            seen.add(name)
            segs.append((name, int(length)))
        offsets = tuple(int(o) for o in np.cumsum([0] + [n for _, n in segs[:-1]])) if segs else ()
        return cls(segments=tuple(segs), slots=int(slots), offsets=offsets)

    @property
    def total(self) -> int:
        """Total number of values (length of the flat vector)."""
        return sum(n for _, n in self.segments)

    @property
    def num_ciphertexts(self) -> int:
        """``ceil(total / slots)``."""
        return -(-self.total // self.slots)

    @property
    def fill_ratio(self) -> float:
        """Used slots / available slots over all ciphertexts (0.0 for an empty layout)."""
        n = self.num_ciphertexts
        return self.total / (n * self.slots) if n else 0.0

    def slice_of(self, name: str) -> slice:
        """The slice of the flat vector that holds segment ``name``."""
        for (seg, length), off in zip(self.segments, self.offsets, strict=True):
            if seg == name:
                return slice(off, off + length)
        raise CKKSError(f"no segment named {name!r} in this layout")

    def pack(self, arrays: Mapping[str, Any]) -> np.ndarray:
        """Concatenate the segments into the flat float64 vector.

        Args:
            arrays: name -> 1-D array, exactly the layout's segment names.

        Returns:
            The flat vector of length :attr:`total`.

        Raises:
            CKKSError: missing / unexpected names, non-1-D arrays or wrong lengths.
        """
        names = [n for n, _ in self.segments]
        missing = [n for n in names if n not in arrays]
        extra = [n for n in arrays if n not in set(names)]
        if missing or extra:
            raise CKKSError(f"pack: missing segments {missing}, unexpected segments {extra}")
        flat = np.empty(self.total, dtype=np.float64)
        for (name, length), off in zip(self.segments, self.offsets, strict=True):
            a = np.asarray(arrays[name], dtype=np.float64)
            if a.ndim != 1:
                raise CKKSError(f"segment {name!r} must be 1-D, got shape {a.shape}: ravel() it")
            if a.size != length:
                raise CKKSError(
                    f"segment {name!r} has length {a.size}, the layout expects length {length}"
                )
            flat[off : off + length] = a
        return flat

    def unpack(self, flat: Any) -> dict[str, np.ndarray]:
        """Split a flat vector back into named segments (copies).

        Args:
            flat: 1-D array of length :attr:`total`.

        Returns:
            name -> float64 1-D array.

        Raises:
            CKKSError: wrong length or shape.
        """
        x = np.asarray(flat, dtype=np.float64)
        if x.ndim != 1 or x.size != self.total:
            raise CKKSError(
                f"unpack: flat vector has shape {x.shape}, the layout expects length {self.total}"
            )
        return {
            name: x[off : off + length].copy()
            for (name, length), off in zip(self.segments, self.offsets, strict=True)
        }


# --------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------


def ciphertext_bytes(params: CKKSParams | str) -> int:
    """Serialized size of one full fresh ciphertext (all slots used) under ``params``.

    Generates a throw-away key. Sizes vary by a few bytes between keys (zstd compression).

    Args:
        params: a :class:`CKKSParams` or the name of a named set.

    Returns:
        Bytes of ``CKKSVector.serialize()`` for ``slots`` random values.
    """
    p = replace(get_params(params), galois=False)
    client = KeyHolder.generate(p).client()
    x = np.random.default_rng(0).normal(0.0, 0.02, p.slots)
    return len(client.encrypt(x)[0])


def _lora_like(rng: np.random.Generator, n: int) -> np.ndarray:
    x = rng.normal(0.0, 0.02, n)
    k = max(1, n // 100)
    idx = rng.choice(n, size=k, replace=False)
    x[idx] = rng.uniform(-1.0, 1.0, k)
    return x


def measure_precision(
    params: CKKSParams | str, *, n_values: int = 4096, n_summands: int = 32, seed: int = 0
) -> dict[str, Any]:
    """Encrypt ``n_summands`` LoRA-like vectors, add them homomorphically, compare with numpy.

    Values are ``N(0, 0.02)`` with 1% of them replaced by ``U(-1, 1)`` (LoRA factors plus a
    few outliers). Uses the bytes API end to end: client encrypt -> server add -> client decrypt.
    Galois keys are not generated (they do not change ciphertexts or precision).

    Args:
        params: a :class:`CKKSParams` or the name of a named set.
        n_values: length of each vector.
        n_summands: number of vectors (clients) summed.
        seed: seed of the plaintext values (the keys are never seeded, see
            :meth:`KeyHolder.generate`).

    Returns:
        dict with ``params``, ``n_values``, ``n_summands``, ``slots``, ``num_ciphertexts``,
        ``max_abs_error``, ``max_rel_error`` (max abs error / max |exact sum|),
        ``ciphertext_bytes`` (one full ciphertext), ``bytes_per_value`` (that / slots),
        ``encrypt_values_per_s`` (encrypt + serialize), ``add_values_per_s`` (one
        ciphertext-ciphertext addition, per value, including deserialization) and
        ``decrypt_values_per_s``.
    """
    p = replace(get_params(params), galois=False)
    holder = KeyHolder.generate(p)
    client, server = holder.client(), holder.server()
    rng = np.random.default_rng(seed)
    xs = [_lora_like(rng, n_values) for _ in range(n_summands)]

    t0 = time.perf_counter()
    enc = [client.encrypt(x) for x in xs]
    t_enc = time.perf_counter() - t0
    t0 = time.perf_counter()
    summed = server.add(enc)
    t_add = time.perf_counter() - t0
    t0 = time.perf_counter()
    got = client.decrypt(summed, n_values)
    t_dec = time.perf_counter() - t0

    exact = np.sum(xs, axis=0)
    err = float(np.max(np.abs(got - exact)))
    full = len(client.encrypt(rng.normal(0.0, 0.02, p.slots))[0])
    return {
        "params": p.name,
        "n_values": n_values,
        "n_summands": n_summands,
        "slots": p.slots,
        "num_ciphertexts": client.num_ciphertexts(n_values),
        "max_abs_error": err,
        "max_rel_error": err / float(np.max(np.abs(exact))),
        "ciphertext_bytes": full,
        "bytes_per_value": full / p.slots,
        "encrypt_values_per_s": n_summands * n_values / t_enc,
        "add_values_per_s": (n_summands - 1) * n_values / t_add if n_summands > 1 else float("nan"),
        "decrypt_values_per_s": n_values / t_dec,
    }
