"""Local differential privacy for client updates: clip, then add Gaussian noise.

The DP baseline of SHE-LoRA's attack table (Flex-LoRA-DP, epsilon = 10, delta = 1e-5 in the authors'
configuration): each client clips its update to L2 norm ``C`` and adds ``N(0, sigma^2 C^2)`` to every
coordinate before uploading. ``sigma`` comes from the Gaussian mechanism for one release:

* ``"analytic"`` (default): the smallest sigma with
  ``Phi(1/(2 sigma) - eps sigma) - e^eps Phi(-1/(2 sigma) - eps sigma) <= delta``
  (Balle & Wang, ICML 2018, "Improving the Gaussian Mechanism for Differential Privacy"), valid for
  every epsilon > 0;
* ``"classic"``: ``sqrt(2 ln(1.25 / delta)) / epsilon`` (Dwork & Roth 2014, Thm A.1; proved only for
  epsilon < 1, larger than the analytic value).

This is per-release (per round) privacy of one client's update; the composition over the rounds
of a run (and a noise multiplier for a target epsilon over the run) is
:mod:`shelora_core.accounting`'s.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

__all__ = ["clip_by_norm", "gaussian_delta", "gaussian_sigma", "privatize"]


def _phi(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def gaussian_delta(sigma: float, epsilon: float) -> float:
    """delta achieved by Gaussian noise of std ``sigma`` (sensitivity 1) at ``epsilon``."""
    a = 1.0 / (2.0 * sigma)
    b = epsilon * sigma
    return _phi(a - b) - math.exp(epsilon) * _phi(-a - b)


def gaussian_sigma(epsilon: float, delta: float, *, method: str = "analytic") -> float:
    """Noise multiplier (std per unit of L2 sensitivity) for (epsilon, delta)-DP of one release."""
    if not epsilon > 0:
        raise ValueError(f"epsilon must be > 0 (got {epsilon}); the authors' setting is 10")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1) (got {delta}); the authors' setting is 1e-5")
    if method == "classic":
        return math.sqrt(2.0 * math.log(1.25 / delta)) / epsilon
    if method != "analytic":
        raise ValueError(f"unknown method {method!r}; choose 'analytic' or 'classic'")
    lo, hi = 1e-6, 1.0
    while gaussian_delta(hi, epsilon) > delta:
        hi *= 2.0
    for _ in range(200):  # bisection: delta(sigma) decreases in sigma
        mid = 0.5 * (lo + hi)
        if gaussian_delta(mid, epsilon) > delta:
            lo = mid
        else:
            hi = mid
    return hi


def clip_by_norm(
    arrays: Mapping[str, np.ndarray], max_norm: float
) -> tuple[dict[str, np.ndarray], float]:
    """Scale all ``arrays`` jointly so their global L2 norm is at most ``max_norm``.

    Returns the clipped copies and the factor applied (1.0 when already inside the ball).
    """
    if not max_norm > 0:
        raise ValueError(f"max_norm must be > 0 (got {max_norm})")
    norm = math.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64))) for v in arrays.values()))
    factor = min(1.0, max_norm / norm) if norm > 0 else 1.0
    return {k: np.asarray(v, np.float64) * factor for k, v in arrays.items()}, factor


def privatize(
    arrays: Mapping[str, np.ndarray],
    *,
    max_norm: float,
    rng: np.random.Generator,
    epsilon: float | None = None,
    delta: float = 1e-5,
    sigma: float | None = None,
    method: str = "analytic",
) -> dict[str, np.ndarray]:
    """Clip jointly to ``max_norm`` and add N(0, (sigma * max_norm)^2) to every coordinate.

    ``sigma`` is given (the noise multiplier), or computed from ``(epsilon, delta)`` by
    :func:`gaussian_sigma`. Noise is drawn array by array in the mapping's order. This is the one
    implementation of local DP in the package (:mod:`shelora_core.methods.dp` and the attack
    grid's DP sweep call it).
    """
    if (sigma is None) == (epsilon is None):
        raise ValueError(f"give exactly one of sigma and epsilon (got {sigma!r}, {epsilon!r})")
    if sigma is None:
        sigma = gaussian_sigma(epsilon, delta, method=method)
    if sigma < 0:
        raise ValueError(f"sigma (the noise multiplier) must be >= 0 (got {sigma})")
    clipped, _ = clip_by_norm(arrays, max_norm)
    std = float(sigma) * max_norm
    return {k: v + rng.normal(0.0, std, size=v.shape) for k, v in clipped.items()}
