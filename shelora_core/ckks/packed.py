"""Packed plaintext-matrix x encrypted-vector products on the server (SEAL through ``sealapi``).

SHE-LoRA's ``packed`` cipher mode (:mod:`shelora_core.methods.shelora`) has every client send
its protected columns of ``A`` densely packed, ``r`` values each, and the server compute
``M a`` for a plaintext ``h x r`` matrix ``M`` (a slice of ``p_i s_i B_i``) and each encrypted
``a``, many at once. The slots of one *output* ciphertext hold ``nb`` blocks *interleaved*:
value ``u`` of block ``b`` sits in slot ``u * nb + b``. For one client's contribution:

1. **Extract**: the client put the ``r * nb`` values of this output's blocks at slots
   ``offset .. offset + r * nb`` of one input ciphertext, interleaved the same way (its
   entry ``u`` of block ``b`` at ``offset + u * nb + b``). Multiply by a 0/1 mask of that range
   (one level), rotate by ``offset`` to slot 0.
2. **Replicate**: add copies shifted by ``r * nb`` until ``copies = ceil((h + r - 1) / r)``
   periods are there (binary method: ``<= 2 log2(copies)`` rotations), so that slot
   ``t * nb + b`` holds ``a_b[t mod r]`` for every ``t < h + r - 1``. Steps 1 and 2 rotate
   before the mask's rescale, and the giant steps of 3 before the products' rescale: while
   the scale is ``2**80`` rather than ``2**40``, a rotation's key-switching noise is ``2**-40``
   as large relative to the values (measured: max abs error 2.5e-8 instead of 1.5e-6).
3. **Diagonal products** (Halevi-Shoup, periodic): ``out = sum_{d<r} D_d * rot(X, d nb)`` with
   ``D_d[u nb + b] = M_b[u, (u + d) mod r]``, so ``out[u nb + b] = (M_b a_b)[u``]. Baby-step
   giant-step: with ``d = g q + e``, ``D_d * rot(X, d nb) = rot(rot(D_d, -g q nb) * rot(X, e nb),
   g q nb)``: ``g - 1`` baby rotations per client, the giant rotations once per output for all
   clients (their products are added first), one level.

The products of all clients land in the same slots (the layout, with its common block width,
is public: :class:`~shelora_core.methods.packing.PackedLayout`) and add slot-wise. Every
plaintext is encoded at the scale of the prime the next rescale divides by, so each rescale
restores the scale ``2**global_scale_bits`` exactly and sums of different clients' products
line up. Two levels in all: the ``[60, 40, 40, 60]`` chain of the ``packed`` parameter set.

Rotations use the public context's Galois keys; a step without its own key is composed by SEAL
from power-of-two steps (its non-adjacent form, :func:`naf`). :meth:`PackedEvaluator.check_steps`
refuses, before any work, a key set that cannot make a step the layout needs.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import numpy as np
import tenseal.sealapi as sealapi

from .errors import CKKSError
from .seeded import _tenseal_vector_proto

__all__ = [
    "BlockInput",
    "PackedEvaluator",
    "naf",
    "normalize_step",
    "replication_counts",
]


def naf(step: int) -> list[int]:
    """The non-adjacent form of ``step``: signed powers of two that sum to it, fewest possible.

    SEAL composes a rotation without its own Galois key from these steps.
    """
    out, k, n = [], 0, int(step)
    while n:
        if n & 1:
            digit = 2 - (n & 3)  # +1 or -1
            out.append(digit << k)
            n -= digit
        n >>= 1
        k += 1
    return out


def normalize_step(step: int, slots: int) -> int:
    """The representative of a rotation by ``step`` (mod ``slots``) that SEAL composes from the
    fewest power-of-two keys (ties: the smaller in absolute value); 0 for no rotation."""
    k = int(step) % slots
    if k == 0:
        return 0
    return min((k, k - slots), key=lambda s: (len(naf(s)), abs(s)))


def replication_counts(copies: int) -> list[tuple[int, bool]]:
    """The binary method's rotations: ``(count, doubling)`` per rotation, where the rotated
    ciphertext is moved by ``count`` periods (the accumulator when ``doubling``, else the
    single copy)."""
    if copies < 1:
        raise CKKSError(f"copies must be >= 1, got {copies}")
    out, count = [], 1
    for bit in bin(copies)[3:]:
        out.append((count, True))
        count *= 2
        if bit == "1":
            out.append((count, False))
            count += 1
    return out


class BlockInput(NamedTuple):
    """One client's contribution to one output ciphertext.

    Attributes:
        ciphertext: the input ciphertext (a SEAL ``Ciphertext`` at the top level, from
            :meth:`PackedEvaluator.load`).
        offset: first slot of the client's ``rank * blocks`` values for this output.
        rank: ``r``, the length of each encrypted vector.
        matrices: per block of the output, the plaintext ``rows x r`` matrix, or ``None``
            where the client contributes nothing (its values there are zeros).
    """

    ciphertext: Any
    offset: int
    rank: int
    matrices: Sequence[np.ndarray | None]


class PackedEvaluator:
    """The server's SEAL-level evaluator over a public context (no secret key).

    Args:
        crypto: the server's :class:`~shelora_core.ckks.ServerCrypto`.
    """

    def __init__(self, crypto: Any) -> None:
        ctx = crypto.context
        if ctx.is_private():
            raise CKKSError("the packed evaluator runs on the server's public context only")
        self.crypto = crypto
        self.slots = int(crypto.slots)
        self.scale = float(ctx.global_scale)
        self._seal = ctx.seal_context().data
        self._evaluator = sealapi.Evaluator(self._seal)
        self._encoder = sealapi.CKKSEncoder(self._seal)
        self._keys = ctx.galois_keys().data if ctx.has_galois_keys() else None
        self._galois = self._seal.key_context_data().galois_tool()

    # ---------------------------------------------------------------- keys
    def has_key(self, step: int) -> bool:
        """Whether the public context holds a Galois key for exactly this rotation."""
        if self._keys is None:
            return False
        return bool(self._keys.has_key(self._galois.get_elt_from_step(int(step))))

    def missing_steps(self, steps: Iterable[int]) -> list[int]:
        """The steps that neither have a key nor compose from keys (power-of-two steps)."""
        out = []
        for step in sorted({normalize_step(s, self.slots) for s in steps} - {0}):
            if not self.has_key(step) and not all(self.has_key(c) for c in naf(step)):
                out.append(step)
        return out

    def check_steps(self, steps: Iterable[int]) -> None:
        """Refuse a public context whose Galois keys cannot make every rotation in ``steps``.

        Raises:
            CKKSError: naming the steps and the fix.
        """
        missing = self.missing_steps(steps)
        if missing:
            held = "no Galois keys" if self._keys is None else f"{self._keys.size()} Galois keys"
            raise CKKSError(
                f"the server's public context holds {held}, which cannot make the rotations by "
                f"{missing[:8]}{'...' if len(missing) > 8 else ''} that the packed layout needs "
                f"(nor compose them from power-of-two steps): generate the keys with the "
                "'packed' parameter set, or with KeyHolder.generate(..., "
                "galois_steps=layout.galois_steps(...))"
            )

    # ---------------------------------------------------------------- bytes
    def load(self, blob: bytes) -> Any:
        """A client's fresh ciphertext as a SEAL ``Ciphertext`` (TenSEAL bytes or seeded ones,
        under the round's key), which must be at the top level and the global scale.

        Raises:
            CKKSError: bytes that do not load (:meth:`ServerCrypto.load`), or a ciphertext at
                another level or scale than a fresh encryption (the products would be wrong).
        """
        vec = self.crypto.load(blob)
        ct = vec.ciphertext()[0]
        if ct.parms_id() != self._seal.first_parms_id() or ct.scale != self.scale:
            level = self._seal.get_context_data(ct.parms_id()).chain_index()
            raise CKKSError(
                f"a packed upload must be freshly encrypted (top level, scale "
                f"2^{math.log2(self.scale):g}); this one is at level {level} with scale "
                f"2^{math.log2(ct.scale):.3f}: encrypt with ClientCrypto.encrypt"
            )
        return ct

    def serialize(self, cts: Sequence[Any]) -> list[bytes]:
        """TenSEAL bytes of SEAL ciphertexts (every slot a value), which
        :meth:`ClientCrypto.decrypt <shelora_core.ckks.ClientCrypto.decrypt>` reads."""
        out = []
        try:
            with tempfile.TemporaryDirectory(prefix="shelora-packed-") as tmp:
                path = os.path.join(tmp, "ct")
                for ct in cts:
                    ct.save(path)  # SEAL's Python binding saves to a path only
                    with open(path, "rb") as f:
                        out.append(_tenseal_vector_proto(self.slots, f.read(), ct.scale))
        except OSError as exc:
            raise CKKSError(
                f"could not write a ciphertext to a temporary file ({exc}); point TMPDIR to a "
                "writable directory"
            ) from exc
        return out

    # ---------------------------------------------------------------- arithmetic
    def _last_prime(self, ct: Any) -> float:
        return float(self._seal.get_context_data(ct.parms_id()).parms().coeff_modulus()[-1].value())

    def _encode(self, values: np.ndarray, like: Any) -> Any:
        """``values`` at ``like``'s level, scaled by the prime its next rescale removes."""
        pt = sealapi.Plaintext()
        self._encoder.encode(values.tolist(), like.parms_id(), self._last_prime(like), pt)
        return pt

    def rotate(self, ct: Any, step: int) -> Any:
        """``ct`` rotated left by ``step`` slots (slot ``t`` gets slot ``t + step``)."""
        step = normalize_step(step, self.slots)
        if step == 0:
            return ct
        out = sealapi.Ciphertext()
        self._evaluator.rotate_vector(ct, step, self._keys, out)
        return out

    def _add(self, acc: Any, ct: Any) -> Any:
        if acc is None:
            return ct
        self._evaluator.add_inplace(acc, ct)
        return acc

    def _extract(self, ct: Any, offset: int, span: int) -> Any:
        """Slots ``offset .. offset + span`` of ``ct`` moved to slot 0, zeros elsewhere."""
        mask = np.zeros(self.slots)  # encoded per use: one encode against r for the diagonals
        mask[offset : offset + span] = 1.0
        out = sealapi.Ciphertext()
        self._evaluator.multiply_plain(ct, self._encode(mask, ct), out)
        return self.rotate(out, offset)

    def _replicate(self, x0: Any, period: int, copies: int) -> Any:
        acc = x0
        for count, doubling in replication_counts(copies):
            shifted = self.rotate(acc if doubling else x0, -count * period)
            total = sealapi.Ciphertext()  # a new one: x0 is added again later
            self._evaluator.add(acc, shifted, total)
            acc = total
        return acc

    @staticmethod
    def diagonals(matrices: Sequence[np.ndarray | None], rank: int, slots: int) -> np.ndarray:
        """``D`` (``rank x slots``): ``D[d, u nb + b] = M_b[u, (u + d) mod rank]``."""
        nb = len(matrices)
        out = np.zeros((rank, slots))
        d = np.arange(rank)
        for b, mat in enumerate(matrices):
            if mat is None:
                continue
            mat = np.asarray(mat, np.float64)
            u = np.arange(mat.shape[0])
            out[:, u * nb + b] = mat[u[None, :], (u[None, :] + d[:, None]) % rank]
        return out

    def block_products(
        self, inputs: Sequence[BlockInput], *, blocks: int, rows: int, baby: int
    ) -> Any:
        """``sum`` over ``inputs`` of the blocks' ``M_b a_b``, interleaved (module docstring).

        Args:
            inputs: the contributions (at least one).
            blocks: ``nb``, the blocks an output holds.
            rows: ``h``, the most rows of any block's matrix.
            baby: ``g``, the baby steps (a common choice for every client).

        Returns:
            The SEAL ciphertext (two levels below the inputs, at the global scale); value
            ``u`` of block ``b`` in slot ``u * blocks + b``.
        """
        if not inputs:
            raise CKKSError("block_products needs at least one contribution")
        inner: dict[int, Any] = {}
        for inp in inputs:
            r = int(inp.rank)
            if len(inp.matrices) != blocks:
                raise CKKSError(f"{len(inp.matrices)} matrices for {blocks} blocks")
            span = r * blocks
            copies = -(-(rows + r - 1) // r)
            x = self._replicate(self._extract(inp.ciphertext, inp.offset, span), span, copies)
            self._evaluator.rescale_to_next_inplace(x)
            diag = self.diagonals(inp.matrices, r, self.slots)
            babies = {0: x}
            for d in range(r):
                q, e = divmod(d, baby)
                if e not in babies:
                    babies[e] = self.rotate(x, e * blocks)
                pt = self._encode(np.roll(diag[d], q * baby * blocks), x)
                prod = sealapi.Ciphertext()
                self._evaluator.multiply_plain(babies[e], pt, prod)
                inner[q] = self._add(inner.get(q), prod)
        out = None
        for q in sorted(inner):  # giant steps before the rescale: their key-switching noise is
            out = self._add(out, self.rotate(inner[q], q * baby * blocks))  # 2^-40 as large
        self._evaluator.rescale_to_next_inplace(out)
        return out
