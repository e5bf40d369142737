"""Gradient-inversion attacks on what the server sees (DAGER and the update helpers it reads).

:mod:`~shelora_core.attacks.gradients` turns a client's training step into the server's view
(:class:`ObservedUpdate`, with hidden columns and local DP applied as the protocol does);
:mod:`~shelora_core.attacks.dager` inverts it. The attack functions read only that view and the
public pretrained weights.
"""

from __future__ import annotations

from .dager import (
    ATTACKERS,
    SELECTIONS,
    UPDATES,
    AttackResult,
    dager_attack,
    run_attack,
    score_reconstruction,
    token_set_scores,
)
from .gradients import (
    LayerUpdate,
    ObservedUpdate,
    add_dp_noise,
    capture_update,
    encode_batch,
    hide_columns,
    multistep_update,
    update_from_weights,
)

__all__ = [
    "ATTACKERS",
    "SELECTIONS",
    "UPDATES",
    "AttackResult",
    "LayerUpdate",
    "ObservedUpdate",
    "add_dp_noise",
    "capture_update",
    "dager_attack",
    "encode_batch",
    "hide_columns",
    "multistep_update",
    "run_attack",
    "score_reconstruction",
    "token_set_scores",
    "update_from_weights",
]
