"""Federated client partitions: which training examples each client holds.

:func:`iid_partition` and :func:`dirichlet_partition` (the usual label-skew non-IID split with
proportions drawn from ``Dir(alpha)``) assign every training example to exactly one client;
:func:`partition` dispatches by scheme and :func:`partition_stats` gives the (clients x labels)
count matrix for heat-map figures. Everything is deterministic given ``seed``
(:func:`numpy.random.default_rng`).
"""

from __future__ import annotations

import math
import warnings

import numpy as np

from .data import _check_seed

__all__ = [
    "PARTITION_SCHEMES",
    "dirichlet_partition",
    "iid_partition",
    "partition",
    "partition_stats",
]

#: client partition schemes
PARTITION_SCHEMES: tuple[str, ...] = ("iid", "dirichlet")


def _check_num_clients(num_clients: int, num_examples: int) -> int:
    if isinstance(num_clients, bool) or not isinstance(num_clients, (int, np.integer)):
        raise TypeError(f"num_clients must be an integer >= 1 (got {num_clients!r})")
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1 (got {num_clients})")
    if num_clients > num_examples:
        raise ValueError(
            f"more clients ({num_clients}) than examples ({num_examples}); "
            f"num_clients must be between 1 and {num_examples}"
        )
    return int(num_clients)


def _check_alpha(alpha: float) -> float:
    try:
        value = float(alpha)
    except (TypeError, ValueError):
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ValueError(
            f"alpha must be > 0 (got {alpha!r}); smaller alpha = more label skew, "
            "0.3 is the paper's setting"
        )
    return value


def _check_labels(labels: np.ndarray) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(f"labels must be a 1-D array (got shape {arr.shape})")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"labels must be integers (got dtype {arr.dtype})")
    arr = arr.astype(np.int64)
    if arr.size and arr.min() < 0:
        raise ValueError(f"labels must be >= 0 (got min {arr.min()})")
    return arr


def _check_min_size(min_size: int, num_clients: int, num_examples: int) -> int:
    if isinstance(min_size, bool) or not isinstance(min_size, (int, np.integer)) or min_size < 0:
        raise ValueError(f"min_size must be an integer >= 0 (got {min_size!r})")
    if num_clients * min_size > num_examples:
        raise ValueError(
            f"cannot give {num_clients} clients at least min_size={min_size} examples each "
            f"({num_clients * min_size} needed) from only {num_examples} examples; "
            f"lower min_size to <= {num_examples // num_clients} or use fewer clients"
        )
    return int(min_size)


def iid_partition(num_examples: int, num_clients: int, *, seed: int) -> list[np.ndarray]:
    """Split ``range(num_examples)`` uniformly at random into near-equal client shards.

    Shard sizes differ by at most one.

    Args:
        num_examples: Number of examples to distribute.
        num_clients: Number of clients, in ``[1, num_examples]``.
        seed: Seed of the shuffle.

    Returns:
        One sorted ``int64`` index array per client; together they cover every index
        exactly once.

    Raises:
        ValueError: If ``num_clients`` is outside ``[1, num_examples]``.
    """
    if isinstance(num_examples, bool) or not isinstance(num_examples, (int, np.integer)):
        raise TypeError(f"num_examples must be a non-negative integer (got {num_examples!r})")
    if num_examples < 0:
        raise ValueError(f"num_examples must be >= 0 (got {num_examples})")
    num_clients = _check_num_clients(num_clients, int(num_examples))
    rng = np.random.default_rng(_check_seed(seed))
    perm = rng.permutation(int(num_examples)).astype(np.int64)
    return [np.sort(part) for part in np.array_split(perm, num_clients)]


def _dirichlet_draw(
    by_label: list[np.ndarray], num_clients: int, alpha: float, rng: np.random.Generator
) -> list[list[np.ndarray]]:
    shards: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for idx in by_label:
        idx = rng.permutation(idx)
        proportions = rng.dirichlet(np.full(num_clients, alpha))
        cuts = (np.cumsum(proportions) * len(idx)).astype(np.int64)[:-1]
        for client, piece in enumerate(np.split(idx, cuts)):
            shards[client].append(piece)
    return shards


def dirichlet_partition(
    labels: np.ndarray,
    num_clients: int,
    alpha: float,
    *,
    seed: int,
    min_size: int = 10,
    max_tries: int = 1000,
) -> list[np.ndarray]:
    """Non-IID label-skew partition with per-label client proportions ~ ``Dir(alpha)``.

    For every label (in increasing order) the label's indices are shuffled, proportions
    ``p ~ Dir(alpha * 1_K)`` over the ``K = num_clients`` clients are drawn, and the
    shuffled indices are cut at ``floor(cumsum(p) * n_label)``. The whole draw is repeated
    (with the same generator, so the result is still a function of ``seed``) until every
    client holds at least ``min_size`` examples. If ``max_tries`` draws all fail, the draw
    with the largest minimum client size is repaired deterministically: one example at a
    time moves from the currently largest client (its last index in draw order; ties go to
    the lowest client id) to the currently smallest, until all clients reach ``min_size``.
    A :class:`RuntimeWarning` reports that repair; it never fails silently.

    Smaller ``alpha`` gives more label skew (``alpha -> inf`` approaches IID; the paper
    uses ``alpha = 0.3``).

    Args:
        labels: 1-D non-negative integer class ids, one per example.
        num_clients: Number of clients, in ``[1, len(labels)]``.
        alpha: Dirichlet concentration, ``> 0``.
        seed: Seed of the partition.
        min_size: Minimum examples per client, ``>= 0``.
        max_tries: Number of Dirichlet draws before falling back to the repair step.

    Returns:
        One sorted ``int64`` index array per client; together they cover every index of
        ``labels`` exactly once.

    Raises:
        ValueError: For non-positive ``alpha``, ``num_clients`` outside
            ``[1, len(labels)]``, ``num_clients * min_size > len(labels)``, negative
            ``min_size`` or ``max_tries < 1``.
    """
    labels = _check_labels(labels)
    n = len(labels)
    num_clients = _check_num_clients(num_clients, n)
    alpha = _check_alpha(alpha)
    min_size = _check_min_size(min_size, num_clients, n)
    if isinstance(max_tries, bool) or not isinstance(max_tries, (int, np.integer)) or max_tries < 1:
        raise ValueError(f"max_tries must be an integer >= 1 (got {max_tries!r})")
    rng = np.random.default_rng(_check_seed(seed))
    by_label = [np.flatnonzero(labels == c).astype(np.int64) for c in np.unique(labels)]

    best: list[np.ndarray] | None = None
    best_min = -1
    for _ in range(int(max_tries)):
        shards = _dirichlet_draw(by_label, num_clients, alpha, rng)
        parts = [np.concatenate(s) if s else np.zeros(0, np.int64) for s in shards]
        smallest = min(len(p) for p in parts)
        if smallest >= min_size:
            return [np.sort(p).astype(np.int64) for p in parts]
        if smallest > best_min:
            best, best_min = parts, smallest

    assert best is not None
    warnings.warn(
        f"dirichlet_partition: no draw in max_tries={max_tries} gave every one of "
        f"{num_clients} clients >= {min_size} examples (alpha={alpha}, best minimum "
        f"{best_min}); moving examples from the largest to the smallest clients.",
        RuntimeWarning,
        stacklevel=2,
    )
    lists = [p.tolist() for p in best]
    while True:
        sizes = [len(p) for p in lists]
        small = int(np.argmin(sizes))
        if sizes[small] >= min_size:
            break
        large = int(np.argmax(sizes))
        # num_clients * min_size <= n guarantees sizes[large] > min_size here.
        lists[small].append(lists[large].pop())
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in lists]


def partition(
    labels: np.ndarray,
    num_clients: int,
    *,
    scheme: str = "dirichlet",
    alpha: float = 0.3,
    seed: int = 0,
    min_size: int = 10,
) -> list[np.ndarray]:
    """Partition example indices among clients with the named scheme.

    Args:
        labels: 1-D integer class ids, one per example.
        num_clients: Number of clients, in ``[1, len(labels)]``.
        scheme: ``"iid"`` (:func:`iid_partition`) or ``"dirichlet"``
            (:func:`dirichlet_partition`).
        alpha: Dirichlet concentration (ignored for ``"iid"``).
        seed: Seed of the partition.
        min_size: Minimum examples per client (IID shards satisfy it automatically once
            ``num_clients * min_size <= len(labels)``).

    Returns:
        One sorted ``int64`` index array per client.

    Raises:
        ValueError: For an unknown ``scheme`` or invalid arguments.

    Examples:
        >>> labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
        >>> parts = partition(labels, 2, scheme="iid", seed=0, min_size=1)
        >>> sorted(np.concatenate(parts).tolist()) == list(range(8))
        True
        >>> [len(p) for p in parts]
        [4, 4]
    """
    if scheme not in PARTITION_SCHEMES:
        raise ValueError(
            f"unknown partition scheme {scheme!r}; choose one of {list(PARTITION_SCHEMES)}"
        )
    labels = _check_labels(labels)
    num_clients = _check_num_clients(num_clients, len(labels))
    if scheme == "iid":
        _check_min_size(min_size, num_clients, len(labels))
        return iid_partition(len(labels), num_clients, seed=seed)
    return dirichlet_partition(labels, num_clients, alpha, seed=seed, min_size=min_size)


def partition_stats(labels: np.ndarray, parts: list[np.ndarray], num_labels: int) -> np.ndarray:
    """Count examples per (client, label), e.g. for a partition heat map.

    Args:
        labels: 1-D integer class ids of the partitioned examples.
        parts: Client index arrays as returned by :func:`partition`.
        num_labels: Number of classes (columns of the result).

    Returns:
        ``int64`` array of shape ``(len(parts), num_labels)``; row ``i`` sums to
        ``len(parts[i])``.

    Raises:
        ValueError: If a label is outside ``[0, num_labels)``.

    Examples:
        >>> partition_stats(np.array([0, 1, 1, 2]), [np.array([0, 1]), np.array([2, 3])], 3)
        array([[1, 1, 0],
               [0, 1, 1]])
    """
    labels = _check_labels(labels)
    if labels.size and labels.max() >= num_labels:
        raise ValueError(f"labels must be < num_labels={num_labels} (got max {labels.max()})")
    counts = np.zeros((len(parts), num_labels), dtype=np.int64)
    for i, part in enumerate(parts):
        idx = np.asarray(part, dtype=np.int64)
        counts[i] = np.bincount(labels[idx], minlength=num_labels)
    return counts
