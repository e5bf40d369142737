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
* :class:`PackedLayout`: SHE-LoRA's ``packed`` mode: each client's protected columns of A packed
  densely into its inputs, and the server's products ``p_i s_i B_i A_i[:, G[j]]`` in common
  output slots (blocks of a common width, interleaved; :mod:`shelora_core.ckks.packed`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from ..ckks import CKKSError, PackingLayout
from ..ckks.packed import naf, normalize_step, replication_counts
from .wire import SEP

__all__ = [
    "ENCRYPT_MODES",
    "ComponentLayout",
    "FactorLayout",
    "PackedBlock",
    "PackedClass",
    "PackedLayout",
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


# ---------------------------------------------------------------------- packed mode
def _block_width(rows: int, r_max: int) -> int:
    """Slots one block spans for every rank up to ``r_max``: ``copies(r) * r``, where
    ``copies(r) = ceil((rows + r - 1) / r)`` periods of the replicated vector cover every read of
    the diagonal products."""
    return max(-(-(rows + r - 1) // r) * r for r in range(1, r_max + 1))


@dataclass(frozen=True)
class PackedBlock:
    """One block of an output: rows ``row0 .. row0 + rows`` of ``dW[:, G[position]]`` of a layer."""

    layer: str
    position: int
    row0: int
    rows: int


@dataclass(frozen=True)
class PackedClass:
    """Blocks of one height, position-major (every layer's block of position 0 first), packed
    ``per_output`` to an output ciphertext, each ``width`` slots wide (interleaved)."""

    height: int
    width: int
    per_output: int
    per_position: int
    blocks: tuple[PackedBlock, ...]

    def outputs(self, budget: int) -> int:
        """Output ciphertexts holding the blocks of positions ``< budget`` (a prefix)."""
        return -(-min(budget * self.per_position, len(self.blocks)) // self.per_output)

    def output_blocks(self, o: int) -> tuple[PackedBlock | None, ...]:
        """The ``per_output`` blocks of output ``o`` (``None`` past the last block)."""
        chunk = self.blocks[o * self.per_output : (o + 1) * self.per_output]
        return chunk + (None,) * (self.per_output - len(chunk))

    def copies(self, rank: int) -> int:
        """Periods of a rank-``rank`` vector the server replicates (covers every read)."""
        return -(-(self.height + rank - 1) // rank)


@dataclass(frozen=True)
class PackedLayout:
    """SHE-LoRA ``packed`` mode's public layout (module docstring; the server side is
    :class:`shelora_core.ckks.packed.PackedEvaluator`).

    Built from public facts only: layer heights ``m``, the column-list length ``k_max``, the
    federation's largest rank ``r_max`` and the slot count. A layer's rows are split into
    blocks of at most ``height`` rows (one block when ``m`` fits); blocks of equal height form a
    class whose output ciphertexts each hold ``per_output`` blocks of ``width`` slots,
    interleaved (row ``u`` of block ``b`` in slot ``u * per_output + b``). ``width`` is the same
    for every rank up to ``r_max``, so every client's products land in the same slots and add.

    A client of rank ``r`` and budget ``k`` sends, per class, one *group* of ``r * per_output``
    values for each output ciphertext that holds a block of a position ``< k`` (a prefix of the
    outputs): entry ``u`` of the block's column ``A[:, G[j]]`` in slot ``u * per_output + b``
    (zeros for blocks of positions ``>= k``). Groups are packed densely into ``inputs(r, k)``
    ciphertexts, none split across two.
    """

    slots: int
    k_max: int
    r_max: int
    classes: tuple[PackedClass, ...]

    @classmethod
    def build(
        cls, layer_rows: Mapping[str, int], k_max: int, r_max: int, slots: int
    ) -> PackedLayout:
        """The layout for layers of ``layer_rows`` (name -> ``m``).

        Raises:
            CKKSError: ``r_max`` so large that a block of one row does not fit the slots.
        """
        if r_max < 1 or k_max < 0 or slots < 1:
            raise CKKSError(f"r_max {r_max}, k_max {k_max} and slots {slots} must be positive")
        if _block_width(1, r_max) > slots:
            raise CKKSError(
                f"rank {r_max} is too large for the packed layout: a block needs "
                f"{_block_width(1, r_max)} slots, a ciphertext has {slots}; use cipher_mode "
                "'delta' or 'paper', or parameters with more slots"
            )
        chunks: dict[str, list[tuple[int, int]]] = {}
        for layer, m in sorted(layer_rows.items()):
            m = int(m)
            pieces = 1
            while _block_width(-(-m // pieces), r_max) > slots:
                pieces += 1
            h = -(-m // pieces)
            chunks[layer] = [(r0, min(h, m - r0)) for r0 in range(0, m, h)]
        heights = sorted({max(rows for _, rows in c) for c in chunks.values()})
        classes = []
        for h in heights:
            layers = [layer for layer, c in chunks.items() if max(rows for _, rows in c) == h]
            blocks = tuple(
                PackedBlock(layer, j, r0, rows)
                for j in range(k_max)
                for layer in layers
                for r0, rows in chunks[layer]
            )
            width = _block_width(h, r_max)
            classes.append(
                PackedClass(
                    height=h,
                    width=width,
                    per_output=slots // width,
                    per_position=sum(len(chunks[layer]) for layer in layers),
                    blocks=blocks,
                )
            )
        return cls(slots=int(slots), k_max=int(k_max), r_max=int(r_max), classes=tuple(classes))

    @property
    def baby(self) -> int:
        """Baby steps of the server's products: the power of two nearest below ``sqrt(r_max)``."""
        return 1 << max(0, int(math.floor(math.log2(math.sqrt(self.r_max)))))

    def outputs(self, budget: int) -> int:
        """Output ciphertexts when the largest budget of the round's clients is ``budget``."""
        return sum(c.outputs(budget) for c in self.classes)

    def groups(self, rank: int, budget: int) -> list[tuple[int, int, int, int]]:
        """``(class, output, input ciphertext, offset)`` of each group a client sends."""
        if not 1 <= rank <= self.r_max:
            raise CKKSError(f"rank {rank} is outside 1 .. r_max {self.r_max} of the layout")
        out, ct, pos = [], 0, 0
        for ci, c in enumerate(self.classes):
            span = rank * c.per_output
            for o in range(c.outputs(budget)):
                if pos + span > self.slots:
                    ct, pos = ct + 1, 0
                out.append((ci, o, ct, pos))
                pos += span
        return out

    def inputs(self, rank: int, budget: int) -> int:
        """Ciphertexts a client of this rank and budget sends."""
        groups = self.groups(rank, budget)
        return groups[-1][2] + 1 if groups else 0

    def pack(self, rank: int, budget: int, columns: Mapping[str, np.ndarray]) -> np.ndarray:
        """A client's values: ``inputs(rank, budget) * slots`` of them.

        Args:
            rank: the client's rank ``r``.
            budget: its budget ``k``.
            columns: per layer, ``A[:, G[:k]]`` (``r x k``).
        """
        flat = np.zeros(self.inputs(rank, budget) * self.slots)
        for ci, o, ct, pos in self.groups(rank, budget):
            c = self.classes[ci]
            base = ct * self.slots + pos + np.arange(rank) * c.per_output
            for b, blk in enumerate(c.output_blocks(o)):
                if blk is not None and blk.position < budget:
                    col = np.asarray(columns[blk.layer], np.float64)[:, blk.position]
                    if col.shape != (rank,):
                        raise CKKSError(
                            f"layer {blk.layer!r}: protected columns {columns[blk.layer].shape} "
                            f"do not fit rank {rank} and budget {budget}"
                        )
                    flat[base + b] = col
        return flat

    def unpack(
        self, values: np.ndarray, budget: int, layer_rows: Mapping[str, int]
    ) -> dict[str, np.ndarray]:
        """``D`` per layer (``m x k_max``) from the decrypted outputs (``outputs(budget)`` of
        them, in class order; positions ``>= budget`` stay zero)."""
        values = np.asarray(values, np.float64).ravel()
        if values.size != self.outputs(budget) * self.slots:
            raise CKKSError(
                f"{values.size} decrypted values; {self.outputs(budget)} outputs of "
                f"{self.slots} slots expected"
            )
        out = {layer: np.zeros((int(m), self.k_max)) for layer, m in layer_rows.items()}
        start = 0
        for c in self.classes:
            for o in range(c.outputs(budget)):
                slots = values[start : start + self.slots]
                start += self.slots
                for b, blk in enumerate(c.output_blocks(o)):
                    if blk is not None:
                        u = np.arange(blk.rows)
                        out[blk.layer][blk.row0 + u, blk.position] = slots[u * c.per_output + b]
        return out

    def rotations(self, pairs: Iterable[tuple[int, int]]) -> tuple[set[int], set[int]]:
        """``(repeated, single)``: the rotation steps of the server's products for clients of
        these ``(rank, budget)`` pairs. ``repeated`` are used for every group (replication,
        baby and giant steps); ``single`` once per group (moving a group to slot 0)."""
        repeated: set[int] = set()
        single: set[int] = set()
        g = self.baby
        for c in self.classes:
            nb = c.per_output
            repeated |= {e * nb for e in range(1, g)}
            repeated |= {q * g * nb for q in range(1, -(-self.r_max // g))}
        for rank, budget in set(pairs):
            for ci, _, _, pos in self.groups(rank, budget):
                c = self.classes[ci]
                span = rank * c.per_output
                single.add(pos)
                repeated |= {-n * span for n, _ in replication_counts(c.copies(rank))}
        norm = lambda steps: {normalize_step(s, self.slots) for s in steps} - {0}  # noqa: E731
        return norm(repeated), norm(single) - norm(repeated)

    def galois_steps(
        self, pairs: Iterable[tuple[int, int]], *, compose: bool = False
    ) -> tuple[int, ...]:
        """The Galois key steps the server needs for clients of these ``(rank, budget)`` pairs.

        ``compose=False``: a key for each repeated step (one key switch per rotation) and the
        power-of-two steps of the others; ``compose=True``: power-of-two steps only (the fewest
        keys, a rotation costs as many key switches as its non-adjacent form has terms).
        """
        repeated, single = self.rotations(pairs)
        keys = set() if compose else set(repeated)
        for s in (single | repeated) if compose else single:
            if s not in keys:
                keys |= {normalize_step(c, self.slots) for c in naf(s)}
        return tuple(sorted(keys, key=lambda k: (abs(k), k)))
