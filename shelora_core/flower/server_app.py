"""The ServerApp: the in-process loop's rounds, with the clients behind Flower SuperNodes.

Per run (:class:`FlowerServer`): find the SuperNodes and which client each plays (``query.hello``),
SHE-LoRA's negotiation (``query.propose`` -> :func:`~shelora_core.server.server_negotiate`), then
every round: :func:`~shelora_core.server.sample_clients`, one ``train`` message per sampled client
(MaskCrypt: :func:`~shelora_core.server.server_consensus`, then ``train.upload``),
:func:`~shelora_core.server.server_round` over the uploads that arrived, ``evaluate`` on the
evaluator's SuperNode, and the round's record (:func:`shelora_core.records.round_record`).
These are the functions the in-process :class:`~shelora_core.federation.Federation` calls; the
ServerApp only moves their bytes through Flower.

Dropouts and stragglers: a client that has not answered within ``round-timeout`` (or
``quorum-grace`` after ``min_clients`` answered), whose SuperNode is gone, or whose step
refused is left out and recorded under ``"rejected"``; :func:`~shelora_core.server.server_round`
re-weights over the uploads it accepts, or raises :class:`~shelora_core.errors.RoundError` when
fewer than ``cfg.min_clients`` remain: the same code path as in-process.

Keys: the ServerApp reads ``public.ctx`` from its own ``server-dir`` and nothing else; it never
receives a client's or the evaluator's directory. At the end it writes ``audit.json`` beside the
checkpoint: every file the process opened outside the Python installation and the count of
private CKKS contexts it holds (:mod:`.audit`).
"""

from __future__ import annotations

from . import audit

audit.install()  # first: every file this process opens from here on is recorded

import json  # noqa: E402
import time  # noqa: E402
from collections.abc import Mapping  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
from flwr.app import Context, Message  # noqa: E402
from flwr.common.constant import ErrorCode  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402

from ..checkpoint import RunDirs, atomic_write  # noqa: E402
from ..errors import CheckpointError, ConfigError, MessageError, RoundError  # noqa: E402
from ..methods import get_method  # noqa: E402
from ..server import (  # noqa: E402
    sample_clients,
    server_consensus,
    server_negotiate,
    server_round,
    with_client_refusals,
)
from . import wire  # noqa: E402
from .settings import ServerSettings  # noqa: E402

__all__ = ["FlowerServer", "app"]

app = ServerApp()


def _say(text: str) -> None:
    print(f"[shelora] {text}", flush=True)


class FlowerServer:
    """One run of the ServerApp over a Flower :class:`~flwr.serverapp.Grid`.

    Args:
        grid: the Grid Flower hands the ServerApp.
        settings: the run config, read by :meth:`ServerSettings.from_run_config`.
    """

    def __init__(self, grid: Grid, settings: ServerSettings) -> None:
        self.grid = grid
        self.s = settings
        self.cfg = settings.config
        self.method = get_method(self.cfg.method, self.cfg)
        self.dirs = RunDirs(settings.server_dir.parent, self.cfg.num_clients)
        if self.dirs.server.resolve() != settings.server_dir.resolve():
            raise ConfigError(
                f"run config server-dir = {str(settings.server_dir)!r}: give the server's "
                "directory as the key holder wrote it (a directory named 'server')"
            )
        self.crypto = None
        self.key_bytes_public = 0
        if self.method.needs_crypto:
            from ..ckks import ServerCrypto

            path = settings.server_dir / "public.ctx"
            if not path.exists():
                raise CheckpointError(
                    f"{path} is missing: the key holder publishes the server's public context "
                    "there (shelora_core.flower.keys)"
                )
            public = path.read_bytes()
            self.crypto = ServerCrypto(public)  # refuses a context that holds a secret key
            self.key_bytes_public = len(public)
        from .keys import read_geometry

        # the public model's layers and head shapes (uploads are checked against them); without
        # the key holder's model.json, against what most uploads agree on
        self.geometry = read_geometry(settings.server_dir) or {}
        self.nodes: dict[int, int] = {}  # client id -> node id
        self.client_of: dict[int, int] = {}  # node id -> client id
        self.evaluator: int | None = None
        self.excluded: list[dict[str, Any]] = []
        self.negotiation: dict[str, Any] | None = None
        self.negotiation_bytes: bytes | None = None
        self.exchange_bytes = {"up": 0, "down": 0}

    # -------------------------------------------------------------- transport
    def exchange(
        self,
        message_type: str,
        targets: Mapping[int, int],
        *,
        blobs: Mapping[str, bytes | None] | None = None,
        meta: Mapping[str, Any] | None = None,
        group: str = "",
        quorum: int | None = None,
    ) -> dict[int, Message]:
        """Send one message per target (``key -> node id``) and collect the replies by key.

        Waits until every target answered, ``round-timeout`` passed, or (with ``quorum`` and a
        non-negative ``quorum-grace``) ``quorum-grace`` seconds after ``quorum`` answered. A
        target without a reply is missing from the result.
        """
        if not targets:
            return {}
        ttl = self.s.round_timeout + 120.0
        keys = list(targets)
        msgs = [
            Message(
                wire.content(blobs, meta),
                dst_node_id=targets[k],
                message_type=message_type,
                group_id=group,
                ttl=ttl,
            )
            for k in keys
        ]
        size = sum(len(b) for b in (blobs or {}).values() if b is not None)
        self.exchange_bytes["down"] += size * len(keys)
        ids = list(self.grid.push_messages(msgs))
        pending = {mid: k for mid, k in zip(ids, keys, strict=True) if mid is not None}
        replies: dict[int, Message] = {}
        start = time.monotonic()
        deadline = start + self.s.round_timeout
        quorum_at: float | None = None
        while pending:
            for reply in self.grid.pull_messages(list(pending)):
                k = pending.pop(reply.metadata.reply_to_message_id, None)
                if k is None:
                    continue
                replies[k] = reply
                if _problem(reply) is None:
                    self.exchange_bytes["up"] += sum(
                        len(b) for b in wire.read_blobs(reply).values()
                    )
            now = time.monotonic()
            if not pending or now >= deadline:
                break
            if quorum is not None and self.s.quorum_grace >= 0:
                answered = sum(1 for r in replies.values() if _problem(r) is None)
                if quorum_at is None and answered >= quorum:
                    quorum_at = now
                if quorum_at is not None and now - quorum_at >= self.s.quorum_grace:
                    break
            time.sleep(self.s.poll_interval)
        ok = sum(1 for r in replies.values() if _problem(r) is None)
        _say(
            f"{message_type} {group}: {ok} of {len(keys)} answered in "
            f"{time.monotonic() - start:.1f} s"
        )
        return replies

    # -------------------------------------------------------------- who is there
    def discover(self) -> None:
        """Map every client id to the SuperNode that plays it, and find the evaluator.

        Waits up to ``discover-timeout`` for a SuperNode per client; a SuperNode whose key has
        another fingerprint than the server's public context, or that claims a client another
        SuperNode already plays, is left out (recorded in the run's meta).

        Raises:
            RoundError: fewer than ``min_clients`` clients have a SuperNode.
        """
        cfg = self.cfg
        deadline = time.monotonic() + self.s.discover_timeout
        asked: set[int] = set()
        while True:
            fresh = {n: n for n in self.grid.get_node_ids() if n not in asked}
            asked.update(fresh)
            for node, reply in sorted(self.exchange(wire.HELLO, fresh, group="hello").items()):
                problem = _problem(reply)
                if problem is not None:
                    self.excluded.append({"node_id": node, **problem})
                    continue
                m = wire.meta(reply)
                if not isinstance(m.get("partition-id"), int):
                    self.excluded.append({"node_id": node, "reason": "malformed"})
                    continue
                pid, fp = int(m["partition-id"]), str(m.get("fingerprint", ""))
                if m.get("evaluator") and self.evaluator is None:
                    self.evaluator = node
                if pid < 0:
                    continue
                why = None
                if pid >= cfg.num_clients:
                    why = (
                        f"partition-id {pid} is not a client of this run (0..{cfg.num_clients - 1})"
                    )
                elif pid in self.nodes:
                    why = f"client {pid} is already played by node {self.nodes[pid]}"
                elif self.crypto is not None and fp != self.crypto.fingerprint:
                    why = (
                        f"its key has fingerprint {fp!r}, the server's public context "
                        f"{self.crypto.fingerprint!r}: it was given another run's keys"
                    )
                if why:
                    self.excluded.append({"node_id": node, "client_id": pid, "reason": why})
                    _say(f"left out SuperNode {node}: {why}")
                    continue
                self.nodes[pid] = node
                self.client_of[node] = pid
            complete = len(self.nodes) == cfg.num_clients and self.evaluator is not None
            if complete or time.monotonic() >= deadline:
                break
            time.sleep(max(self.s.poll_interval, 0.5))
        _say(
            f"{len(self.nodes)} of {cfg.num_clients} clients on SuperNodes, evaluator "
            f"{'found' if self.evaluator is not None else 'missing (no accuracy recorded)'}"
        )
        if len(self.nodes) < cfg.min_clients:
            raise RoundError(
                f"{len(self.nodes)} client(s) have a SuperNode, fewer than min_clients = "
                f"{cfg.min_clients}: start a SuperNode per client (node config partition-id)",
                rejected=self.excluded,
            )

    # -------------------------------------------------------------- SHE-LoRA's negotiation
    def negotiate(self, round_: int, broadcast: bytes | None) -> None:
        """Every client with a SuperNode proposes, the server negotiates the column list on
        the OPE ciphertexts; its bytes travel with every ``train`` message from now on."""
        from ..records import negotiation_summary

        replies = self.exchange(
            wire.PROPOSE,
            self.nodes,
            blobs={"broadcast": broadcast},
            meta={"round": round_},
            group=f"negotiate-{round_}",
        )
        proposals, seconds = [], []
        for cid in sorted(self.nodes):
            reply = replies.get(cid)
            why = _missing(self.s) if reply is None else _problem(reply, "proposal", ("seconds",))
            if why is not None:
                _say(f"negotiation before round {round_}: client {cid} left out ({why})")
                continue
            proposals.append(wire.read_blobs(reply)["proposal"])
            seconds.append(wire.metrics(reply)["seconds"])
        if not proposals:
            raise RoundError(f"no client answered the negotiation before round {round_}")
        t0 = time.perf_counter()
        self.negotiation_bytes, result = server_negotiate(self.cfg, proposals)
        self.negotiation = negotiation_summary(
            round_,
            proposals=proposals,
            broadcast=self.negotiation_bytes,
            result=result,
            client_seconds=seconds,
            server_seconds=time.perf_counter() - t0,
        )

    # -------------------------------------------------------------- one round
    def round(self, rnd: int, broadcast: bytes | None) -> tuple[bytes, dict[str, Any]]:
        """One round over Flower: the same steps and record as the in-process loop."""
        from ..records import negotiation_record, round_record

        cfg, method = self.cfg, self.method
        extra: dict[str, Any] = {}
        if self.negotiation is not None and self.negotiation["round"] == rnd:
            extra.update(negotiation_record(self.negotiation, cfg.num_clients))
        t0 = time.perf_counter()
        sampled = sample_clients(cfg, rnd)
        failed: list[dict[str, Any]] = []
        targets = {}
        for cid in sampled:
            if cid in self.nodes:
                targets[cid] = self.nodes[cid]
            else:
                failed.append(_left_out(cid, {"reason": "absent", "error": "no SuperNode"}))
        replies = self.exchange(
            wire.TRAIN,
            targets,
            blobs={"broadcast": broadcast, "negotiation": self.negotiation_bytes},
            meta={"round": rnd},
            group=str(rnd),
            quorum=cfg.min_clients,
        )
        uploads, losses, client_secs, parts, ids, senders, loads = [], [], [], [], [], [], []
        for cid in sorted(targets):
            reply = replies.get(cid)
            need = ("loss", "client_seconds", "receive", "train")
            problem = _missing(self.s) if reply is None else _problem(reply, "upload", need)
            if problem is not None:
                failed.append(_left_out(cid, problem))
                continue
            m = wire.metrics(reply)
            uploads.append(wire.read_blobs(reply)["upload"])
            losses.append(m["loss"])
            client_secs.append(m["client_seconds"])
            loads.append(m.get("load_seconds", 0.0))
            parts.append({k: m[k] for k in ("receive", "train", "upload", "mask") if k in m})
            ids.append(cid)
            senders.append(self.client_of.get(reply.metadata.src_node_id))
        download = len(broadcast) if broadcast is not None else 0
        consensus = None
        if method.needs_consensus:  # MaskCrypt: masks -> consensus -> encrypted uploads
            proposals = uploads
            ts = time.perf_counter()
            consensus = server_consensus(cfg, proposals, round_=rnd)
            extra["consensus_server_seconds"] = time.perf_counter() - ts
            second = self.exchange(
                wire.UPLOAD,
                {cid: self.nodes[cid] for cid in ids},
                blobs={"consensus": consensus},
                meta={"round": rnd},
                group=str(rnd),
                quorum=cfg.min_clients,
            )
            uploads, senders = [], []
            for j, cid in enumerate(ids):
                reply = second.get(cid)
                problem = (
                    _missing(self.s) if reply is None else _problem(reply, "upload", ("upload",))
                )
                if problem is not None:
                    failed.append(_left_out(cid, problem))
                    parts[j]["upload"] = 0.0
                    continue
                parts[j]["upload"] = wire.metrics(reply)["upload"]
                client_secs[j] += parts[j]["upload"]
                uploads.append(wire.read_blobs(reply)["upload"])
                senders.append(self.client_of.get(reply.metadata.src_node_id))
            extra.update(
                consensus_upload_bytes=int(sum(len(x) for x in proposals)),
                consensus_broadcast_bytes=len(consensus),
                client_mask_seconds=float(np.mean([x["mask"] for x in parts])) if parts else 0.0,
            )
        ts = time.perf_counter()
        try:
            outcome = server_round(
                cfg,
                uploads,
                round_=rnd,
                crypto=self.crypto,
                consensus=consensus,
                sampled=sampled,
                senders=senders,
                **self.geometry,
            )
        except RoundError as exc:  # name the clients that answered with a refusal instead
            raise with_client_refusals(exc, failed) from exc
        broadcast = outcome.broadcast
        if failed or outcome.rejected:
            extra["rejected"] = failed + outcome.rejected
        server_secs = time.perf_counter() - ts
        extra["client_load_seconds"] = float(np.mean(loads)) if loads else 0.0
        rec = round_record(
            cfg,
            rnd,
            clients=len(outcome.clients),
            losses=losses,
            uploads=uploads,
            download_bytes=download * len(ids),
            broadcast=broadcast,
            client_seconds=client_secs,
            parts=parts,
            key_bytes_public=self.key_bytes_public,
            server_seconds=server_secs,
            extra=extra,
        )
        if rnd % cfg.eval_every == 0 or rnd == cfg.rounds:
            rec.update(self.evaluate(rnd, broadcast))
        rec["seconds"] = time.perf_counter() - t0
        return broadcast, rec

    def evaluate(self, rnd: int, broadcast: bytes) -> dict[str, Any]:
        """Accuracy and macro-F1 from the evaluator's SuperNode (``{}`` when it is missing)."""
        if self.evaluator is None:
            return {}
        replies = self.exchange(
            wire.EVALUATE,
            {0: self.evaluator},
            blobs={"broadcast": broadcast},
            group=f"eval-{rnd}",
        )
        reply = replies.get(0)
        need = ("accuracy", "macro_f1")
        problem = _missing(self.s) if reply is None else _problem(reply, None, need)
        if problem is not None:
            _say(f"round {rnd}: no evaluation ({problem})")
            return {"evaluation": problem}
        m = wire.metrics(reply)
        return {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"]}

    # -------------------------------------------------------------- the run
    @property
    def metrics_path(self) -> Path:
        return self.s.results_dir / "federated_tuning" / f"{self.cfg.run_name}.jsonl"

    def _write_records(self, history: list[dict[str, Any]]) -> None:
        atomic_write(self.metrics_path, "".join(json.dumps(h) + "\n" for h in history).encode())

    def run(self) -> list[dict[str, Any]]:
        """Every round; the records in notebook 05's schema after each, the summary at the end."""
        from ..provenance import run_meta
        from ..records import RunResult

        cfg = self.cfg
        # resume: the server's checkpoint (round, history, broadcast) of this exact configuration
        # (another configuration's, or a damaged one, is refused by name); the clients keep no
        # state between rounds, so the next round starts from the checkpoint's broadcast
        start, broadcast, history = self.dirs.load_checkpoint(cfg.fingerprint())
        if start:
            _say(f"resuming after round {start}/{cfg.rounds} from {self.dirs.checkpoint}")
        if start < cfg.rounds:
            self.discover()
        negotiated = cfg.uses_columns and cfg.column_order == "negotiated"
        for rnd in range(start + 1, cfg.rounds + 1):
            if negotiated:
                e = cfg.negotiation_round(rnd)
                if e == rnd:
                    self.negotiate(rnd, broadcast)
                    self.save_negotiation()
                elif self.negotiation_bytes is None:  # resumed between negotiations
                    self.load_negotiation(e)
            broadcast, rec = self.round(rnd, broadcast)
            history.append(rec)
            self.dirs.save_checkpoint(
                round_=rnd,
                broadcast=broadcast,
                history=history,
                fingerprint=cfg.fingerprint(),
                config=cfg.to_dict(),
            )
            self._write_records(history)
            acc = rec.get("accuracy")
            _say(
                f"round {rnd}/{cfg.rounds}: {rec['clients']} clients, up {rec['upload_bytes']} B, "
                f"down {rec['download_bytes']} B, {rec['seconds']:.1f} s"
                + (f", accuracy {acc:.3f}" if acc is not None else "")
            )
        if start >= cfg.rounds and history:  # resumed a finished run: nothing ran this time
            # the records are written again, so whoever follows this run's file (the
            # launcher's watcher) sees them as this run's
            self._write_records(history)
            if negotiated and self.negotiation is None:
                self.load_negotiation(cfg.negotiation_round(len(history)))
        meta = run_meta(cfg.seed)
        meta.update(self.deployment_meta())
        if self.negotiation is not None:
            meta["negotiation"] = self.negotiation
        result = RunResult(cfg, history, np.zeros((0, 0)), meta=meta)
        summary = {**result.summary(), "meta": meta}
        atomic_write(
            self.metrics_path.with_name(f"{cfg.run_name}.summary.json"),
            json.dumps(summary, indent=1, default=str).encode(),
        )
        return history

    def _negotiation_path(self, round_: int) -> Path:
        return self.dirs.server / f"negotiation-{round_}.msg"

    def save_negotiation(self) -> None:
        """Keep the negotiated list's bytes (OPE-encrypted, as the clients receive them) and its
        summary beside the checkpoint, so a resumed run sends the clients the same list."""
        from ..messages import Message as Msg
        from ..messages import encode

        blob = np.frombuffer(self.negotiation_bytes, dtype=np.uint8)
        data = encode(Msg("negotiation", {"summary": self.negotiation}, {"bytes": blob}))
        atomic_write(self._negotiation_path(self.negotiation["round"]), data)

    def load_negotiation(self, round_: int) -> None:
        """The list negotiated before ``round_`` (kept by :meth:`save_negotiation`).

        Raises:
            CheckpointError: it is missing or damaged.
        """
        from ..messages import decode

        path = self._negotiation_path(round_)
        try:
            msg = decode(path.read_bytes(), expect_kind="negotiation")
            self.negotiation = dict(msg.header["summary"])
            self.negotiation_bytes = msg.tensors["bytes"].tobytes()
        except (OSError, MessageError, KeyError) as exc:
            raise CheckpointError(
                f"{path}: the column list negotiated before round {round_} is missing or "
                f"damaged ({exc}); a resumed run needs it: start the run again with a fresh "
                "server directory"
            ) from exc

    def deployment_meta(self) -> dict[str, Any]:
        """How the run was deployed (for the summary's meta)."""
        import flwr

        return {
            "engine": "flower-deployment",
            "flwr": getattr(flwr, "__version__", "unknown"),
            "supernodes": len(set(self.client_of) | {self.evaluator} - {None}),
            "clients_on_supernodes": sorted(self.nodes),
            "evaluator": self.evaluator is not None,
            "excluded_supernodes": self.excluded,
            "payload_bytes": dict(self.exchange_bytes),
            "round_timeout": self.s.round_timeout,
            "quorum_grace": self.s.quorum_grace,
        }


def _problem(
    reply: Message, blob: str | None = None, metrics: tuple[str, ...] = ()
) -> dict[str, str] | None:
    """Why a reply is unusable (a Flower error, a client's refusal, or a reply without the
    ``blob`` bytes and ``metrics`` it must carry), or ``None``."""
    if reply.has_error():
        err = reply.error
        names = {
            ErrorCode.NODE_UNAVAILABLE: "unavailable",
            ErrorCode.MESSAGE_UNAVAILABLE: "unavailable",
            ErrorCode.REPLY_MESSAGE_UNAVAILABLE: "unavailable",
            ErrorCode.CLIENT_APP_CRASHED: "crashed",
            ErrorCode.CLIENT_APP_RAISED_EXCEPTION: "client:exception",
        }
        return {"reason": names.get(err.code, f"flower:{err.code}"), "error": str(err.reason)}
    refused = wire.refused(reply)
    if refused is not None:
        return refused
    try:
        blobs = wire.read_blobs(reply)
    except MessageError as exc:
        return {"reason": "malformed", "error": str(exc)}
    missing = [blob] if blob is not None and blob not in blobs else []
    missing += [k for k in metrics if k not in wire.metrics(reply)]
    if missing:
        return {"reason": "malformed", "error": f"the reply lacks {missing}: not this app's client"}
    return None


def _missing(s: ServerSettings) -> dict[str, str]:
    """A client that had not answered when the exchange closed (a straggler, or gone)."""
    grace = f", or {s.quorum_grace:g} s after min_clients answered" if s.quorum_grace >= 0 else ""
    return {
        "reason": "timeout",
        "error": f"no answer when the round closed (round-timeout {s.round_timeout:g} s{grace})",
    }


def _left_out(client_id: int, problem: Mapping[str, str]) -> dict[str, Any]:
    """A round record's entry for a client whose upload never reached the server."""
    return {"client_id": int(client_id), "reason": problem["reason"], "error": problem["error"]}


def write_audit(server_dir: Path) -> dict[str, Any]:
    """Write this process's :func:`.audit.report` to ``server_dir/audit.json``."""
    rep = audit.report()
    atomic_write(server_dir / "audit.json", json.dumps(rep, indent=1).encode())
    return rep


@app.main()
def main(grid: Grid, context: Context) -> None:
    """The ServerApp's entry point: read the run config, run every round, write the audit."""
    settings = ServerSettings.from_run_config(context.run_config)
    server = None
    try:
        server = FlowerServer(grid, settings)
        server.run()
    finally:  # while the server (and its public context) is alive: the audit counts it
        write_audit(settings.server_dir)
        del server
