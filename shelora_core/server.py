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
* :func:`server_step`: the round's aggregate (the broadcast) from the clients' uploads.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .config import FederatedConfig
from .messages import MessageError, decode, encode
from .methods import get_method

__all__ = ["sample_clients", "server_consensus", "server_negotiate", "server_step"]


def sample_clients(cfg: FederatedConfig, round_: int) -> list[int]:
    """The clients asked to train in ``round_`` (seeded; sorted)."""
    if cfg.clients_per_round >= cfg.num_clients:
        return list(range(cfg.num_clients))
    rng = np.random.default_rng([cfg.seed, round_, 2])
    return sorted(int(i) for i in rng.choice(cfg.num_clients, cfg.clients_per_round, replace=False))


def _check_round(msgs: Sequence[Any], round_: int | None, what: str) -> None:
    """Every message comes from a distinct client and, unless ``round_`` is ``None``, is for it."""
    seen: set[int] = set()
    for m in msgs:
        cid, rnd = m.header.get("client_id"), m.header.get("round")
        if round_ is not None and rnd != round_:
            raise ValueError(f"{what} from client {cid} is for round {rnd}, not {round_}")
        if cid in seen:
            where = "" if round_ is None else f" in round {round_}"
            raise MessageError(
                f"two {what}s from client {cid}{where}: each client counts once; drop the duplicate"
            )
        seen.add(cid)


def server_step(
    cfg: FederatedConfig,
    uploads: Sequence[bytes],
    *,
    round_: int,
    crypto: Any = None,
    consensus: bytes | None = None,
) -> bytes:
    """Aggregate the uploads of the clients that answered ``round_`` into broadcast bytes.

    Args:
        cfg: the run's public configuration.
        uploads: the upload bytes of the clients that answered (any order).
        round_: the 1-based round number; every upload must be for it.
        crypto: the server's PUBLIC CKKS context (:class:`shelora_core.ckks.ServerCrypto`) for
            encrypted methods; it cannot decrypt.
        consensus: MaskCrypt, the mask consensus the server itself broadcast this round.

    Returns:
        The broadcast bytes. Weights are re-normalised over the clients that answered.
    """
    method = get_method(cfg.method, cfg)
    msgs = [decode(u, expect_kind="upload") for u in uploads]
    _check_round(msgs, round_, "upload")
    extra: dict[str, Any] = {}
    if method.needs_consensus:
        if consensus is None:
            raise ValueError(f"{cfg.method}'s server step needs this round's mask consensus")
        extra["consensus"] = decode(consensus, expect_kind="mask_consensus")
    return encode(
        method.server_aggregate(
            msgs, round_=round_, max_rank=max(cfg.client_ranks), crypto=crypto, **extra
        )
    )


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
