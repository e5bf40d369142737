"""One round (or one SHE-LoRA negotiation) in one process: the round engine's steps in order.

:func:`run_round` is what the HE cost benchmark, notebook 04 and the protection cost use when
there is no training to do: each client uploads its given adapter (:func:`shelora_core.client.upload`),
the server aggregates the bytes with its public context (:func:`shelora_core.server.server_step`),
and each client reads the broadcast back (:func:`shelora_core.client.receive`). MaskCrypt's mask
exchange (:func:`~shelora_core.client.propose_masks` -> :func:`~shelora_core.server.server_consensus`)
runs before the uploads. The training loop (:mod:`shelora_core.federation`) calls the very same
steps, with local training between ``receive`` and ``upload``.

Every cost in a :class:`RoundTrace` is measured: bytes are ``len()`` of the serialized messages,
seconds are wall-clock around each step.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .adapters import AdapterWeights
from .client import (
    check_negotiated_columns,
    negotiated_columns,
    negotiation_proposal,
    propose_masks,
    receive,
    upload,
)
from .config import FederatedConfig
from .messages import Message, decode
from .methods import get_method
from .methods.wire import is_ciphertext
from .server import server_consensus, server_negotiate, server_step

__all__ = ["NegotiationTrace", "RoundTrace", "run_negotiation", "run_round"]


@dataclass
class RoundTrace:
    """Everything one round sent and measured.

    Attributes:
        uploads: each client's upload bytes (in ``client_ids`` order).
        broadcast: the server's broadcast bytes.
        received: each client's adapter read from the broadcast (empty when not asked for).
        proposals, consensus: MaskCrypt's mask proposals and consensus bytes (else empty / None).
        seconds: ``upload`` and ``receive`` (per client), ``mask`` (per client, MaskCrypt),
            ``consensus`` and ``server`` (per round).
    """

    uploads: list[bytes]
    broadcast: bytes
    received: list[AdapterWeights] = field(default_factory=list)
    proposals: list[bytes] = field(default_factory=list)
    consensus: bytes | None = None
    seconds: dict[str, Any] = field(default_factory=dict)

    def broadcast_message(self) -> Message:
        """The decoded broadcast (for a look inside)."""
        return decode(self.broadcast, expect_kind="broadcast")

    def upload_messages(self) -> list[Message]:
        """The decoded uploads (what the server received)."""
        return [decode(u, expect_kind="upload") for u in self.uploads]

    def costs(self) -> dict[str, Any]:
        """Measured bytes and seconds: per client (lists) and per round."""
        ups = self.upload_messages()
        return {
            "upload_bytes": [len(u) for u in self.uploads],
            "upload_cipher_bytes": [
                sum(v.nbytes for k, v in u.tensors.items() if is_ciphertext(k)) for u in ups
            ],
            "ciphertexts_up": [int(u.header.get("ciphertexts", 0)) for u in ups],
            "broadcast_bytes": len(self.broadcast),
            "seconds_upload_per_client": float(np.mean(self.seconds["upload"])),
            "seconds_server": float(self.seconds["server"]),
            "seconds_client_per_client": float(np.mean(self.seconds.get("receive") or [0.0])),
        }


def run_round(
    cfg: FederatedConfig,
    adapters: Sequence[AdapterWeights],
    *,
    round_: int = 1,
    client_ids: Sequence[int] | None = None,
    num_examples: Sequence[int] | None = None,
    client_crypto: Any = None,
    server_crypto: Any = None,
    columns: Mapping[str, Sequence[int]] | None = None,
    starts: Sequence[AdapterWeights] | None = None,
    grads: Sequence[Mapping[str, tuple[np.ndarray, np.ndarray]]] | None = None,
    receive_ranks: Sequence[int] | None = None,
) -> RoundTrace:
    """Upload ``adapters`` (one per client), aggregate, and read the broadcast back.

    Args:
        cfg: the run's public configuration (method, ranks, budgets, cipher mode).
        adapters: each answering client's trained adapter.
        round_: the round number written into the messages.
        client_ids: the clients' ids (default ``0 .. len(adapters) - 1``).
        num_examples: each client's sample count (the aggregation weights); default 100 each.
        client_crypto: the clients' secret CKKS context (:class:`~shelora_core.ckks.ClientCrypto`).
        server_crypto: the server's public context (:class:`~shelora_core.ckks.ServerCrypto`).
        columns: SHE-LoRA's ordered column list G per layer.
        starts: the adapters the clients started from (MaskCrypt's adversary estimate; DP's
            update reference). Default: the adapters themselves.
        grads: MaskCrypt: each client's gradient per layer ``(dL/dB, dL/dA)``.
        receive_ranks: the ranks at which to read the broadcast back (default: each uploading
            client's own rank; ``()`` reads nothing).
    """
    n = len(adapters)
    ids = list(range(n)) if client_ids is None else [int(i) for i in client_ids]
    sizes = [100] * n if num_examples is None else [int(x) for x in num_examples]
    if starts is None and cfg.method == "flexlora-dp":
        raise ValueError(
            "flexlora-dp privatizes each client's update (trained - start): pass starts= (the "
            "adapters the clients started the round from)"
        )
    starts = list(adapters) if starts is None else list(starts)
    if not (len(ids) == len(sizes) == len(starts) == n):
        raise ValueError(
            f"one client id, sample count and start adapter per adapter: got {len(ids)}, "
            f"{len(sizes)} and {len(starts)} for {n} adapters"
        )
    method = get_method(cfg.method, cfg)
    seconds: dict[str, Any] = {}
    proposals: list[bytes] = []
    consensus = None
    if method.needs_consensus:
        if grads is None or len(grads) != n:
            raise ValueError(f"{cfg.method} needs one gradient per client (grads=) for its masks")
        t_mask = []
        for w, w0, g, cid in zip(adapters, starts, grads, ids, strict=True):
            t0 = time.perf_counter()
            proposals.append(propose_masks(cfg, w, w0, g, round_=round_, client_id=cid))
            t_mask.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        consensus = server_consensus(cfg, proposals, round_=round_)
        seconds.update(mask=t_mask, consensus=time.perf_counter() - t0)
    uploads, t_up = [], []
    for w, w0, cid, size in zip(adapters, starts, ids, sizes, strict=True):
        t0 = time.perf_counter()
        uploads.append(
            upload(
                cfg,
                w,
                round_=round_,
                client_id=cid,
                num_examples=size,
                crypto=client_crypto,
                columns=columns,
                consensus=consensus,
                start=w0,
            )
        )
        t_up.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    broadcast = server_step(cfg, uploads, round_=round_, crypto=server_crypto, consensus=consensus)
    seconds.update(upload=t_up, server=time.perf_counter() - t0)
    ranks = [w.rank for w in adapters] if receive_ranks is None else list(receive_ranks)
    received, t_down = [], []
    for r in ranks:
        t0 = time.perf_counter()
        received.append(receive(cfg, broadcast, rank=r, crypto=client_crypto))
        t_down.append(time.perf_counter() - t0)
    seconds["receive"] = t_down
    return RoundTrace(uploads, broadcast, received, proposals, consensus, seconds)


@dataclass
class NegotiationTrace:
    """Everything one SHE-LoRA negotiation sent and measured.

    Attributes:
        columns: the ordered column list G per layer, as the clients decrypt it.
        proposals: each client's OPE-encrypted proposal bytes.
        broadcast: the server's negotiation bytes.
        result: the server's own record (Coverage, Risk, the chosen (a, b) per tier).
        seconds: ``proposal`` (per client), ``server``, ``decrypt`` (one client) and
            ``coverage`` (per client: its check of G against its own proposal).
    """

    columns: dict[str, list[int]]
    proposals: list[bytes]
    broadcast: bytes
    result: Any
    seconds: dict[str, Any]


def run_negotiation(
    cfg: FederatedConfig,
    model: Any,
    clients: Sequence[Any],
    *,
    ope: Any,
    weights: Sequence[AdapterWeights | None] | None = None,
) -> NegotiationTrace:
    """Every client proposes (sensitivity on its own data, OPE), the server negotiates on the
    ciphertexts, a client decrypts G and every client checks that G covers its own proposal
    (``cfg.min_column_coverage``): the steps the federation loop and the attack grid share.

    Raises:
        NegotiationError: a client refuses the list (too little of its proposal covered).

    Args:
        cfg: the run's public configuration (ranks, budgets, calibration size).
        model: the client-side :class:`~shelora_core.lora.LoraModel`.
        clients: each client's :class:`~shelora_core.data.ClientData` (client ``i`` = index ``i``).
        ope: the clients' shared :class:`~shelora_core.ope.ColumnOPE` (never the server's).
        weights: per client, the adapter to score (``None``: its round-0 adapter).
    """
    weights = [None] * len(clients) if weights is None else list(weights)
    proposals, t_prop = [], []
    for i, (data, w) in enumerate(zip(clients, weights, strict=True)):
        t0 = time.perf_counter()
        proposals.append(negotiation_proposal(cfg, model, data, client_id=i, ope=ope, weights=w))
        t_prop.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    broadcast, result = server_negotiate(cfg, proposals)
    t1 = time.perf_counter()
    columns = negotiated_columns(broadcast, ope)
    t2 = time.perf_counter()
    t_check = []
    for p in proposals:  # every client checks G against its own proposal (a steering server)
        t3 = time.perf_counter()
        check_negotiated_columns(cfg, columns, p, ope)
        t_check.append(time.perf_counter() - t3)
    seconds = {"proposal": t_prop, "server": t1 - t0, "decrypt": t2 - t1, "coverage": t_check}
    return NegotiationTrace(columns, proposals, broadcast, result, seconds)
