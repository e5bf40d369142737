"""How many values a client encrypts per round: the HE budget both selective methods share.

SHE-LoRA's budget counts columns (``he_budgets``); MaskCrypt, the baseline it is compared with, encrypts
per client exactly as many individual values, so their costs compare like with like. Neither method
module imports the other: both read the count here.
"""

from __future__ import annotations

from collections.abc import Mapping

from ..config import FederatedConfig

__all__ = ["encrypted_values"]


def encrypted_values(
    cfg: FederatedConfig, client_id: int, shapes: Mapping[str, tuple[int, int]]
) -> int:
    """Values client ``client_id`` encrypts per round under SHE-LoRA (its HE budget in values).

    ``delta``: k_i protected dW columns of m values in every layer, ``sum_layers k_i * m``;
    ``paper``: k_i protected A columns of r_i values, ``k_i * r_i * layers``. MaskCrypt encrypts
    exactly this many (:mod:`shelora_core.methods.maskcrypt`), so costs compare like with like.

    Args:
        cfg: the run (budgets, ranks and cipher mode; ``cfg.method`` is not consulted).
        client_id: the client.
        shapes: ``(m, n)`` of every adapted layer.
    """
    k = cfg.client_budget(client_id)
    if cfg.cipher_mode == "delta":
        return int(sum(k * m for m, _ in shapes.values()))
    return int(k * cfg.client_rank(client_id) * len(shapes))
