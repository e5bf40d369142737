"""Column-aware aggregation algebra of SHE-LoRA (pure maths: no crypto, no model code).

SHE-LoRA (Liu et al., ICLR 2026) protects, in every adapted layer, an ordered list ``G`` of input
columns of the LoRA ``A`` matrices. Client ``i`` with HE budget ``k_i`` protects the prefix
``J_i = G[:k_i]``: it sends ``B_i`` and ``A_i`` with the columns ``J_i`` zeroed in plaintext, and the
protected part encrypted. Because the prefixes nest, column ``G[j]`` is protected by every client
with ``k_i > j`` and the update splits exactly::

    dW = sum_i p_i s_i B_i A_i
       = sum_i p_i s_i B_i A_i^plain                      (plaintext part P, rank <= sum r_i)
       + D E_G^T,   D[:, j] = sum_{i: k_i > j} p_i s_i B_i A_i[:, G[j]]   (m x k_max, encrypted)

where ``E_G^T`` (k_max x n) scatters column ``j`` of ``D`` to column ``G[j]``. The server sums the
encrypted columns slot-wise; a client decrypts ``D`` and forms ``dW = P + D E_G^T`` as the product
of stacked factors ``[P_left, D] @ [P_right; E_G^T]``, whose SVD costs O((m + n)(R + k)^2), never
an m x n SVD. With the same inputs this equals FlexLoRA's dW up to CKKS error: the exactness check
in the tests.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .aggregation import (
    LowRankUpdate,
    SVDFactors,
    flexlora_redistribute,
    lowrank_svd,
    stack_client_updates,
)

__all__ = [
    "check_column_list",
    "fuse",
    "plain_part",
    "protected_columns",
    "reparameterize",
    "scatter",
    "split_columns",
]


def check_column_list(cols: Sequence[int], n: int, *, need: int = 0) -> np.ndarray:
    """Validate an ordered column list: integers in [0, n), no duplicates, at least ``need`` long."""
    arr = np.asarray(cols, dtype=np.int64).reshape(-1)
    if arr.size and (arr.min() < 0 or arr.max() >= n):
        raise ValueError(
            f"column indices must lie in [0, {n}) (got min {arr.min()}, max {arr.max()})"
        )
    if len(set(arr.tolist())) != arr.size:
        raise ValueError(f"the column list has duplicates: {arr.tolist()[:20]}")
    if arr.size < need:
        raise ValueError(
            f"the column list has {arr.size} columns but a budget of {need} needs that many; "
            f"lower the budget or lengthen the list (the layer has {n} columns)"
        )
    return arr


def split_columns(a: np.ndarray, cols: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """``(A with columns cols zeroed, A[:, cols])``."""
    cols = check_column_list(cols, a.shape[1])
    plain = np.array(a, copy=True)
    plain[:, cols] = 0
    return plain, np.array(a[:, cols], copy=True)


def protected_columns(
    b: np.ndarray, a: np.ndarray, cols: Sequence[int], factor: float
) -> np.ndarray:
    """``factor * B @ A[:, cols]`` (m x k): a client's protected dW columns (``delta`` mode)."""
    cols = check_column_list(cols, a.shape[1])
    if b.shape[1] != a.shape[0]:
        raise ValueError(f"B {b.shape} and A {a.shape} do not chain")
    return factor * (np.asarray(b, np.float64) @ np.asarray(a, np.float64)[:, cols])


def plain_part(
    factors: Sequence[tuple[np.ndarray, np.ndarray]],
    weights: Sequence[float] | np.ndarray,
    scalings: Sequence[float] | np.ndarray,
) -> LowRankUpdate:
    """``P = sum_i p_i s_i B_i A_i^plain`` as stacked factors (A's protected columns already zero)."""
    return stack_client_updates(factors, weights, scalings)


def scatter(cols: Sequence[int], n: int) -> np.ndarray:
    """``E_G^T`` (k x n): row j has a single 1 at column ``cols[j]``."""
    cols = check_column_list(cols, n)
    e = np.zeros((cols.size, n))
    e[np.arange(cols.size), cols] = 1.0
    return e


def fuse(plain: LowRankUpdate | SVDFactors, cols: Sequence[int], d: np.ndarray) -> LowRankUpdate:
    """``P + D E_G^T`` as one stacked low-rank product (exact; nothing truncated)."""
    if isinstance(plain, SVDFactors):
        left, right = plain.u * plain.s, plain.vt
    else:
        left, right = plain.left, plain.right
    m, n = left.shape[0], right.shape[1]
    d = np.asarray(d, np.float64)
    if d.ndim != 2 or d.shape[0] != m or d.shape[1] != len(cols):
        raise ValueError(
            f"decrypted columns D have shape {d.shape}, expected ({m}, {len(cols)}) for "
            f"{len(cols)} protected columns of a layer with {m} rows"
        )
    return LowRankUpdate(left=np.hstack([left, d]), right=np.vstack([right, scatter(cols, n)]))


def reparameterize(
    fused: LowRankUpdate, rank: int, scaling: float
) -> tuple[np.ndarray, np.ndarray, SVDFactors]:
    """A client's new ``(B, A)`` of its own rank from the fused update, plus the SVD used.

    B = U_r S_r / s, A = V_r^T (FlexLoRA's convention); if the update has fewer components than
    ``rank``, all are returned (the caller pads).
    """
    svd = lowrank_svd(fused)
    k = min(rank, svd.s.shape[0])
    b, a = flexlora_redistribute(svd, k, scaling)
    return b, a, svd
