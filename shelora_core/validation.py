"""The server's per-client checks: every upload validated on its own, the bad ones refused by name.

A round must survive one bad client. :func:`validate_uploads` decodes and checks each upload
separately and returns the valid ones with a record of every refusal; the server step
(:func:`shelora_core.server.server_round`) aggregates what remains when at least
``cfg.min_clients`` uploads are valid, re-weighted over them, and otherwise fails the round with
one :class:`~shelora_core.errors.RoundError` listing every refusal.

What is checked, per upload (``docs/design.md``, "Faults and what happens"):

* the bytes: magic, version, length, digest, kind, finite values (:func:`shelora_core.messages.decode`);
* the sender: ``client_id`` an integer in ``[0, num_clients)``, asked this round (``sampled``),
  and not sending twice (every copy of a repeated id is refused: which one is genuine cannot be
  told);
* the round and the method; ``num_examples`` a positive integer; the rank and LoRA alpha the
  configuration gives this client; the key fingerprint;
* the geometry: every layer's ``(m, n)`` and the head's tensor shapes, against the public
  model's when the server is given them (the federation loop does) and otherwise against what most
  uploads agree on; factor shapes against the client's rank;
* plaintext values: ``|x| <= MAX_ABS_VALUE`` (a finite 3e38 would overflow every sum to Inf);
* the method's own fields (:meth:`shelora_core.methods.base.Method.check_upload`): budgets,
  column lists, cipher mode, mask digest, ciphertext counts, and that every ciphertext loads
  under the server's public context.

What is not checked, and cannot be by a server without the secret key: that a well-formed
ciphertext encrypts what the protocol says (a malicious client is outside the papers'
semi-honest threat model; ``docs/design.md``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .config import FederatedConfig
from .errors import MessageError, ProtocolError, SheloraError
from .messages import Message, decode

__all__ = [
    "MAX_ABS_VALUE",
    "RoundContext",
    "check_int",
    "check_plain_values",
    "validate_uploads",
]

#: the stated bound on every plaintext value an upload carries (LoRA factors, head): honest
#: values are below 10 by orders of magnitude; a larger one is refused before it reaches a sum
MAX_ABS_VALUE = 1e4


@dataclass
class RoundContext:
    """What the server expects of this round's uploads (public information only).

    Attributes:
        cfg: the run's public configuration.
        round_: the round being aggregated.
        crypto: the server's public CKKS context (``None`` for plaintext methods).
        consensus: MaskCrypt's decoded mask consensus for this round.
        geometry: the agreed ``(m, n)`` per layer name (set by :func:`validate_uploads`).
        head: the agreed head tensor shapes (set by :func:`validate_uploads`).
        agreed: method-specific agreed values, e.g. SHE-LoRA's column list (set by
            :func:`validate_uploads` from :meth:`Method.agreement`).
    """

    cfg: FederatedConfig
    round_: int
    crypto: Any = None
    consensus: Message | None = None
    geometry: dict[str, tuple[int, int]] | None = None
    head: dict[str, tuple[int, ...]] | None = None
    agreed: Any = None


def check_int(header: Mapping[str, Any], name: str, *, low: int = 0, what: str = "") -> int:
    """``header[name]`` as an int ``>= low``; :class:`ProtocolError` naming it otherwise."""
    cid = header.get("client_id")
    if name not in header:
        raise ProtocolError(
            f"upload from client {cid} lacks header field {name!r}", client_id=cid, reason="header"
        )
    v = header[name]
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < low:
        raise ProtocolError(
            f"upload from client {cid}: {name} = {v!r} is not an integer >= {low}{what}",
            client_id=cid,
            reason="header",
        )
    return int(v)


def check_plain_values(msg: Message, *, skip: Callable[[str], bool] = lambda _: False) -> None:
    """Every float tensor of ``msg`` within ``|x| <= MAX_ABS_VALUE`` (except names ``skip``s)."""
    cid = msg.header.get("client_id")
    for name, arr in msg.tensors.items():
        if skip(name) or arr.dtype.kind != "f" or arr.size == 0:
            continue
        peak = float(np.max(np.abs(arr)))
        if peak > MAX_ABS_VALUE:
            raise ProtocolError(
                f"upload from client {cid}: tensor {name!r} holds |x| = {peak:.3g}, above the "
                f"bound {MAX_ABS_VALUE:g} on plaintext values (a LoRA update is orders of "
                "magnitude smaller; the client's training diverged or the upload is forged)",
                client_id=cid,
                reason="value",
            )


def _majority(items: Sequence[tuple[int, Hashable]]) -> Hashable:
    """The value most ``(client_id, value)`` pairs carry; a tie goes to the lowest client id."""
    counts = Counter(v for _, v in items)
    best = max(counts.values())
    return min((cid, v) for cid, v in items if counts[v] == best)[1]


def _freeze(d: Mapping[str, Iterable[int]]) -> tuple:
    return tuple(sorted((k, tuple(int(x) for x in v)) for k, v in d.items()))


def _check_sender(
    msg: Message, cfg: FederatedConfig, round_: int, sampled: set[int] | None, wire_name: str
) -> int:
    h = msg.header
    cid = h.get("client_id")
    if isinstance(cid, bool) or not isinstance(cid, (int, np.integer)):
        raise ProtocolError(
            f"upload names client_id {cid!r}: not an integer client id",
            client_id=None,
            reason="sender",
        )
    cid = int(cid)
    if not 0 <= cid < cfg.num_clients:
        raise ProtocolError(
            f"upload from client {cid}: no such client (the federation has clients 0 .. "
            f"{cfg.num_clients - 1})",
            client_id=cid,
            reason="sender",
        )
    if sampled is not None and cid not in sampled:
        raise ProtocolError(
            f"upload from client {cid}, which was not asked to train in round {round_} "
            f"(asked: {sorted(sampled)})",
            client_id=cid,
            reason="sender",
        )
    if h.get("method") != wire_name:
        raise ProtocolError(
            f"upload from client {cid} is for method {h.get('method')!r}; this server runs "
            f"{cfg.method!r} (uploads say {wire_name!r})",
            client_id=cid,
            reason="method",
        )
    rnd = h.get("round")
    if rnd != round_:
        raise ProtocolError(
            f"upload from client {cid} is for round {rnd!r}, not {round_} (a stale or replayed "
            "upload)",
            client_id=cid,
            reason="round",
        )
    check_int(h, "num_examples", low=1, what=" (its sample count, the aggregation weight)")
    if "rank" in h and h["rank"] != cfg.client_rank(cid):
        raise ProtocolError(
            f"upload from client {cid} has rank {h['rank']!r}; the configuration gives it "
            f"rank {cfg.client_rank(cid)}",
            client_id=cid,
            reason="rank",
        )
    if "alpha" in h and h["alpha"] != cfg.lora_alpha:
        raise ProtocolError(
            f"upload from client {cid} has LoRA alpha {h['alpha']!r}; the run uses "
            f"{cfg.lora_alpha}",
            client_id=cid,
            reason="rank",
        )
    return cid


def _check_geometry(
    msg: Message, geometry: Mapping[str, tuple[int, int]], ctx: RoundContext
) -> None:
    if dict(geometry) == ctx.geometry:
        return
    cid = msg.header.get("client_id")
    mine, agreed = set(geometry), set(ctx.geometry or ())
    if mine != agreed:
        detail = f"layers {sorted(mine ^ agreed)[:3]} differ"
    else:
        name = next(k for k in agreed if tuple(geometry[k]) != tuple(ctx.geometry[k]))
        detail = f"layer {name!r} is {geometry[name]}, expected {ctx.geometry[name]}"
    raise ProtocolError(
        f"upload from client {cid} does not fit the round's layers ({detail})",
        client_id=cid,
        reason="shape",
    )


def _head_shapes(msg: Message) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in msg.tensors.items() if k.startswith("head|")}


def validate_uploads(
    cfg: FederatedConfig,
    method: Any,
    uploads: Sequence[Any],
    *,
    round_: int,
    sampled: Iterable[int] | None = None,
    crypto: Any = None,
    consensus: Message | None = None,
    senders: Sequence[Any] | None = None,
    layers: Mapping[str, tuple[int, int]] | None = None,
    head: Mapping[str, tuple[int, ...]] | None = None,
) -> tuple[list[Message], list[dict[str, Any]]]:
    """Decode and check every upload on its own.

    Args:
        cfg, method: the run and its :class:`~shelora_core.methods.base.Method`.
        uploads: the upload bytes, as received.
        round_: the round being aggregated.
        sampled: the clients asked this round (``None``: any client of the federation).
        crypto: the server's public CKKS context.
        consensus: MaskCrypt's decoded consensus.
        senders: who delivered each upload, as the transport knows it (names a sender whose
            bytes do not even decode); default the position in ``uploads``.
        layers: ``(m, n)`` of every adapted layer, from the public model; ``None``: the
            geometry most uploads agree on (a tie goes to the lowest client id).
        head: the head's tensor shapes, from the public model; ``None``: what most uploads carry.

    Returns:
        ``(valid messages, rejections)``; each rejection is ``{"client_id", "reason",
        "error"}`` with ``client_id`` the header's id (or the transport's sender when the bytes
        do not decode).
    """
    ctx = RoundContext(cfg, round_, crypto, consensus)
    asked = None if sampled is None else {int(c) for c in sampled}
    rejected: list[dict[str, Any]] = []

    def refuse(exc: Exception, who: Any) -> None:
        reason = getattr(exc, "reason", None) or type(exc).__name__
        rejected.append({"client_id": who, "reason": reason, "error": str(exc)})

    # 1. the bytes, one upload at a time
    decoded: list[tuple[Any, Message]] = []
    for i, data in enumerate(uploads):
        who = senders[i] if senders is not None else f"#{i}"
        label = f"upload from client {who}" if senders is not None else f"upload #{i}"
        try:
            msg = decode(data, expect_kind="upload")
        except MessageError as exc:
            refuse(ProtocolError(f"{label}: {exc}", reason="malformed"), who)
            continue
        claimed = msg.header.get("client_id")
        if senders is not None and (isinstance(claimed, bool) or claimed != who):
            refuse(
                ProtocolError(
                    f"{label} claims to come from client {claimed!r}: a client uploads only "
                    "under its own id",
                    client_id=who,
                    reason="sender",
                ),
                who,
            )
            continue
        decoded.append((who, msg))
    # 2. one upload per client: every copy of a repeated id is refused
    counts = Counter(_hashable(m.header.get("client_id")) for _, m in decoded)
    for cid, n in counts.items():
        if n > 1:
            refuse(
                ProtocolError(
                    f"{n} uploads from client {cid} in round {round_}: each client counts once, "
                    "and which copy is genuine cannot be told, so none is used",
                    client_id=cid,
                    reason="duplicate",
                ),
                cid,
            )
    # 3. the sender, round, method and sample count
    stage: list[tuple[int, Message]] = []
    for who, msg in decoded:
        if counts[_hashable(msg.header.get("client_id"))] > 1:
            continue
        try:
            stage.append((_check_sender(msg, cfg, round_, asked, method.wire_name), msg))
        except ProtocolError as exc:
            refuse(exc, exc.client_id if exc.client_id is not None else who)
    # 4. geometry and the method's agreed fields, against what most clients sent
    geo: list[tuple[int, Message, dict]] = []
    for cid, msg in stage:
        try:
            geo.append((cid, msg, method.upload_geometry(msg)))
        except SheloraError as exc:
            refuse(_as_protocol(exc, cid), cid)
    if geo:
        ctx.geometry = (
            {k: (int(m), int(n)) for k, (m, n) in layers.items()}
            if layers is not None
            else dict(_majority([(cid, _freeze(g)) for cid, _, g in geo]))
        )
        ctx.head = (
            {f"head|{k}": tuple(v) for k, v in head.items()}
            if head is not None
            else dict(_majority([(cid, _freeze(_head_shapes(m))) for cid, m, _ in geo]))
        )
        agreed = [(cid, method.agreement(m)) for cid, m, _ in geo]
        ctx.agreed = _majority(agreed)
    valid: list[Message] = []
    for cid, msg, g in geo:
        try:
            _check_geometry(msg, g, ctx)
            if _head_shapes(msg) != ctx.head:
                raise ProtocolError(
                    f"upload from client {cid}: head tensors {_head_shapes(msg)} differ from "
                    f"the round's other clients {ctx.head}",
                    client_id=cid,
                    reason="shape",
                )
            method.check_upload(msg, ctx)
        except SheloraError as exc:
            refuse(_as_protocol(exc, cid), cid)
            continue
        valid.append(msg)
    return valid, rejected


def _hashable(value: Any) -> Hashable:
    return value if isinstance(value, Hashable) else repr(value)


def _as_protocol(exc: SheloraError, cid: int) -> ProtocolError:
    """``exc`` as a :class:`ProtocolError` that names client ``cid``."""
    if isinstance(exc, ProtocolError) and exc.client_id is not None:
        return exc
    text = str(exc)
    if f"client {cid}" not in text:
        text = f"upload from client {cid}: {text}"
    return ProtocolError(text, client_id=cid, reason=getattr(exc, "reason", type(exc).__name__))
