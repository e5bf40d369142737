"""SHE-LoRA's negotiation phase over the wire, before the first training round (and every
K rounds with ``renegotiate_every``).

1. Each client scores its columns on its own data (:mod:`shelora_core.sensitivity`; before
   round 1 its initial adapter, at a re-negotiation the current global one) and sends its
   top-k_i proposal per layer as OPE ciphertexts (:mod:`shelora_core.ope`; clients share the key,
   the server never holds it).
2. The server negotiates ONE ordered list per layer on the ciphertexts alone
   (:mod:`shelora_core.negotiation`, which never imports the OPE module) and broadcasts it.
3. Each client decrypts the list with the OPE key: ``G`` per layer; it encrypts ``G[:k_i]``.

Messages are :class:`shelora_core.messages.Message` bytes like every other step; their lengths are
the negotiation's communication cost. OPE ciphertexts (< 2^48) travel as int64.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..config import FederatedConfig
from ..messages import Message, MessageError, require
from ..negotiation import ClientProposal, NegotiationResult, negotiate

__all__ = ["client_columns", "client_proposal", "negotiate_proposals", "proposals_by_layer"]


def client_proposal(
    cfg: FederatedConfig,
    model: Any,
    data: Any,
    *,
    client_id: int,
    ope: Any,
    weights: Any = None,
) -> Message:
    """A client's OPE-encrypted proposal: sensitivity scores of ``weights`` on its own data.

    ``weights`` is the client's adapter to score: ``None`` = its round-0 adapter (the first
    negotiation); a re-negotiation passes the current global adapter at the client's rank.
    """
    from ..sensitivity import client_sensitivity

    rank, budget = cfg.client_rank(client_id), cfg.client_budget(client_id)
    if weights is None:
        weights = model.init_weights(rank, seed=cfg.seed)
    elif weights.rank != rank:
        raise ValueError(f"client {client_id} has rank {rank}, the adapter has {weights.rank}")
    props = client_sensitivity(
        model, weights, data, budget=budget, num_examples=cfg.calibration_examples, seed=cfg.seed
    )
    tensors = {}
    for layer, (idx, scores) in props.items():
        items = ope.encrypt_proposal([int(i) for i in idx], [float(s) for s in scores])
        tensors[layer] = np.asarray(items, dtype=np.int64).reshape(-1, 2)
    header = {"client_id": client_id, "rank": rank, "budget": budget}
    return Message("proposal", header, tensors)


def negotiate_proposals(
    cfg: FederatedConfig, proposals: Sequence[Message]
) -> tuple[Message, NegotiationResult]:
    """Negotiate on ciphertexts; the broadcast holds the ordered index ciphertexts per layer."""
    result = negotiate(proposals_by_layer(proposals), grid_step=cfg.negotiation_grid_step)
    tensors = {layer: np.asarray(cols, dtype=np.int64) for layer, cols in result.columns.items()}
    return Message("negotiation", {"layers": sorted(tensors)}, tensors), result


def proposals_by_layer(proposals: Sequence[Message]) -> dict[str, list[ClientProposal]]:
    """The server's view of decoded proposal messages: layer -> one ClientProposal per client.

    The same parsing :func:`negotiate_proposals` does, exposed so a notebook can rerun the
    negotiation on the very ciphertexts that crossed the wire (e.g. with ``search="random"``).
    """
    per_layer: dict[str, list[ClientProposal]] = {}
    for msg in proposals:
        require(msg.header, "client_id", "rank", "budget")
        h = msg.header
        for layer, arr in msg.tensors.items():
            if arr.ndim != 2 or arr.shape[1] != 2:
                raise MessageError(f"proposal for {layer!r} has shape {arr.shape}, expected (k, 2)")
            per_layer.setdefault(layer, []).append(
                ClientProposal(
                    client_id=str(h["client_id"]),
                    rank=int(h["rank"]),
                    budget=int(h["budget"]),
                    items=[(int(a), int(b)) for a, b in arr],
                )
            )
    return per_layer


def client_columns(msg: Message, ope: Any) -> dict[str, list[int]]:
    """Decrypt the negotiated lists: layer -> ordered column indices ``G``."""
    return {
        layer: [int(j) for j in ope.decrypt_indices([int(c) for c in arr])]
        for layer, arr in msg.tensors.items()
    }
