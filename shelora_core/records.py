"""A run's records, without torch: one round's record, a negotiation's summary, the run's summary.

The in-process loop (:class:`shelora_core.federation.Federation`) and the Flower ServerApp
(:mod:`shelora_core.flower.server_app`) write the same records with these functions; the ServerApp
imports nothing that pulls in torch or a model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .accounting import run_privacy
from .config import BUDGETED, FederatedConfig, learning_rate

__all__ = [
    "METHOD_RESULTS_VERSION",
    "RESULTS_VERSION",
    "RunResult",
    "rows_current",
    "negotiation_record",
    "negotiation_summary",
    "results_version",
    "round_record",
]

#: stamped on every round record; bumped when the code changes what one configuration computes
#: (2: MiniLM's head reads mean pooling), so a finished run from older code is never reused
RESULTS_VERSION = 2

#: methods whose results changed after :data:`RESULTS_VERSION` was last bumped, with their own
#: version (3: FedShield-LLM and full HE revive the components no answering client had from the
#: round's shared seed, as FedAvg does, instead of leaving them as CKKS noise; 4: they encrypt each
#: client's factors at its own rank instead of zero-padded to the largest: fewer bytes, the same
#: aggregate up to CKKS noise)
METHOD_RESULTS_VERSION = {"fedshield": 4, "full_he": 4}


def results_version(method: str) -> int:
    """The results version stamped on (and required of) a run of ``method``."""
    return METHOD_RESULTS_VERSION.get(method, RESULTS_VERSION)


def rows_current(rows: list[dict[str, Any]], method: str) -> bool:
    """Whether every per-round row of a run of ``method`` carries this code's results version
    (a run whose rows do not is re-run, never reused or reported)."""
    version = results_version(method)
    return all(r.get("results_version") == version for r in rows)


@dataclass
class RunResult:
    """What a run leaves: the config, one record per round and a summary."""

    config: FederatedConfig
    history: list[dict[str, Any]]
    partition_counts: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)
    #: ``{"round", "error", "rejected"}`` when the run stopped at a round it could not aggregate
    #: (``Federation.run(on_round_error="stop")``); ``history`` then ends before that round
    stopped: dict[str, Any] | None = None

    @property
    def final_accuracy(self) -> float:
        return self.history[-1]["accuracy"]

    def summary(self) -> dict[str, Any]:
        cfg = self.config
        evals = [h for h in self.history if h.get("accuracy") is not None]
        return {
            "run_name": cfg.run_name,
            "method": cfg.method,
            "variant": cfg.variant,
            "model": cfg.model,
            "dataset": cfg.dataset,
            "ranks": list(cfg.ranks),
            "partition": cfg.partition
            if cfg.partition == "iid"
            else f"dirichlet({cfg.dirichlet_alpha:g})",
            "num_clients": cfg.num_clients,
            "rounds": len(self.history),
            "local_steps": cfg.local_steps,
            "final_accuracy": evals[-1]["accuracy"] if evals else None,
            "final_macro_f1": evals[-1]["macro_f1"] if evals else None,
            "best_accuracy": max(h["accuracy"] for h in evals) if evals else None,
            "upload_bytes_per_round": float(np.mean([h["upload_bytes"] for h in self.history])),
            "upload_bytes_per_client": float(
                np.mean([h["upload_bytes"] / h["clients"] for h in self.history])
            ),
            "broadcast_bytes": self.history[-1]["broadcast_bytes"],
            "seconds_per_client_round": float(np.mean([h["client_seconds"] for h in self.history])),
            "client_upload_seconds": float(
                np.mean([h.get("client_upload_seconds", 0.0) for h in self.history])
            ),
            "client_receive_seconds": float(
                np.mean([h.get("client_receive_seconds", 0.0) for h in self.history])
            ),
            "server_seconds": float(np.mean([h["server_seconds"] for h in self.history])),
            "key_bytes_public": self.history[-1].get("key_bytes_public", 0),
            "cipher_mode": cfg.cipher_mode if cfg.method in BUDGETED else None,
            "he_budgets": list(cfg.he_budgets) if cfg.method in BUDGETED else None,
            "shelora_protect": cfg.shelora_protect if cfg.uses_columns else None,
            "negotiations": sum(1 for h in self.history if "negotiation_upload_bytes" in h),
            "negotiation_bytes": int(
                sum(
                    h.get("negotiation_upload_bytes", 0) + h.get("negotiation_broadcast_bytes", 0)
                    for h in self.history
                )
            ),
            "consensus_bytes_per_round": float(
                np.mean(
                    [
                        h.get("consensus_upload_bytes", 0) + h.get("consensus_broadcast_bytes", 0)
                        for h in self.history
                    ]
                )
            ),
            **({"privacy": self.history[-1]["privacy"]} if "privacy" in self.history[-1] else {}),
            **({"stopped": self.stopped} if self.stopped is not None else {}),
            "config": cfg.to_dict(),
        }


def negotiation_summary(
    round_: int,
    *,
    proposals: list[bytes],
    broadcast: bytes,
    result: Any,
    client_seconds: list[float],
    server_seconds: float,
) -> dict[str, Any]:
    """What a SHE-LoRA negotiation before ``round_`` cost and chose (kept with the columns, in
    the run's meta): bytes, seconds, Coverage, Risk and the (a, b) of every tier.

    Args:
        proposals: the clients' proposal bytes; broadcast: the server's negotiation bytes;
        result: the server's :class:`~shelora_core.negotiation.NegotiationResult`;
        client_seconds: each client's proposal seconds; server_seconds: the server's.
    """
    return {
        "round": round_,
        "proposal_bytes_per_client": float(np.mean([len(u) for u in proposals])),
        "upload_bytes": int(sum(len(u) for u in proposals)),
        "broadcast_bytes": len(broadcast),
        "client_seconds": float(np.mean(client_seconds)),
        "server_seconds": server_seconds,
        "coverage": result.coverage,
        "risk": result.risk,
        "tiers": {layer: [(t.a, t.b) for t in tiers] for layer, tiers in result.tiers.items()},
    }


def negotiation_record(negotiation: dict[str, Any] | None, num_clients: int) -> dict[str, Any]:
    """The ``negotiation_*`` fields of the record of the round a negotiation precedes."""
    n = negotiation or {}
    up = n.get("upload_bytes", n.get("proposal_bytes_per_client", 0) * num_clients)
    return {
        "negotiation_upload_bytes": int(up),
        "negotiation_broadcast_bytes": int(n.get("broadcast_bytes", 0)),
        "negotiation_client_seconds": float(n.get("client_seconds", 0.0)),
        "negotiation_server_seconds": float(n.get("server_seconds", 0.0)),
    }


def round_record(
    config: FederatedConfig,
    round_: int,
    *,
    clients: int,
    losses: list[float],
    uploads: list[bytes],
    download_bytes: int,
    broadcast: bytes,
    client_seconds: list[float],
    parts: list[dict[str, float]],
    key_bytes_public: int,
    server_seconds: float,
    extra: dict[str, Any],
) -> dict[str, Any]:
    """A round's record (one line of ``federated_tuning/<run>.jsonl``), before evaluation.

    Args:
        clients: how many uploads were aggregated.
        losses: each answering client's mean training loss.
        uploads: the upload bytes the server received.
        download_bytes: the bytes of the previous broadcast times the clients that read it.
        broadcast: this round's broadcast bytes.
        client_seconds: each answering client's wall-clock seconds.
        parts: each answering client's ``receive`` / ``train`` / ``upload`` split of them.
        key_bytes_public: the public context's size (0 without CKKS).
        server_seconds: the server step's seconds.
        extra: method-specific fields (negotiation, consensus, ``rejected``), appended last.

    ``accuracy`` and ``macro_f1`` are ``None`` until the caller evaluates; ``seconds`` (the
    round's wall clock) is the caller's to add. A DP method's record also carries ``privacy``:
    the (epsilon, delta) spent after this round (:func:`shelora_core.accounting.run_privacy`;
    computing it imports Opacus, and with it torch, in the process that writes the record).
    """
    rec = {
        "round": round_,
        "clients": clients,
        "lr": learning_rate(config, round_),
        "train_loss": float(np.mean(losses)),
        "upload_bytes": int(sum(len(u) for u in uploads)),
        "download_bytes": download_bytes,
        "broadcast_bytes": len(broadcast),
        "client_seconds": float(np.mean(client_seconds)),
        "client_receive_seconds": float(np.mean([x["receive"] for x in parts])),
        "client_upload_seconds": float(np.mean([x["upload"] for x in parts])),
        "key_bytes_public": key_bytes_public,
        "server_seconds": server_seconds,
        "accuracy": None,
        "macro_f1": None,
        "results_version": results_version(config.method),
        **extra,
    }
    privacy = run_privacy(config, round_)  # DP methods: the (epsilon, delta) spent so far
    if privacy is not None:
        rec["privacy"] = privacy
    return rec
