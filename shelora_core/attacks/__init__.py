"""Gradient-inversion attacks on what the server sees (DAGER and the update helpers it reads).

:mod:`~shelora_core.attacks.gradients` turns a client's training step into the server's view
(:class:`ObservedUpdate`, with hidden columns and local DP applied as the protocol does);
:mod:`~shelora_core.attacks.dager` inverts it with span checks,
:mod:`~shelora_core.attacks.optimisation` by gradient matching. The attack functions read only
that view and the public pretrained weights.
"""

from __future__ import annotations

from ..methods.first_layers import FirstLayersSHELoRA
from .dager import (
    ATTACKERS,
    SELECTIONS,
    AttackResult,
    dager_attack,
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
from .grid import attack_plan, run_grid, summarize
from .optimisation import MatchTarget, OptimisationSettings, optimisation_attack
from .protection import deep_layer_probe, protection_cost
from .threat import METHODS, THREAT_ATTACKERS, attack_upload, server_view

__all__ = [
    "ATTACKERS",
    "METHODS",
    "SELECTIONS",
    "THREAT_ATTACKERS",
    "AttackResult",
    "FirstLayersSHELoRA",
    "LayerUpdate",
    "MatchTarget",
    "ObservedUpdate",
    "OptimisationSettings",
    "add_dp_noise",
    "attack_plan",
    "attack_upload",
    "capture_update",
    "dager_attack",
    "deep_layer_probe",
    "encode_batch",
    "hide_columns",
    "multistep_update",
    "optimisation_attack",
    "protection_cost",
    "run_grid",
    "score_reconstruction",
    "server_view",
    "summarize",
    "token_set_scores",
    "update_from_weights",
]
