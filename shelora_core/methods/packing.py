"""How LoRA payloads are laid out in CKKS slots: the one packing module of the methods.

Every layout is built from public information only (layer names and shapes, ranks, budgets, the
slot count), so every client and the server derive the same one and ciphertexts of different
clients add slot-wise.

* :class:`FactorLayout`: the zero-padded factors, per layer (sorted) ``B`` as ``m x r_max`` then
  ``A`` as ``r_max x n``, row-major (MaskCrypt indexes its masks into it).
* :class:`ComponentLayout`: the factors component-major (component 0 of every layer, then
  component 1, ...), so a client of rank r fills a prefix and sends only the ciphertexts of its own
  rank (FedShield-LLM and full HE).
* :func:`delta_layout`: SHE-LoRA's position-major layout of the protected dW columns (position 0
  of G in every layer, then position 1, ...), so a client with a smaller budget sends a prefix.
* :func:`first_layers_layout`: the protected layers of ``shelora+first-layers`` (their dW, or B
  then A).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from ..ckks import PackingLayout
from .wire import SEP

__all__ = [
    "ENCRYPT_MODES",
    "ComponentLayout",
    "FactorLayout",
    "delta_layout",
    "first_layers_layout",
]

#: what the protected layers encrypt: the weighted update (exact FlexLoRA aggregate) or the factors
ENCRYPT_MODES: tuple[str, ...] = ("dw", "factors")


def first_layers_layout(
    shapes: Mapping[str, tuple[int, int]], slots: int, *, encrypt: str = "dw", rank: int = 0
) -> PackingLayout:
    """Dense packing of the protected layers: per layer (sorted) ``dW`` (m x n), or ``B`` then ``A``."""
    if encrypt not in ENCRYPT_MODES:
        raise ValueError(f"unknown encrypt mode {encrypt!r}; choose one of {list(ENCRYPT_MODES)}")
    segs: list[tuple[str, int]] = []
    for layer, (m, n) in sorted(shapes.items()):
        if encrypt == "dw":
            segs.append((f"{layer}{SEP}dW", m * n))
        else:
            segs += [(f"{layer}{SEP}B", m * rank), (f"{layer}{SEP}A", rank * n)]
    return PackingLayout.build(segs, slots)


def delta_layout(layer_rows: Mapping[str, int], k_max: int, slots: int) -> PackingLayout:
    """Position-major layout of the protected dW columns: ``layer#j`` has ``m_layer`` values."""
    segments = [
        (f"{layer}#{j}", m) for j in range(k_max) for layer, m in sorted(layer_rows.items())
    ]
    return PackingLayout.build(segments, slots)


@dataclass(frozen=True)
class FactorLayout:
    """Public flat layout of the zero-padded LoRA factors: per layer (sorted by name) B as
    m x r_max row-major, then A as r_max x n row-major."""

    shapes: tuple[tuple[str, int, int], ...]
    r_max: int

    @classmethod
    def build(cls, shapes: Mapping[str, tuple[int, int]], r_max: int) -> FactorLayout:
        if r_max < 1:
            raise ValueError(f"r_max must be >= 1 (got {r_max})")
        return cls(tuple((k, int(m), int(n)) for k, (m, n) in sorted(shapes.items())), r_max)

    def _offsets(self) -> list[tuple[str, int, int, int, int]]:
        out, pos = [], 0
        for layer, m, n in self.shapes:
            out.append((layer, m, n, pos, pos + m * self.r_max))
            pos += self.r_max * (m + n)
        return out

    @property
    def size(self) -> int:
        """Entries of all padded factors."""
        return sum(self.r_max * (m + n) for _, m, n in self.shapes)

    def flatten(self, factors: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
        """Zero-pad every ``(B, A)`` to ``r_max`` and concatenate (float64)."""
        flat = np.zeros(self.size)
        for layer, m, n, b0, a0 in self._offsets():
            b, a = factors[layer]
            r = b.shape[1]
            if r > self.r_max or b.shape != (m, r) or a.shape != (r, n):
                raise ValueError(
                    f"layer {layer!r}: B {b.shape} and A {a.shape} do not fit the layout "
                    f"({m} x {n}, r_max {self.r_max})"
                )
            flat[b0 : b0 + m * self.r_max].reshape(m, self.r_max)[:, :r] = b
            flat[a0 : a0 + self.r_max * n].reshape(self.r_max, n)[:r] = a
        return flat

    def unflatten(self, flat: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Inverse of :meth:`flatten`: ``(B (m x r_max), A (r_max x n))`` per layer (copies)."""
        flat = np.asarray(flat, np.float64)
        if flat.shape != (self.size,):
            raise ValueError(f"flat vector has shape {flat.shape}, the layout holds {self.size}")
        return {
            layer: (
                flat[b0 : b0 + m * self.r_max].reshape(m, self.r_max).copy(),
                flat[a0 : a0 + self.r_max * n].reshape(self.r_max, n).copy(),
            )
            for layer, m, n, b0, a0 in self._offsets()
        }

    def own_entries(self, rank: int) -> np.ndarray:
        """Boolean mask of the entries a rank-``rank`` client holds (B[:, :r] and A[:r])."""
        own = np.zeros(self.size, bool)
        for _layer, m, n, b0, a0 in self._offsets():
            own[b0 : b0 + m * self.r_max].reshape(m, self.r_max)[:, :rank] = True
            own[a0 : a0 + self.r_max * n].reshape(self.r_max, n)[:rank] = True
        return own

    def layer_counts(self, indices: np.ndarray) -> dict[str, int]:
        """How many of ``indices`` fall in each layer (B and A together)."""
        ends = np.cumsum([self.r_max * (m + n) for _, m, n in self.shapes])
        counts = np.bincount(np.searchsorted(ends, indices, side="right"), minlength=len(ends))
        return {layer: int(c) for (layer, _, _), c in zip(self.shapes, counts, strict=True)}


@dataclass(frozen=True)
class ComponentLayout:
    """Public flat layout of LoRA factors, component-major: for j = 0 .. r_max - 1, for every layer
    (sorted by name), ``B[:, j]`` (m values) then ``A[j, :]`` (n values).

    A rank-r client's values are the first :meth:`prefix` ``(r)`` entries, so it encrypts and sends
    only those (its own rank, no zero padding); the server adds ciphertext c over the clients that
    sent it, which is the weighted mean of the zero-padded factors (a missing entry is a zero).
    """

    shapes: tuple[tuple[str, int, int], ...]
    r_max: int

    @classmethod
    def build(cls, shapes: Mapping[str, tuple[int, int]], r_max: int) -> ComponentLayout:
        if r_max < 1:
            raise ValueError(f"r_max must be >= 1 (got {r_max})")
        return cls(tuple((k, int(m), int(n)) for k, (m, n) in sorted(shapes.items())), r_max)

    @property
    def width(self) -> int:
        """Values of one component over every layer: ``sum (m + n)``."""
        return sum(m + n for _, m, n in self.shapes)

    @property
    def size(self) -> int:
        return self.r_max * self.width

    def prefix(self, rank: int) -> int:
        """Entries a rank-``rank`` client holds (the first ``rank`` components)."""
        return int(rank) * self.width

    def flatten(self, factors: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
        """The client's factors (all of one rank r <= r_max) as the first ``prefix(r)`` values."""
        ranks = {b.shape[1] for b, _ in factors.values()}
        if len(ranks) != 1 or max(ranks) > self.r_max:
            raise ValueError(f"factors of ranks {sorted(ranks)} do not fit r_max {self.r_max}")
        r = ranks.pop()
        out = np.zeros((r, self.width))
        pos = 0
        for layer, m, n in self.shapes:
            b, a = factors[layer]
            if b.shape != (m, r) or a.shape != (r, n):
                raise ValueError(
                    f"layer {layer!r}: B {b.shape} and A {a.shape} do not fit {m} x {n} at rank {r}"
                )
            out[:, pos : pos + m] = np.asarray(b, np.float64).T
            out[:, pos + m : pos + m + n] = a
            pos += m + n
        return out.ravel()

    def unflatten(self, flat: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """``(B (m x r_max), A (r_max x n))`` per layer from up to :attr:`size` values (missing
        trailing values are zeros)."""
        flat = np.asarray(flat, np.float64).ravel()
        if flat.size > self.size:
            raise ValueError(f"{flat.size} values do not fit the layout's {self.size}")
        grid = np.zeros(self.size)
        grid[: flat.size] = flat
        grid = grid.reshape(self.r_max, self.width)
        out, pos = {}, 0
        for layer, m, n in self.shapes:
            out[layer] = (grid[:, pos : pos + m].T.copy(), grid[:, pos + m : pos + m + n].copy())
            pos += m + n
        return out
