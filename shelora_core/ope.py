"""Keyed order-preserving encryption (OPE) of column indices and sensitivity scores (client side).

SHE-LoRA (Liu et al., "SHE-LoRA: Selective Homomorphic Encryption for Federated Tuning with
Heterogeneous LoRA", ICLR 2026), step 2 of the protocol: before the negotiation each client
encrypts its proposal (the indices of its top-k_i LoRA A-matrix columns and their sensitivity
scores) with a *keyed, deterministic* order-preserving scheme, so the server can rank and compare
them (:mod:`shelora_core.negotiation`) without learning which columns or scores were proposed.

The scheme is Boldyreva, Chenette, Lee and O'Neill, "Order-Preserving Symmetric Encryption",
EUROCRYPT 2009, as implemented by `pyope <https://github.com/tonyo/pyope>`_ 0.2.2 (the authors'
keyless toy is not used). Properties the protocol relies on:

* deterministic: the same key encrypts the same index to the same integer for every client, so
  the server can count how many clients proposed a column;
* order-preserving: ``x < y  <=>  Enc(x) < Enc(y)``, so max / min / sorting of ciphertexts are
  meaningful to the server (sums are not);
* the key is held by the clients only (docs/design.md, "Roles"); the server never imports this module.

What OPE leaks is measured, not assumed: :func:`leakage` estimates the plaintext indices from the
ciphertexts alone with the "OPE is linear on average" estimator. Boldyreva et al. (and their
follow-up, CRYPTO 2011) show an ideal OPE leaks roughly the upper half of the plaintext bits: the
ciphertext of index j deviates from the linear guess by about sqrt(j) columns, whatever
``max_index`` is. Measured on this machine for a 576-column layer (16 keys, all 576 indices):
mean absolute error ~10 columns with ``max_index = 2**16 - 1`` (~8 with ``max_index = 575``),
exact hits ~3-5%, against ~192 columns for a random guess. So the server localises every proposed
column to within a few percent of the layer width, and always learns their order (Spearman 1);
it does not learn the exact index in most cases. Say so where the protocol is presented.

Domain separation: indices and scores use two pyope instances with different input/output ranges
*and different subkeys* (HMAC-SHA256 of the shared key with a label), because pyope derives its
coins from the key and the split point only, so two instances under one key would reuse coins.

Scores are log-quantized before encryption (see :func:`quantize_score`): non-negative floats up
to ``SCORE_MAX = 2**40`` (about 1.1e12) map to ``score_bits``-bit integers with a relative
resolution of about 1e-8 at 32 bits, from ``SCORE_FLOOR = 2**-24`` (about 6e-8) upwards, and an
absolute resolution of about 6e-16 below it.
"""

from __future__ import annotations

import hashlib
import hmac
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pyope.errors import InvalidCiphertextError, OutOfRangeError
from pyope.ope import OPE, ValueRange

__all__ = [
    "INDEX_OUT_BITS",
    "SCORE_FLOOR",
    "SCORE_MAX",
    "ColumnOPE",
    "OPEKey",
    "dequantize_score",
    "leakage",
    "quantize_score",
]

INDEX_OUT_BITS = 40
"""Index ciphertexts live in ``[0, 2**40 - 1]``."""
SCORE_OUT_EXTRA_BITS = 16
"""Score ciphertexts live in ``[0, 2**(score_bits + 16) - 1]`` (2**48 at the default 32 bits)."""
SCORE_FLOOR = 2.0**-24
"""Scale of the log-quantizer: below it quantization is linear, above it logarithmic."""
SCORE_MAX = 2.0**40
"""Largest score that can be quantized (about 1.1e12); larger scores raise ``ValueError``."""
_OCTAVES = math.log2(1.0 + SCORE_MAX / SCORE_FLOOR)  # = 64.0
_MIN_KEY_BYTES = 16


# --------------------------------------------------------------------------------------------
# Key
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True, repr=False)
class OPEKey:
    """The OPE key shared by the clients (never by the server).

    Attributes:
        secret: the key bytes handed to pyope (pyope's own keys are 44 base64 characters of
            32 random bytes). Use :meth:`generate` for a fresh key.
    """

    secret: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.secret, bytes):
            raise TypeError(f"OPE key must be bytes, got {type(self.secret).__name__}")
        if len(self.secret) < _MIN_KEY_BYTES:
            raise ValueError(
                f"OPE key of {len(self.secret)} bytes is too short: use at least "
                f"{_MIN_KEY_BYTES} bytes, e.g. OPEKey.generate()"
            )

    @classmethod
    def generate(cls) -> OPEKey:
        """A fresh random key from ``pyope.ope.OPE.generate_key()`` (``os.urandom``)."""
        return cls(OPE.generate_key())

    def to_bytes(self) -> bytes:
        """The key bytes, to be shared among clients over a channel the server cannot read."""
        return self.secret

    @classmethod
    def from_bytes(cls, data: bytes) -> OPEKey:
        """Rebuild a key from :meth:`to_bytes` output."""
        return cls(bytes(data))

    def subkey(self, label: str) -> bytes:
        """A key for one purpose (``HMAC-SHA256(secret, label)``), base64-free raw bytes."""
        return hmac.new(self.secret, b"shelora/ope/" + label.encode(), hashlib.sha256).digest()

    def fingerprint(self) -> str:
        """A short hash that lets clients check they hold the same key without showing it."""
        return hashlib.sha256(b"shelora/ope/fingerprint/" + self.secret).hexdigest()[:16]

    def __repr__(self) -> str:
        return f"OPEKey(fingerprint={self.fingerprint()!r})"


# --------------------------------------------------------------------------------------------
# Score quantization
# --------------------------------------------------------------------------------------------
def _steps_per_octave(score_bits: int) -> float:
    return (2**score_bits - 1) / _OCTAVES


def quantize_score(score: float, *, score_bits: int = 32) -> int:
    """Log-quantize a non-negative score to an integer in ``[0, 2**score_bits - 1]``.

    ``q(s) = round(T * log2(1 + s / SCORE_FLOOR))`` with ``T = (2**score_bits - 1) / 64`` steps
    per doubling (64 = log2(1 + SCORE_MAX / SCORE_FLOOR)), so ``q(0) = 0`` and
    ``q(SCORE_MAX) = 2**score_bits - 1``. At 32 bits, ``T = 2**26``: two scores above
    ``SCORE_FLOOR`` whose ratio exceeds ``1 + 1.03e-8`` get different integers. ``q`` is
    non-decreasing (strictly increasing beyond that resolution), so OPE of ``q`` preserves the
    order of the scores. Wanda-style scores (sum_k |A_kj| * ||X_j||) span many orders of magnitude,
    which is why a log scale is used instead of a fixed-point one.

    Args:
        score: a finite score in ``[0, SCORE_MAX]``.
        score_bits: integer width of the quantized score.

    Returns:
        The quantized score.

    Raises:
        ValueError: for a negative, non-finite or too large score.
    """
    s = float(score)
    if not math.isfinite(s) or s < 0.0:
        raise ValueError(f"scores must be finite and non-negative, got {score!r}")
    if s > SCORE_MAX:
        raise ValueError(
            f"score {s:.6g} exceeds SCORE_MAX = {SCORE_MAX:.6g}: rescale the scores (their order "
            "is all that matters) before encrypting"
        )
    q = round(_steps_per_octave(score_bits) * math.log1p(s / SCORE_FLOOR) / math.log(2.0))
    return min(max(int(q), 0), 2**score_bits - 1)


def dequantize_score(q: int, *, score_bits: int = 32) -> float:
    """Approximate inverse of :func:`quantize_score` (relative error <= ~5e-9 at 32 bits)."""
    if not 0 <= q <= 2**score_bits - 1:
        raise ValueError(f"quantized score {q} outside [0, 2**{score_bits} - 1]")
    return SCORE_FLOOR * math.expm1(q / _steps_per_octave(score_bits) * math.log(2.0))


# --------------------------------------------------------------------------------------------
# Column OPE
# --------------------------------------------------------------------------------------------
class ColumnOPE:
    """Deterministic keyed OPE of column indices and quantized scores (one per client process).

    Args:
        key: the clients' shared :class:`OPEKey`.
        max_index: largest encryptable column index. Keep it the same for every client and
            layer (equal indices must give equal ciphertexts) and at least the largest layer
            width minus one. The default ``2**16 - 1`` serves every layer of the shipped models
            with one domain; it leaks slightly less than ``max_index = width - 1`` (MAE ~10 vs
            ~8 columns at width 576, see :func:`leakage`), not dramatically less.
        score_bits: width of the quantized scores (see :func:`quantize_score`).
        index_out_bits: index ciphertexts lie in ``[0, 2**index_out_bits - 1]``.
        score_out_bits: score ciphertexts lie in ``[0, 2**score_out_bits - 1]``; defaults to
            ``score_bits + 16``.

    Index encryptions are cached (a layer has at most ``n`` columns and pyope costs ~1.5 ms per
    call on this machine; a score ~2.5 ms). The index ciphertext of column ``j`` does not depend
    on the layer.
    """

    def __init__(
        self,
        key: OPEKey,
        *,
        max_index: int = 2**16 - 1,
        score_bits: int = 32,
        index_out_bits: int = INDEX_OUT_BITS,
        score_out_bits: int | None = None,
    ) -> None:
        if not isinstance(key, OPEKey):
            raise TypeError(f"key must be an OPEKey, got {type(key).__name__}")
        if score_out_bits is None:
            score_out_bits = score_bits + SCORE_OUT_EXTRA_BITS
        if max_index < 1 or max_index + 1 > 2**index_out_bits:
            raise ValueError(
                f"max_index={max_index} must be >= 1 and fit in index_out_bits={index_out_bits}"
            )
        if not 8 <= score_bits <= score_out_bits:
            raise ValueError(f"need 8 <= score_bits ({score_bits}) <= score_out_bits")
        self.max_index = int(max_index)
        self.score_bits = int(score_bits)
        self.index_out_bits = int(index_out_bits)
        self.score_out_bits = int(score_out_bits)
        self._index_ope = OPE(
            key.subkey("index"),
            in_range=ValueRange(0, self.max_index),
            out_range=ValueRange(0, 2**self.index_out_bits - 1),
        )
        self._score_ope = OPE(
            key.subkey("score"),
            in_range=ValueRange(0, 2**self.score_bits - 1),
            out_range=ValueRange(0, 2**self.score_out_bits - 1),
        )
        self._index_enc: dict[int, int] = {}
        self._index_dec: dict[int, int] = {}
        self._score_enc: dict[int, int] = {}

    @property
    def index_out_range_size(self) -> int:
        """Number of possible index ciphertexts (``2**index_out_bits``)."""
        return 2**self.index_out_bits

    # ---- indices -------------------------------------------------------------------------
    def encrypt_index(self, j: int) -> int:
        """OPE ciphertext of column index ``j`` (cached)."""
        j = _as_int(j, "column index")
        if not 0 <= j <= self.max_index:
            raise ValueError(f"column index {j} outside [0, max_index={self.max_index}]")
        c = self._index_enc.get(j)
        if c is None:
            c = int(self._index_ope.encrypt(j))
            self._index_enc[j] = c
            self._index_dec[c] = j
        return c

    def decrypt_index(self, c: int) -> int:
        """Column index of an index ciphertext.

        Raises:
            ValueError: if ``c`` is not a ciphertext of this key (e.g. another key's or a score).
        """
        c = _as_int(c, "index ciphertext")
        j = self._index_dec.get(c)
        if j is not None:
            return j
        try:
            j = int(self._index_ope.decrypt(c))
        except (InvalidCiphertextError, OutOfRangeError) as err:
            raise ValueError(
                f"{c} is not an index ciphertext under this OPE key (wrong key, or a score "
                "ciphertext?)"
            ) from err
        self._index_enc[j] = c
        self._index_dec[c] = j
        return j

    def encrypt_indices(self, indices: Sequence[int]) -> list[int]:
        """Index ciphertexts, in the given order."""
        return [self.encrypt_index(j) for j in indices]

    def decrypt_indices(self, ciphertexts: Sequence[int]) -> list[int]:
        """Column indices, in the given order."""
        return [self.decrypt_index(c) for c in ciphertexts]

    # ---- scores --------------------------------------------------------------------------
    def quantize(self, score: float) -> int:
        """Log-quantized score (see :func:`quantize_score`)."""
        return quantize_score(score, score_bits=self.score_bits)

    def dequantize(self, q: int) -> float:
        """Approximate inverse of :meth:`quantize`."""
        return dequantize_score(q, score_bits=self.score_bits)

    def encrypt_score(self, score: float) -> int:
        """OPE ciphertext of the quantized score (cached by quantized value)."""
        q = self.quantize(score)
        c = self._score_enc.get(q)
        if c is None:
            c = int(self._score_ope.encrypt(q))
            self._score_enc[q] = c
        return c

    def decrypt_score(self, c: int) -> float:
        """Approximate score of a score ciphertext (exact up to the quantization)."""
        c = _as_int(c, "score ciphertext")
        try:
            q = int(self._score_ope.decrypt(c))
        except (InvalidCiphertextError, OutOfRangeError) as err:
            raise ValueError(f"{c} is not a score ciphertext under this OPE key") from err
        return self.dequantize(q)

    # ---- proposals -----------------------------------------------------------------------
    def encrypt_proposal(
        self, indices: Sequence[int], scores: Sequence[float]
    ) -> list[tuple[int, int]]:
        """``[(Enc(index), Enc(score)), ...]`` in proposal order (most sensitive first).

        Raises:
            ValueError: if the lengths differ or an index repeats.
        """
        if len(indices) != len(scores):
            raise ValueError(f"{len(indices)} indices but {len(scores)} scores")
        idx = [_as_int(j, "column index") for j in indices]
        if len(set(idx)) != len(idx):
            raise ValueError(f"a proposal lists distinct columns; got repeats in {idx}")
        return [
            (self.encrypt_index(j), self.encrypt_score(s)) for j, s in zip(idx, scores, strict=True)
        ]

    def propose(self, scores: Sequence[float] | np.ndarray, k: int) -> list[tuple[int, int]]:
        """Encrypted top-``k`` proposal from one layer's per-column scores.

        Columns are ranked by decreasing score, ties by increasing index, and the pairs come in
        that order, so score ciphertexts are non-increasing (the negotiation checks it).
        """
        s = np.asarray(scores, dtype=np.float64).ravel()
        if not 0 <= k <= s.size:
            raise ValueError(f"budget k={k} outside [0, {s.size}] (the layer width)")
        order = np.lexsort((np.arange(s.size), -s))[:k]
        return self.encrypt_proposal([int(j) for j in order], [float(s[j]) for j in order])


def _as_int(x: Any, what: str) -> int:
    try:
        return int(x.__index__())
    except (AttributeError, TypeError):
        raise TypeError(f"{what} must be an integer, got {x!r}") from None


# --------------------------------------------------------------------------------------------
# Leakage
# --------------------------------------------------------------------------------------------
def _average_ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="stable")
    ranks = np.empty(x.size, dtype=np.float64)
    ranks[order] = np.arange(x.size, dtype=np.float64)
    for v in np.unique(x):  # average ranks over ties
        m = x == v
        if m.sum() > 1:
            ranks[m] = ranks[m].mean()
    return ranks


def leakage(
    n: int,
    ciphertexts: Sequence[int],
    true_indices: Sequence[int],
    *,
    max_index: int,
    out_bits: int = INDEX_OUT_BITS,
) -> dict[str, Any]:
    """How well the server recovers column indices from their OPE ciphertexts alone.

    The estimator is the natural one for an OPE that is linear on average:
    ``index_hat = round(c / 2**out_bits * (max_index + 1))``, clipped to ``[0, n - 1]`` because
    the layer width ``n`` is public.

    Args:
        n: layer width (public).
        ciphertexts: index ciphertexts seen by the server.
        true_indices: the plaintext column indices (known to the experimenter only).
        max_index: the ``max_index`` the clients' :class:`ColumnOPE` used.
        out_bits: the ``index_out_bits`` they used.

    Returns:
        A dict with ``n``, ``count``, ``max_index``, ``estimates`` (list of int),
        ``mae`` (mean absolute error of ``index_hat``, in columns), ``max_abs_error``,
        ``exact_hit_rate`` (fraction with ``index_hat == index``), ``within_1pct_rate``
        (fraction within ``n / 100`` columns), ``mae_random_guess`` (the MAE of guessing a
        uniform column in ``[0, n - 1]``, averaged over the true indices: the no-leakage
        baseline), ``relative_mae`` (``mae / mae_random_guess``: 0 = full leakage, about 1 = none)
        and ``spearman`` (rank correlation of ciphertexts and indices: 1 by construction, the
        order is always revealed; NaN for fewer than 2 values).
    """
    c = np.asarray([int(x) for x in ciphertexts], dtype=object)
    j = np.asarray([int(x) for x in true_indices], dtype=np.int64)
    if c.size != j.size:
        raise ValueError(f"{c.size} ciphertexts but {j.size} true indices")
    if n < 1:
        raise ValueError(f"layer width n must be >= 1, got {n}")
    out_size = 2**out_bits
    est = np.asarray(
        [min(max(round(int(x) * (max_index + 1) / out_size), 0), n - 1) for x in c],
        dtype=np.int64,
    )
    err = np.abs(est - j)
    grid = np.arange(n, dtype=np.float64)
    guess = float(np.mean([np.abs(grid - t).mean() for t in j])) if j.size else float("nan")
    mae = float(err.mean()) if j.size else float("nan")
    if j.size >= 2:
        rc = _average_ranks(np.asarray([float(x) for x in c]))
        rj = _average_ranks(j.astype(np.float64))
        sc, sj = rc - rc.mean(), rj - rj.mean()
        den = math.sqrt(float((sc**2).sum() * (sj**2).sum()))
        spearman = float((sc * sj).sum() / den) if den > 0 else float("nan")
    else:
        spearman = float("nan")
    return {
        "n": int(n),
        "count": int(j.size),
        "max_index": int(max_index),
        "estimates": [int(e) for e in est],
        "mae": mae,
        "max_abs_error": int(err.max()) if j.size else 0,
        "exact_hit_rate": float((err == 0).mean()) if j.size else float("nan"),
        "within_1pct_rate": float((err <= n / 100).mean()) if j.size else float("nan"),
        "mae_random_guess": guess,
        "relative_mae": mae / guess if j.size and guess > 0 else float("nan"),
        "spearman": spearman,
    }
