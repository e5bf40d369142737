"""FedShield-LLM's magnitude pruning of LoRA weights (Mia & Amini, 2025).

Schedule from the paper: no pruning before round 40, then the pruned fraction grows linearly from
0.2 (round 40) to 0.5 (round 200) and stays there. Pruning is L1-unstructured per tensor: the
smallest-magnitude fraction of entries is set to zero (ties broken by position, deterministic).

Our runs last 10-20 rounds, so under the paper's schedule FedShield-LLM never prunes.
``schedule_rounds`` (``FederatedConfig.prune_schedule_rounds``) lays the paper's 200 rounds over
fewer: round ``t`` of the run prunes as the paper's round ``t x 200 / schedule_rounds`` (with 20:
nothing before round 4, 0.2 at round 4 rising to 0.5 at round 20).
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np

__all__ = ["PAPER_SCHEDULE_ROUNDS", "l1_unstructured", "prune_ratio", "prune_ratios"]

#: the last round of the paper's ramp (its schedule spans rounds 1..200)
PAPER_SCHEDULE_ROUNDS = 200


def prune_ratio(
    round_: int,
    *,
    start: int = 40,
    end: int = PAPER_SCHEDULE_ROUNDS,
    begin_ratio: float = 0.2,
    end_ratio: float = 0.5,
    schedule_rounds: int | None = None,
) -> float:
    """The fraction of LoRA weights pruned in ``round_`` (1-based) under the paper's schedule.

    Args:
        round_: the round (1-based).
        start, end: the rounds where the ramp begins (``begin_ratio``) and ends (``end_ratio``).
        begin_ratio, end_ratio: the pruned fraction at ``start`` and from ``end`` on.
        schedule_rounds: ``None`` for the schedule as written; else the number of rounds the
            schedule's ``end`` rounds are laid over: ``round_`` prunes as round
            ``round_ x end / schedule_rounds`` (exact, no float rounding at the ramp's start).

    Raises:
        ValueError: ``end <= start``, ratios out of order or outside ``[0, 1)``, or
            ``schedule_rounds`` not a positive integer.
    """
    if end <= start:
        raise ValueError(f"pruning end round ({end}) must come after its start ({start})")
    if not 0 <= begin_ratio <= end_ratio < 1:
        raise ValueError(f"need 0 <= begin_ratio <= end_ratio < 1 (got {begin_ratio}, {end_ratio})")
    t: Fraction | int = round_
    if schedule_rounds is not None:
        if isinstance(schedule_rounds, bool) or not isinstance(schedule_rounds, int):
            raise ValueError(
                f"schedule_rounds must be a positive integer or None (got {schedule_rounds!r})"
            )
        if schedule_rounds < 1:
            raise ValueError(f"schedule_rounds must be >= 1 (got {schedule_rounds})")
        t = Fraction(round_ * end, schedule_rounds)
    if t < start:
        return 0.0
    if t >= end:
        return end_ratio
    return float(begin_ratio + (end_ratio - begin_ratio) * (t - start) / (end - start))


def prune_ratios(rounds: int, schedule_rounds: int | None = None) -> list[float]:
    """The pruned fraction of rounds ``1..rounds`` (what FedShield-LLM's upload headers state)."""
    return [prune_ratio(t, schedule_rounds=schedule_rounds) for t in range(1, rounds + 1)]


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
