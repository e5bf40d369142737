"""Server-side aggregation of LoRA factors: FlexLoRA and factor-wise FedAvg.

Pure linear algebra on ``numpy.float64`` arrays. Nothing in this module knows about
torch, models, or encryption; callers convert tensors to arrays before calling in.

Notation (one adapted layer)
----------------------------
The frozen weight is ``W0`` with shape ``(m, n)``. Client ``i`` trains LoRA factors of
rank ``r_i``: ``B_i`` with shape ``(m, r_i)`` and ``A_i`` with shape ``(r_i, n)``, with
scaling ``s_i = alpha / r_i``, so its update is ``dW_i = s_i B_i A_i``. Its aggregation
weight is ``p_i = n_i / sum_j n_j`` where ``n_i`` is its number of training examples.

FlexLoRA
--------
FlexLoRA (Bai et al., "Federated Fine-tuning of Large Language Models under Heterogeneous
Tasks and Client Resources", NeurIPS 2024) aggregates the *products*:
``dW = sum_i p_i s_i B_i A_i``, takes the SVD ``dW = U S V^T`` and sends each client the
best rank-``r_i`` approximation, ``B_i' = U_r S_r / s_i`` and ``A_i' = V_r^T`` (singular
values go into ``B``, as in the FlexLoRA reference implementation). This is unbiased
with respect to the global product, and clients of different ranks share one update.

Here the SVD is computed from the stacked factors (``left = [p_1 s_1 B_1, ...]``,
``right = vstack(A_i)``) by two thin QR factorisations and an SVD of a small
``R x R`` core with ``R = sum_i r_i``, so the ``m x n`` matrix is never formed. The
result equals the dense SVD up to floating-point rounding.

Factor-wise FedAvg with zero padding
------------------------------------
The classic baseline averages ``B`` and ``A`` separately. Heterogeneous ranks are
zero-padded to the largest rank as in HetLoRA (Cho et al., "Heterogeneous LoRA for
Federated Fine-tuning of On-Device Foundation Models", 2024). This is *biased*:
``mean(B) @ mean(A) != mean(B @ A)`` in general.

Conventions
-----------
Weights passed to the aggregators are the normalised ``p_i`` (use
:func:`normalize_weights`); they are checked to be non-negative and to sum to one, so a
caller who passes raw example counts gets an error instead of a silently rescaled update.
Singular values are sorted in descending order and signs are fixed deterministically
(the entry of largest absolute value in each column of ``U`` is made positive, and the
matching row of ``V^T`` is flipped with it). Nothing is dropped unless a rank is asked
for explicitly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "LowRankUpdate",
    "SVDFactors",
    "dense_svd",
    "fedavg_factors",
    "fedavg_truncate",
    "flexlora_aggregate",
    "flexlora_redistribute",
    "lora_scaling",
    "lowrank_svd",
    "normalize_weights",
    "stack_client_updates",
    "weighted_mean",
]

_WEIGHT_SUM_ATOL = 1e-8

FactorPair = tuple[np.ndarray, np.ndarray]


# --------------------------------------------------------------------------- helpers


def _as_float_vector(values: Sequence[float] | np.ndarray, name: str) -> np.ndarray:
    """Convert ``values`` to a 1-D float64 array, raising ``ValueError`` if impossible."""
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a sequence of numbers, got {values!r}.") from exc
    if arr.ndim != 1:
        raise ValueError(
            f"{name} must be one-dimensional (one value per client), got shape {arr.shape}; "
            "pass a flat list or 1-D array."
        )
    return arr


def _as_matrix(value: np.ndarray, name: str) -> np.ndarray:
    """Convert ``value`` to a finite 2-D float64 array, raising ``ValueError`` otherwise."""
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(
            f"{name} must be a 2-D matrix, got shape {arr.shape}; "
            "pass the LoRA factor of a single layer (no batch or head dimension)."
        )
    if arr.size == 0:
        raise ValueError(
            f"{name} has an empty dimension (shape {arr.shape}); it must be non-empty."
        )
    if not np.all(np.isfinite(arr)):
        raise ValueError(
            f"{name} (shape {arr.shape}) contains NaN or inf; check the client's training "
            "for divergence before aggregating."
        )
    return arr


def _check_positive_int(value: int, name: str) -> int:
    """Return ``value`` as ``int`` if it is an integer >= 1, else raise ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
    return int(value)


def _check_weights(weights: Sequence[float] | np.ndarray, num_clients: int) -> np.ndarray:
    """Validate aggregation weights ``p_i``: length, finiteness, sign and unit sum."""
    p = _as_float_vector(weights, "weights")
    if p.shape[0] != num_clients:
        raise ValueError(
            f"got {p.shape[0]} weights for {num_clients} clients (weights shape {p.shape}, "
            f"expected ({num_clients},)); pass one weight per client."
        )
    if not np.all(np.isfinite(p)) or np.any(p < 0):
        raise ValueError(
            f"weights must be finite and non-negative, got {p.tolist()}; "
            "compute them with normalize_weights(num_examples)."
        )
    total = float(p.sum())
    if abs(total - 1.0) > _WEIGHT_SUM_ATOL:
        raise ValueError(
            f"weights must sum to one, got sum {total!r} for {p.tolist()}; "
            "compute them with normalize_weights(num_examples)."
        )
    return p


def _check_scalings(scalings: Sequence[float] | np.ndarray, num_clients: int) -> np.ndarray:
    """Validate LoRA scalings ``s_i``: length, finiteness and positivity."""
    s = _as_float_vector(scalings, "scalings")
    if s.shape[0] != num_clients:
        raise ValueError(
            f"got {s.shape[0]} scalings for {num_clients} clients (scalings shape {s.shape}, "
            f"expected ({num_clients},)); pass one scaling alpha / r_i per client."
        )
    if not np.all(np.isfinite(s)) or np.any(s <= 0):
        raise ValueError(
            f"scalings must be finite and positive, got {s.tolist()}; "
            "compute them with lora_scaling(alpha, rank)."
        )
    return s


def _check_factors(factors: Sequence[FactorPair]) -> list[FactorPair]:
    """Validate client factor pairs ``(B_i, A_i)`` and convert them to float64.

    Every ``B_i`` must be ``(m, r_i)`` and every ``A_i`` must be ``(r_i, n)`` with the
    same ``m`` and ``n`` for all clients.
    """
    if len(factors) == 0:
        raise ValueError("factors is empty; pass at least one client's (B, A) pair.")
    checked: list[FactorPair] = []
    for i, pair in enumerate(factors):
        if len(pair) != 2:
            raise ValueError(
                f"client {i}: expected a (B, A) pair, got {len(pair)} items; "
                "pass factors as a sequence of (B, A) tuples."
            )
        b = _as_matrix(pair[0], f"client {i} B")
        a = _as_matrix(pair[1], f"client {i} A")
        if b.shape[1] != a.shape[0]:
            raise ValueError(
                f"client {i}: B has shape {b.shape} but A has shape {a.shape}; B must be "
                "(m, r) and A must be (r, n) with the same rank r. Check that both come "
                "from the same LoRA module and are not transposed (PEFT stores "
                "lora_B.weight as (m, r) and lora_A.weight as (r, n))."
            )
        if checked:
            b0, a0 = checked[0]
            if b.shape[0] != b0.shape[0] or a.shape[1] != a0.shape[1]:
                raise ValueError(
                    f"client {i}'s update has shape (m, n) = ({b.shape[0]}, {a.shape[1]}) "
                    f"(B {b.shape}, A {a.shape}) but client 0's has "
                    f"({b0.shape[0]}, {a0.shape[1]}) (B {b0.shape}, A {a0.shape}); all "
                    "clients must send factors of the same layer."
                )
        checked.append((b, a))
    return checked


def _fix_signs(u: np.ndarray, vt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Make the largest-magnitude entry of each column of ``u`` positive.

    The same sign flip is applied to the matching row of ``vt`` so ``u diag(s) vt`` is
    unchanged. Ties in magnitude are broken by the first index (``np.argmax``).
    """
    if u.shape[1] == 0:
        return u, vt
    idx = np.argmax(np.abs(u), axis=0)
    signs = np.sign(u[idx, np.arange(u.shape[1])])
    signs[signs == 0] = 1.0
    return u * signs, vt * signs[:, None]


# --------------------------------------------------------------------------- weights


def normalize_weights(num_examples: Sequence[float] | np.ndarray) -> np.ndarray:
    """Turn per-client example counts into aggregation weights ``p_i = n_i / sum_j n_j``.

    Parameters
    ----------
    num_examples : sequence of float
        Number of training examples ``n_i`` of each client (non-negative, not all zero).

    Returns
    -------
    numpy.ndarray
        Float64 array of shape ``(K,)`` that sums to one.

    Raises
    ------
    ValueError
        If the input is empty, not 1-D, contains NaN/inf or negative values, or is all zero.
    """
    n = _as_float_vector(num_examples, "num_examples")
    if n.shape[0] == 0:
        raise ValueError("num_examples is empty; pass one example count per client.")
    if not np.all(np.isfinite(n)):
        raise ValueError(f"num_examples must be finite, got {n.tolist()}.")
    if np.any(n < 0):
        raise ValueError(f"num_examples must be non-negative, got {n.tolist()}.")
    total = float(n.sum())
    if total <= 0:
        raise ValueError(
            f"num_examples are all zero ({n.tolist()}); at least one client must have data."
        )
    return n / total


def lora_scaling(alpha: float, rank: int) -> float:
    """LoRA scaling factor ``alpha / rank`` (Hu et al., 2022; PEFT's default).

    Parameters
    ----------
    alpha : float
        LoRA ``alpha`` hyper-parameter (> 0).
    rank : int
        LoRA rank ``r`` (>= 1).

    Returns
    -------
    float
        ``alpha / rank``.
    """
    rank = _check_positive_int(rank, "rank")
    if not np.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}.")
    return float(alpha) / rank


# --------------------------------------------------------------------------- containers


class _Factored:
    """What the factored containers share: a matrix ``outer[0] @ (...) @ outer[1]`` whose outer
    factors are ``(m, k)`` and ``(k, n)``."""

    def _outer(self) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    @property
    def shape(self) -> tuple[int, int]:
        """Shape ``(m, n)`` of the represented matrix."""
        left, right = self._outer()
        return (left.shape[0], right.shape[1])

    @property
    def rank(self) -> int:
        """Inner dimension ``k`` of the factorisation (stored components, zeros included)."""
        return self._outer()[0].shape[1]


@dataclass(frozen=True, eq=False)
class LowRankUpdate(_Factored):
    """A weight update in factored form, ``dW = left @ right``.

    Attributes
    ----------
    left : numpy.ndarray
        Float64 matrix of shape ``(m, R)``.
    right : numpy.ndarray
        Float64 matrix of shape ``(R, n)``.

    Notes
    -----
    ``rank`` is the inner dimension ``R`` of the factorisation, an upper bound on the
    numerical rank of ``dW``. ``eq=False``: instances compare by identity (element-wise
    array comparison has no single truth value), which also keeps them hashable.
    """

    left: np.ndarray
    right: np.ndarray

    def _outer(self) -> tuple[np.ndarray, np.ndarray]:
        return self.left, self.right

    def __post_init__(self) -> None:
        left = _as_matrix(self.left, "left")
        right = _as_matrix(self.right, "right")
        if left.shape[1] != right.shape[0]:
            raise ValueError(
                f"left has shape {left.shape} but right has shape {right.shape}; left must "
                "be (m, R) and right (R, n) with the same inner dimension R."
            )
        object.__setattr__(self, "left", left)
        object.__setattr__(self, "right", right)

    def dense(self) -> np.ndarray:
        """The dense ``(m, n)`` float64 matrix ``left @ right`` (allocates ``m * n`` floats)."""
        return self.left @ self.right


@dataclass(frozen=True, eq=False)
class SVDFactors(_Factored):
    """A thin SVD ``M = u @ diag(s) @ vt`` with singular values in descending order.

    Attributes
    ----------
    u : numpy.ndarray
        Float64 matrix of shape ``(m, k)`` with orthonormal columns.
    s : numpy.ndarray
        Float64 vector of shape ``(k,)``, non-negative and non-increasing.
    vt : numpy.ndarray
        Float64 matrix of shape ``(k, n)`` with orthonormal rows.

    Notes
    -----
    ``eq=False``: instances compare by identity, as for :class:`LowRankUpdate`.
    """

    u: np.ndarray
    s: np.ndarray
    vt: np.ndarray

    def _outer(self) -> tuple[np.ndarray, np.ndarray]:
        return self.u, self.vt

    def __post_init__(self) -> None:
        u = np.asarray(self.u, dtype=np.float64)
        s = np.asarray(self.s, dtype=np.float64)
        vt = np.asarray(self.vt, dtype=np.float64)
        if u.ndim != 2 or s.ndim != 1 or vt.ndim != 2:
            raise ValueError(
                f"u, s, vt must be 2-D, 1-D, 2-D; got shapes {u.shape}, {s.shape}, {vt.shape}."
            )
        if not (u.shape[1] == s.shape[0] == vt.shape[0]):
            raise ValueError(
                f"u has shape {u.shape}, s has shape {s.shape} and vt has shape {vt.shape}; "
                "expected (m, k), (k,) and (k, n) with the same k."
            )
        if np.any(s < 0) or np.any(np.diff(s) > 0):
            raise ValueError(
                f"s must be non-negative and sorted in descending order, got {s.tolist()}."
            )
        object.__setattr__(self, "u", u)
        object.__setattr__(self, "s", s)
        object.__setattr__(self, "vt", vt)

    def dense(self) -> np.ndarray:
        """The dense ``(m, n)`` float64 matrix ``u @ diag(s) @ vt``."""
        return (self.u * self.s) @ self.vt

    def truncate(self, r: int) -> SVDFactors:
        """Keep the ``r`` leading singular triplets.

        By Eckart-Young this is the best rank-``r`` approximation in Frobenius and
        spectral norm.

        Parameters
        ----------
        r : int
            Number of triplets to keep, ``1 <= r <= self.rank``.

        Returns
        -------
        SVDFactors
            Copies of the leading ``r`` columns of ``u``, entries of ``s`` and rows of ``vt``.
        """
        r = _check_positive_int(r, "rank")
        if r > self.rank:
            raise ValueError(
                f"cannot truncate to rank {r}: only {self.rank} singular triplets are "
                f"available (matrix shape {self.shape}); ask for a rank <= {self.rank}."
            )
        return SVDFactors(u=self.u[:, :r].copy(), s=self.s[:r].copy(), vt=self.vt[:r].copy())


# --------------------------------------------------------------------------- SVD


def stack_client_updates(
    factors: Sequence[FactorPair],
    weights: Sequence[float] | np.ndarray,
    scalings: Sequence[float] | np.ndarray,
) -> LowRankUpdate:
    """Stack client factors so that ``left @ right = sum_i p_i s_i B_i A_i``.

    Parameters
    ----------
    factors : sequence of (numpy.ndarray, numpy.ndarray)
        ``(B_i, A_i)`` per client with shapes ``(m, r_i)`` and ``(r_i, n)``.
    weights : sequence of float
        Aggregation weights ``p_i`` (non-negative, summing to one).
    scalings : sequence of float
        LoRA scalings ``s_i = alpha / r_i`` (positive).

    Returns
    -------
    LowRankUpdate
        ``left = [p_1 s_1 B_1, ..., p_K s_K B_K]`` of shape ``(m, R)`` and
        ``right = vstack(A_1, ..., A_K)`` of shape ``(R, n)`` with ``R = sum_i r_i``.
    """
    pairs = _check_factors(factors)
    p = _check_weights(weights, len(pairs))
    s = _check_scalings(scalings, len(pairs))
    left = np.concatenate([p[i] * s[i] * b for i, (b, _) in enumerate(pairs)], axis=1)
    right = np.concatenate([a for _, a in pairs], axis=0)
    return LowRankUpdate(left=left, right=right)


def lowrank_svd(update: LowRankUpdate, *, rank: int | None = None) -> SVDFactors:
    """Thin SVD of ``update.left @ update.right`` without forming the ``m x n`` matrix.

    With ``left = Q1 R1`` and ``right.T = Q2 R2`` (reduced QR), ``left @ right =
    Q1 (R1 R2^T) Q2^T``; the SVD of the small core ``R1 R2^T = Uc Sc Vc^T`` gives
    ``U = Q1 Uc`` and ``V^T = (Q2 Vc)^T``. Cost is ``O((m + n) R^2 + R^3)`` time and
    ``O((m + n) R)`` memory. Exact (up to rounding) for any ``R``, including
    ``R > min(m, n)``.

    Parameters
    ----------
    update : LowRankUpdate
        Factored update with ``left`` ``(m, R)`` and ``right`` ``(R, n)``.
    rank : int, optional
        If given, keep only the leading ``rank`` triplets (``1 <= rank <= k``).

    Returns
    -------
    SVDFactors
        ``k = min(m, n, R)`` triplets (or ``rank``), singular values descending, signs
        fixed so the largest-magnitude entry of each ``u`` column is positive. Zero
        singular values are kept.
    """
    if not isinstance(update, LowRankUpdate):
        raise TypeError(
            f"update must be a LowRankUpdate, got {type(update).__name__}; "
            "wrap factors with LowRankUpdate(left, right) or stack_client_updates(...)."
        )
    q1, r1 = np.linalg.qr(update.left, mode="reduced")  # (m, p), (p, R), p = min(m, R)
    q2, r2 = np.linalg.qr(update.right.T, mode="reduced")  # (n, q), (q, R), q = min(n, R)
    core = r1 @ r2.T  # (p, q)
    uc, sc, vct = np.linalg.svd(core, full_matrices=False)
    u = q1 @ uc
    vt = vct @ q2.T
    u, vt = _fix_signs(u, vt)
    result = SVDFactors(u=u, s=sc, vt=vt)
    return result if rank is None else result.truncate(rank)


def dense_svd(dw: np.ndarray, *, rank: int | None = None) -> SVDFactors:
    """Reference thin SVD of a dense matrix via ``numpy.linalg.svd``.

    Parameters
    ----------
    dw : numpy.ndarray
        Matrix of shape ``(m, n)``.
    rank : int, optional
        If given, keep only the leading ``rank`` triplets (``1 <= rank <= min(m, n)``).

    Returns
    -------
    SVDFactors
        ``min(m, n)`` triplets (or ``rank``), same sign convention as :func:`lowrank_svd`.
    """
    mat = _as_matrix(dw, "dw")
    u, s, vt = np.linalg.svd(mat, full_matrices=False)
    u, vt = _fix_signs(u, vt)
    result = SVDFactors(u=u, s=s, vt=vt)
    return result if rank is None else result.truncate(rank)


# --------------------------------------------------------------------------- FlexLoRA


def flexlora_aggregate(
    factors: Sequence[FactorPair],
    weights: Sequence[float] | np.ndarray,
    scalings: Sequence[float] | np.ndarray,
    *,
    max_rank: int | None = None,
) -> SVDFactors:
    """FlexLoRA server step: SVD of ``sum_i p_i s_i B_i A_i`` (Bai et al., NeurIPS 2024).

    Parameters
    ----------
    factors, weights, scalings
        The clients' ``(B_i, A_i)``, weights ``p_i`` and scalings ``s_i``, as in
        :func:`stack_client_updates`.
    max_rank : int, optional
        Keep at most this many triplets, typically the largest client rank, which is all
        any client can use. It is an upper bound: if the SVD has fewer triplets
        (``min(m, n, sum r_i) < max_rank``) all of them are kept and nothing is lost.

    Returns
    -------
    SVDFactors
        Thin SVD of the aggregated update, truncated to ``min(max_rank, k)`` if given.
    """
    svd = lowrank_svd(stack_client_updates(factors, weights, scalings))
    if max_rank is None:
        return svd
    max_rank = _check_positive_int(max_rank, "max_rank")
    return svd.truncate(min(max_rank, svd.rank))


def flexlora_redistribute(
    svd: SVDFactors, rank: int, scaling: float
) -> tuple[np.ndarray, np.ndarray]:
    """FlexLoRA client step: best rank-``r`` factors of the aggregated update.

    Following FlexLoRA's convention the singular values are folded into ``B``:
    ``B = U_r diag(S_r) / scaling`` and ``A = V_r^T``. Dividing by the client's own
    ``scaling`` makes the adapter's effective update ``scaling * B @ A`` equal the best
    rank-``r`` approximation of the aggregate (Eckart-Young). ``A`` has orthonormal rows.

    Parameters
    ----------
    svd : SVDFactors
        Output of :func:`flexlora_aggregate`.
    rank : int
        The client's LoRA rank ``r``.
    scaling : float
        The client's LoRA scaling ``alpha / r``.

    Returns
    -------
    tuple of numpy.ndarray
        ``(B, A)`` with shapes ``(m, r)`` and ``(r, n)``.

    Raises
    ------
    ValueError
        If ``rank`` exceeds the number of available triplets or ``scaling`` is not positive.
    """
    rank = _check_positive_int(rank, "rank")
    if not np.isfinite(scaling) or scaling <= 0:
        raise ValueError(
            f"scaling must be a finite number > 0, got {scaling!r}; use lora_scaling(alpha, rank)."
        )
    if rank > svd.rank:
        raise ValueError(
            f"client rank {rank} exceeds the {svd.rank} singular triplets available "
            f"(update shape {svd.shape}); aggregate with max_rank >= {rank} (and enough "
            "total client rank), or give this client a rank <= "
            f"{svd.rank}."
        )
    b = svd.u[:, :rank] * (svd.s[:rank] / float(scaling))
    a = svd.vt[:rank].copy()
    return b, a


# --------------------------------------------------------------------------- FedAvg


def fedavg_factors(
    factors: Sequence[FactorPair], weights: Sequence[float] | np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Factor-wise FedAvg of LoRA factors with HetLoRA-style zero padding.

    ``B_avg = sum_i p_i pad(B_i)`` and ``A_avg = sum_i p_i pad(A_i)``, where ``pad``
    appends zero columns to ``B_i`` and zero rows to ``A_i`` up to ``r_max = max_i r_i``
    (Cho et al., 2024). Scalings are not applied; each client applies its own.

    This aggregator is **biased**: in general
    ``mean(B) @ mean(A) != sum_i p_i B_i @ A_i`` because the average of products is not
    the product of averages (the cross terms ``p_i p_j B_i A_j`` for ``i != j`` appear).
    It is the baseline FlexLoRA improves on.

    Parameters
    ----------
    factors : sequence of (numpy.ndarray, numpy.ndarray)
        ``(B_i, A_i)`` per client with shapes ``(m, r_i)`` and ``(r_i, n)``.
    weights : sequence of float
        Aggregation weights ``p_i`` (non-negative, summing to one).

    Returns
    -------
    tuple of numpy.ndarray
        ``(B_avg, A_avg)`` with shapes ``(m, r_max)`` and ``(r_max, n)``.
    """
    pairs = _check_factors(factors)
    p = _check_weights(weights, len(pairs))
    m, n = pairs[0][0].shape[0], pairs[0][1].shape[1]
    r_max = max(b.shape[1] for b, _ in pairs)
    b_avg = np.zeros((m, r_max), dtype=np.float64)
    a_avg = np.zeros((r_max, n), dtype=np.float64)
    for p_i, (b, a) in zip(p, pairs, strict=True):
        r = b.shape[1]
        b_avg[:, :r] += p_i * b
        a_avg[:r, :] += p_i * a
    return b_avg, a_avg


def fedavg_truncate(
    b_avg: np.ndarray, a_avg: np.ndarray, rank: int
) -> tuple[np.ndarray, np.ndarray]:
    """Give a rank-``r`` client its slice of the zero-padded FedAvg factors.

    Parameters
    ----------
    b_avg : numpy.ndarray
        Averaged ``B`` of shape ``(m, r_max)``.
    a_avg : numpy.ndarray
        Averaged ``A`` of shape ``(r_max, n)``.
    rank : int
        The client's rank ``r`` (``1 <= r <= r_max``).

    Returns
    -------
    tuple of numpy.ndarray
        Copies of the first ``r`` columns of ``b_avg`` and the first ``r`` rows of
        ``a_avg``: shapes ``(m, r)`` and ``(r, n)``.
    """
    b = _as_matrix(b_avg, "b_avg")
    a = _as_matrix(a_avg, "a_avg")
    if b.shape[1] != a.shape[0]:
        raise ValueError(
            f"b_avg has shape {b.shape} but a_avg has shape {a.shape}; expected (m, r_max) "
            "and (r_max, n) as returned by fedavg_factors."
        )
    rank = _check_positive_int(rank, "rank")
    if rank > b.shape[1]:
        raise ValueError(
            f"client rank {rank} exceeds the averaged rank r_max = {b.shape[1]} (b_avg "
            f"{b.shape}, a_avg {a.shape}); include a client of rank >= {rank} in the "
            "average or use a smaller rank."
        )
    return b[:, :rank].copy(), a[:rank, :].copy()


def weighted_mean(
    arrays: Sequence[np.ndarray], weights: Sequence[float] | np.ndarray
) -> np.ndarray:
    """Weighted mean ``sum_i p_i x_i`` of same-shaped arrays (e.g. a classifier head).

    Parameters
    ----------
    arrays : sequence of numpy.ndarray
        One array per client, all of the same shape.
    weights : sequence of float
        Aggregation weights ``p_i`` (non-negative, summing to one).

    Returns
    -------
    numpy.ndarray
        Float64 array of the common shape.
    """
    if len(arrays) == 0:
        raise ValueError("arrays is empty; pass one array per client.")
    p = _check_weights(weights, len(arrays))
    mats = [np.asarray(x, dtype=np.float64) for x in arrays]
    for i, x in enumerate(mats):
        if x.shape != mats[0].shape:
            raise ValueError(
                f"array {i} has shape {x.shape} but array 0 has shape {mats[0].shape}; all "
                "clients must send the same parameter."
            )
        if not np.all(np.isfinite(x)):
            raise ValueError(f"array {i} (shape {x.shape}) contains NaN or inf.")
    out = np.zeros(mats[0].shape, dtype=np.float64)
    for p_i, x in zip(p, mats, strict=True):
        out += p_i * x
    return out
