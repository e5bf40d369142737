"""A client's LoRA state as plain numpy: what crosses every boundary of a round.

Torch-free on purpose: the server side of a round (:mod:`shelora_core.server`) and the methods'
aggregation code handle adapters as numpy arrays and never import torch, transformers or peft.
:class:`shelora_core.lora.LoraModel` reads and writes these objects into a real model.

Notation (``docs/design.md``, "Notation"): for a layer with frozen ``W0`` (m x n), ``B`` is
(m x r), ``A`` is (r x n) and the adapter adds ``s * B @ A`` with ``s = alpha / r``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

__all__ = ["AdapterWeights", "fit_rank", "layer_index", "revive_missing"]

_LAYER_RE = re.compile(r"layers?\.(\d+)\.")


@dataclass
class AdapterWeights:
    """A client's trainable state: LoRA factors per layer and the classification head.

    Attributes:
        rank: LoRA rank r.
        alpha: LoRA alpha; the scaling is ``alpha / rank``.
        factors: layer name -> ``(B, A)`` with B (m x r) and A (r x n), float32.
        head: parameter name -> array for the classification head (plaintext, averaged).
    """

    rank: int
    alpha: float
    factors: dict[str, tuple[np.ndarray, np.ndarray]]
    head: dict[str, np.ndarray]

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    @property
    def shapes(self) -> dict[str, tuple[int, int]]:
        """``(m, n)`` of every adapted layer."""
        return {k: (b.shape[0], a.shape[1]) for k, (b, a) in self.factors.items()}


def fit_rank(
    b: np.ndarray, a: np.ndarray, rank: int, *, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Give ``(B, A)`` exactly ``rank`` components without changing ``B @ A``.

    Extra components are cut off (the caller orders them by importance). Missing ones, and
    components that are dead (zero column of B *and* zero row of A, e.g. a client of rank 32 when
    only rank-8/16 clients answered), are re-initialised the way LoRA initialises: B column 0,
    A row ~ U(-1/sqrt(n), 1/sqrt(n)), drawn from ``seed`` (with the shapes). Their product is
    still zero, but they can learn again; an all-zero pair would have zero gradient forever.
    """
    m, n = b.shape[0], a.shape[1]
    k = min(rank, b.shape[1])
    b_out = np.zeros((m, rank), np.float32)
    a_out = np.zeros((rank, n), np.float32)
    b_out[:, :k], a_out[:k] = b[:, :k], a[:k]
    dead = ~(b_out.any(axis=0) | a_out.any(axis=1))
    if dead.any():
        rng = np.random.default_rng([seed, rank, m, n])
        bound = 1.0 / np.sqrt(n)
        a_out[dead] = rng.uniform(-bound, bound, size=(int(dead.sum()), n))
    return b_out, a_out


def revive_missing(
    b: np.ndarray, a: np.ndarray, *, live_rank: int, round_: int, rank: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Averaged factors zero-padded to ``rank`` components (default: as many as given), with the
    components that no answering client had (``>= live_rank``) re-initialised from the round's
    SHARED seed (:func:`fit_rank` with ``seed=round_``).

    FedAvg's server, which sees the factors, and FedShield-LLM / full HE clients, which see only
    the decrypted sum (where CKKS noise would otherwise hide that those components are empty),
    both go through this rule, so the same components come back with the same values.
    """
    b = np.array(b, np.float32, copy=True)
    a = np.array(a, np.float32, copy=True)
    b[:, live_rank:] = 0.0
    a[live_rank:] = 0.0
    return fit_rank(b, a, b.shape[1] if rank is None else rank, seed=round_)


def layer_index(name: str) -> int:
    """The transformer block of an adapted module: ``i`` in ``...layers.<i>...`` (LLaMA) or
    ``...layer.<i>...`` (BERT)."""
    m = _LAYER_RE.search(name)
    if m is None:
        raise ValueError(
            f"cannot read a layer index from {name!r} (expected 'layers.<i>.' or 'layer.<i>.')"
        )
    return int(m.group(1))
