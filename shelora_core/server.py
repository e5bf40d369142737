"""The server side of a round: bytes in, bytes out, with the PUBLIC CKKS context only.

Every function here is one server step of the round engine (``docs/design.md``, "One round on
the wire"): the in-process loop (:mod:`shelora_core.federation`), the HE cost benchmark, the attack
grid and a remote driver call the same functions. The server holds no secret key and no OPE key,
and this module imports no torch, transformers or peft (a test runs every method's server step in
a process where those imports fail).

Steps, in the order a round uses them:

* :func:`sample_clients`: who is asked to train this round;
* :func:`server_negotiate` (SHE-LoRA, before round 1 and at re-negotiations): the ordered column
  list from the clients' OPE-encrypted proposals;
* :func:`server_consensus` (MaskCrypt, every round): the mask consensus from the clients' proposals;
* :func:`server_round` (:func:`server_step` returns just its bytes): the round's aggregate (the
  broadcast) from the clients' uploads. Every upload is checked on its own
  (:mod:`shelora_core.validation`); the bad ones are refused by name and recorded, the rest are
  aggregated, re-weighted, when at least ``cfg.min_clients`` remain.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .config import FederatedConfig
from .errors import ProtocolError, RoundError
from .messages import decode, encode
from .methods import get_method
from .validation import validate_uploads

__all__ = [
    "ServerResult",
    "sample_clients",
    "server_consensus",
    "server_negotiate",
    "server_round",
    "server_step",
    "with_client_refusals",
]


@dataclass
class ServerResult:
    """What the server's round step produced.

    Attributes:
        broadcast: the broadcast bytes.
        clients: the ids of the clients whose uploads were aggregated.
        rejected: one ``{"client_id", "reason", "error"}`` record per refused upload.
    """

    broadcast: bytes
    clients: list[int] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)


def sample_clients(cfg: FederatedConfig, round_: int) -> list[int]:
    """The clients asked to train in ``round_`` (seeded; sorted)."""
    if cfg.clients_per_round >= cfg.num_clients:
        return list(range(cfg.num_clients))
    rng = np.random.default_rng([cfg.seed, round_, 2])
    return sorted(int(i) for i in rng.choice(cfg.num_clients, cfg.clients_per_round, replace=False))


def _check_round(msgs: Sequence[Any], round_: int | None, what: str) -> None:
    """Every message comes from a distinct client and, unless ``round_`` is ``None``, is for it."""
    seen: set[Any] = set()
    for m in msgs:
        cid, rnd = m.header.get("client_id"), m.header.get("round")
        if round_ is not None and rnd != round_:
            raise ProtocolError(
                f"{what} from client {cid} is for round {rnd}, not {round_}",
                client_id=cid,
                reason="round",
            )
        if cid in seen:
            where = "" if round_ is None else f" in round {round_}"
            raise ProtocolError(
                f"two {what}s from client {cid}{where}: each client counts once; drop the duplicate",
                client_id=cid,
                reason="duplicate",
            )
        seen.add(cid)


def min_clients(cfg: FederatedConfig) -> int:
    """The fewest valid uploads a round may be aggregated from (``cfg.min_clients``, default 1)."""
    return cfg.min_clients


def with_client_refusals(exc: RoundError, failed: Sequence[Mapping[str, Any]]) -> RoundError:
    """``exc`` (raised by :func:`server_round`, which knows only the uploads that reached it) with
    the sampled clients that refused to upload at all, e.g. to encrypt a diverged update."""
    if not failed:
        return exc
    own = "; ".join(f"client {f['client_id']}: {f['error']}" for f in failed)
    return RoundError(
        f"{exc}; {len(failed)} sampled client(s) refused to upload: {own}",
        rejected=[*failed, *exc.rejected],
    )


def server_round(
    cfg: FederatedConfig,
    uploads: Sequence[bytes],
    *,
    round_: int,
    crypto: Any = None,
    consensus: bytes | None = None,
    sampled: Iterable[int] | None = None,
    senders: Sequence[Any] | None = None,
    layers: Mapping[str, tuple[int, int]] | None = None,
    head: Mapping[str, tuple[int, ...]] | None = None,
) -> ServerResult:
    """Check every upload on its own, then aggregate the valid ones into broadcast bytes.

    Args:
        cfg: the run's public configuration.
        uploads: the upload bytes of the clients that answered (any order).
        round_: the 1-based round number; every upload must be for it.
        crypto: the server's PUBLIC CKKS context (:class:`shelora_core.ckks.ServerCrypto`) for
            encrypted methods; it cannot decrypt.
        consensus: MaskCrypt, the mask consensus the server itself broadcast this round.
        sampled: the clients asked to train this round (an upload from another is refused);
            ``None`` accepts any client of the federation.
        senders: who delivered each upload, as the transport knows it (names a sender whose
            bytes do not decode).
        layers: ``(m, n)`` of every adapted layer from the public model (``None``: what most
            uploads agree on).
        head: the classification head's tensor shapes from the public model (``None``: what most
            uploads agree on).

    Returns:
        A :class:`ServerResult`: the broadcast, weighted over the clients whose uploads were
        valid, and the record of every refused upload.

    Raises:
        RoundError: fewer than ``cfg.min_clients`` valid uploads; it lists every refusal.
    """
    method = get_method(cfg.method, cfg)
    cons = None
    if method.needs_consensus:
        if consensus is None:
            raise ValueError(f"{cfg.method}'s server step needs this round's mask consensus")
        cons = decode(consensus, expect_kind="mask_consensus")
    valid, rejected = validate_uploads(
        cfg,
        method,
        uploads,
        round_=round_,
        sampled=sampled,
        crypto=crypto,
        consensus=cons,
        senders=senders,
        layers=layers,
        head=head,
    )
    need = min_clients(cfg)
    if len(valid) < need:
        lines = "; ".join(f"client {r['client_id']}: {r['error']}" for r in rejected) or "none"
        raise RoundError(
            f"round {round_}: {len(valid)} valid upload(s) of {len(uploads)}, fewer than "
            f"min_clients = {need}; refused: {lines}",
            rejected=rejected,
        )
    msg = method.server_aggregate(
        valid, round_=round_, max_rank=max(cfg.client_ranks), crypto=crypto, consensus=cons
    )
    clients = [int(m.header["client_id"]) for m in valid]
    return ServerResult(encode(msg), clients, rejected)


def server_step(
    cfg: FederatedConfig,
    uploads: Sequence[bytes],
    *,
    round_: int,
    crypto: Any = None,
    consensus: bytes | None = None,
    sampled: Iterable[int] | None = None,
) -> bytes:
    """The broadcast bytes of :func:`server_round` (bad uploads refused, the rest aggregated)."""
    return server_round(
        cfg, uploads, round_=round_, crypto=crypto, consensus=consensus, sampled=sampled
    ).broadcast


def server_consensus(cfg: FederatedConfig, proposals: Sequence[bytes], *, round_: int) -> bytes:
    """MaskCrypt: merge the round's mask proposals into the consensus (broadcast bytes)."""
    method = get_method(cfg.method, cfg)
    if not method.needs_consensus:
        raise ValueError(f"method {cfg.method!r} has no mask consensus step")
    msgs = [decode(b, expect_kind="mask_proposal") for b in proposals]
    _check_round(msgs, round_, "mask proposal")
    return encode(method.server_consensus(msgs, round_=round_))


def server_negotiate(cfg: FederatedConfig, proposals: Sequence[bytes]) -> tuple[bytes, Any]:
    """SHE-LoRA: negotiate one ordered column list per layer on OPE ciphertexts alone.

    Returns:
        ``(broadcast bytes, NegotiationResult)``; the result (Coverage, Risk, the chosen (a, b)
        per tier) is the server's own record, the bytes are what the clients receive.
    """
    from .methods.shelora_negotiation import negotiate_proposals

    msgs = [decode(b, expect_kind="proposal") for b in proposals]
    _check_round(msgs, None, "negotiation proposal")  # proposals precede round 1: no round
    msg, result = negotiate_proposals(cfg, msgs)
    return encode(msg), result
