"""Option names of the DAGER attack and their validation.

The attacker and the span-check route are read by :class:`~shelora_core.attacks.span.SpanCheck`,
the token / extension selection by the stages of :mod:`~shelora_core.attacks.dager` (DAGER,
Petrov et al., NeurIPS 2024).
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["ATTACKERS", "ROUTES", "SELECTIONS"]

#: Attackers: DAGER as written on what the server sees, or aware of the hidden columns.
ATTACKERS: tuple[str, ...] = ("oblivious", "adaptive")
#: Token / extension selection: fixed distance threshold, or the rank-many closest.
SELECTIONS: tuple[str, ...] = ("threshold", "rank")
#: Which observed gradient the span check uses.
ROUTES: tuple[str, ...] = ("auto", "grad_w", "grad_a", "grad_b")


def _check_choice(value: str, choices: Sequence[str], what: str) -> str:
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}; choose one of {list(choices)}")
    return value
