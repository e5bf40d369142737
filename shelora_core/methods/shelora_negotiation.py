"""SHE-LoRA's negotiation phase over the wire, before the first training round (and every
K rounds with ``renegotiate_every``).

1. Each client scores its columns on its own data (:mod:`shelora_core.sensitivity`; before
   round 1 its initial adapter, at a re-negotiation the current global one) and sends its
   top-k_i proposal per layer as OPE ciphertexts (:mod:`shelora_core.ope`; clients share the key,
   the server never holds it).
2. The server negotiates ONE ordered list per layer on the ciphertexts alone
   (:mod:`shelora_core.negotiation`, which never imports the OPE module) and broadcasts it.
3. Each client decrypts the list with the OPE key: ``G`` per layer; it encrypts ``G[:k_i]``.
4. Each client checks the list before it uses it (:func:`check_coverage`): its prefix ``G[:k_i]``
   must cover at least ``cfg.min_column_coverage`` (default :data:`MIN_COLUMN_COVERAGE`) of its
   own proposal's top-k_i columns, pooled over the layers (the paper's Coverage_i,
   :mod:`shelora_core.negotiation`, computed by the client from its own proposal). A server that
   steers the negotiation (e.g. replaces the list with the least sensitive columns, so that the
   sensitive ones travel in plaintext) is refused with a
   :class:`~shelora_core.negotiation.NegotiationError` naming the coverage. The honest
   negotiations recorded in ``results/quick`` and ``results/paper`` (3 budget tiers, Dirichlet 0.3)
   give every client a pooled coverage of at least 0.83 (0.5 in its worst layer); a list of the
   least sensitive columns gives about 0.

Messages are :class:`shelora_core.messages.Message` bytes like every other step; their lengths are
the negotiation's communication cost. OPE ciphertexts (< 2^48) travel as int64.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..config import MIN_COLUMN_COVERAGE, FederatedConfig
from ..messages import Message, MessageError, require
from ..negotiation import ClientProposal, NegotiationError, NegotiationResult, negotiate

__all__ = [
    "MIN_COLUMN_COVERAGE",
    "check_coverage",
    "client_columns",
    "client_proposal",
    "column_coverage",
    "negotiate_proposals",
    "own_targets",
    "proposals_by_layer",
]


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
        if cfg.secret_init:  # the public seed would score another A than the clients train
            raise ValueError(
                "secret_init: score the client's initial adapter derived from the shared key; "
                "pass weights=model.init_weights(rank, seed=client.secret_init_seed(init_key))"
            )
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


def own_targets(proposal: Message, ope: Any) -> dict[str, list[int]]:
    """A client's own proposal (the message it sent), decrypted: layer -> its top-k_i columns,
    most sensitive first."""
    require(proposal.header, "budget")
    k = int(proposal.header["budget"])
    return {
        layer: [int(j) for j in ope.decrypt_indices([int(c) for c in arr[:k, 0]])]
        for layer, arr in proposal.tensors.items()
    }


def column_coverage(
    columns: dict[str, list[int]], targets: dict[str, list[int]], budget: int
) -> tuple[float, dict[str, float]]:
    """``(pooled, per layer)`` coverage of a client's targets by its prefix ``G[:budget]``:
    ``sum_l |G_l[:k] & P_l| / sum_l |P_l|`` (1.0 without targets)."""
    per_layer, hit, total = {}, 0, 0
    for layer, p in targets.items():
        got = len(set(p) & set(columns.get(layer, [])[:budget]))
        per_layer[layer] = got / len(p) if p else 1.0
        hit, total = hit + got, total + len(p)
    return (hit / total if total else 1.0), per_layer


def check_coverage(
    cfg: FederatedConfig,
    columns: dict[str, list[int]],
    proposal: Message,
    ope: Any,
) -> float:
    """A client's check of the negotiated list against its own proposal; returns its coverage.

    Raises:
        NegotiationError: the list covers less than ``cfg.min_column_coverage`` of the client's
            own top-k_i columns (a server steering the negotiation), or omits a layer it
            proposed for; naming the coverage, the worst layer and the fix.
    """
    cid = proposal.header.get("client_id")
    budget = int(proposal.header["budget"])
    targets = own_targets(proposal, ope)
    missing = sorted(set(targets) - set(columns))
    if missing:
        raise NegotiationError(
            f"client {cid}: the negotiated list has no columns for layers {missing[:3]} it "
            "proposed for; the server's negotiation broadcast is incomplete: refuse it and "
            "negotiate again"
        )
    pooled, per_layer = column_coverage(columns, targets, budget)
    need = float(cfg.min_column_coverage)
    if pooled < need:
        worst = min(per_layer, key=per_layer.get)
        raise NegotiationError(
            f"client {cid}: the negotiated list covers {pooled:.2f} of its own {budget} most "
            f"sensitive columns per layer (worst layer {worst!r}: {per_layer[worst]:.2f}); the "
            f"client requires min_column_coverage = {need:g}. A server that steers the "
            "negotiation would leave the sensitive columns in plaintext: the client refuses this "
            "list. Negotiate again with an honest server, or lower min_column_coverage if the "
            "clients' data disagree this much"
        )
    return pooled
