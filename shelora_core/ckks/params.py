"""CKKS parameter sets and the checks that make them secure (128-bit) and usable.

CKKS (Cheon, Kim, Kim and Song, "Homomorphic Encryption for Arithmetic of Approximate Numbers",
ASIACRYPT 2017) encrypts a vector of real numbers into one ciphertext: a pair of polynomials of
degree ``N`` (``poly_modulus_degree``) whose coefficients live modulo ``Q``, a product of primes
(the *modulus chain*, ``coeff_mod_bit_sizes``). One ciphertext holds ``N / 2`` numbers ("slots").

Notes
-----
A real value ``x`` is stored as the integer ``round(x * 2**scale_bits)``, so CKKS is *approximate*:
every result carries a small error (about ``2**-scale_bits`` times the encryption noise). Anyone
holding the *public* key can encrypt, add ciphertexts slot-wise and multiply them by plaintext
numbers; only the *secret* key decrypts. Each multiplication doubles the scale and is followed by
a *rescale* that drops one prime from the chain, so the number of inner primes is the
multiplicative depth; a chain with no inner prime (``[60, 49]``) supports additions only. The
last prime is the "special" prime used for key switching (relinearisation and rotations, which
need relinearisation / Galois keys). Security depends on ``N`` and the total bit size of ``Q``:
bigger ``Q`` for the same ``N`` is *less* secure (see :func:`check_security`).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, replace

from .errors import CKKSError

__all__ = [
    "MAX_COEFF_BITS_128",
    "PARAM_SETS",
    "CKKSParams",
    "check_security",
    "get_params",
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
        galois_steps: with ``galois``, the rotation steps to generate keys for (SEAL's
            ``KeyGenerator.create_galois_keys(steps)``); empty: SEAL's default set (every
            power-of-two step in both directions and the conjugation, 25 keys at ``N = 8192``).
            A rotation by a step without its own key is composed from power-of-two steps (SEAL
            decomposes it into its non-adjacent form), so ``galois_steps`` holding
            ``+-2**k`` allows every rotation.
    """

    name: str
    poly_modulus_degree: int
    coeff_mod_bit_sizes: tuple[int, ...]
    global_scale_bits: int
    galois: bool = False
    description: str = ""
    relin_keys: bool = False
    galois_steps: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "coeff_mod_bit_sizes", tuple(int(b) for b in self.coeff_mod_bit_sizes)
        )
        object.__setattr__(self, "galois_steps", tuple(int(k) for k in self.galois_steps))
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
    "packed": CKKSParams(
        name="packed",
        poly_modulus_degree=8192,
        coeff_mod_bit_sizes=(60, 40, 40, 60),
        global_scale_bits=40,
        galois=True,
        galois_steps=tuple(
            sorted({s * 2**k for k in range(12) for s in (1, -1)} - {-2048}, key=abs)
        ),
        description=(
            "SHE-LoRA packed mode: N=8192, [60,40,40,60], scale 2^40, depth 2 (a mask, then "
            "the diagonal products), Galois keys for the rotation steps +-2^k only (23 keys, "
            "every rotation composes from them); a layout's exact steps: "
            "methods.packing.PackedLayout.galois_steps with KeyHolder.generate(galois_steps=)."
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
    bad_steps = [k for k in p.galois_steps if k == 0 or abs(k) >= p.slots]
    if bad_steps:
        raise CKKSError(
            f"{p.name}: Galois key steps {bad_steps[:5]} are not rotations: a step must be "
            f"non-zero and below the {p.slots} slots in absolute value (a rotation by k and by "
            f"k - {p.slots} is the same one)"
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
