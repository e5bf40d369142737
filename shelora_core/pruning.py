"""FedShield-LLM's magnitude pruning of LoRA weights (Mia & Amini, 2025).

Schedule from the paper: no pruning before round 40, then the pruned fraction grows linearly from
0.2 (round 40) to 0.5 (round 200) and stays there. Pruning is L1-unstructured per tensor: the
smallest-magnitude fraction of entries is set to zero (ties broken by position, deterministic).
"""

from __future__ import annotations

import numpy as np

__all__ = ["l1_unstructured", "prune_ratio"]


def prune_ratio(
    round_: int,
    *,
    start: int = 40,
    end: int = 200,
    begin_ratio: float = 0.2,
    end_ratio: float = 0.5,
) -> float:
    """The fraction of LoRA weights pruned in ``round_`` (1-based) under the paper's schedule."""
    if end <= start:
        raise ValueError(f"pruning end round ({end}) must come after its start ({start})")
    if not 0 <= begin_ratio <= end_ratio < 1:
        raise ValueError(f"need 0 <= begin_ratio <= end_ratio < 1 (got {begin_ratio}, {end_ratio})")
    if round_ < start:
        return 0.0
    if round_ >= end:
        return end_ratio
    return begin_ratio + (end_ratio - begin_ratio) * (round_ - start) / (end - start)


def l1_unstructured(x: np.ndarray, ratio: float) -> np.ndarray:
    """A copy of ``x`` with the ``round(ratio * size)`` smallest-|x| entries set to zero."""
    if not 0 <= ratio < 1:
        raise ValueError(f"pruning ratio must be in [0, 1) (got {ratio})")
    out = np.array(x, copy=True)
    k = int(round(ratio * out.size))
    if k:
        idx = np.argsort(np.abs(out), axis=None, kind="stable")[:k]
        out.flat[idx] = 0
    return out
