"""Dense packing of named 1-D segments (e.g. LoRA factors) into ciphertext slots.

Notes
-----
:class:`PackingLayout` is built from public information only (segment names, lengths and the
slot count), so every client and the server derive the same layout and the ciphertexts of
different clients add slot-wise.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import CKKSError

__all__ = ["PackingLayout"]


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
