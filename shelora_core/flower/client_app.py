"""The ClientApp: one shelora client (and optionally the evaluator) behind a SuperNode.

Each handler calls the round engine's client steps (:mod:`shelora_core.client`) exactly as the
in-process loop does, on this SuperNode's own examples (its partition of the run's seeded split,
:func:`shelora_core.federation.split_data`) with its own keys, read from the directory its node
config names (:mod:`.settings`). Flower starts a fresh ClientApp process per message, so every
handler loads what it needs; the only state kept between two messages is MaskCrypt's trained
adapter between its two steps, in the SuperNode's context state (client-side, never sent).

A client whose own step refuses (a :class:`~shelora_core.errors.SheloraError`: a stale or
foreign broadcast, a key mismatch) answers with a refusal record instead of bytes, as a refusing
client drops out of an in-process round; any other exception is a bug and reaches Flower, which
answers the ServerApp with an error reply.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from flwr.app import ArrayRecord, Context, Message
from flwr.clientapp import ClientApp

from ..errors import ProtocolError, SheloraError
from . import wire
from .settings import NodeSettings, parse_config

__all__ = ["ClientEnv", "app"]

app = ClientApp()

#: the key of MaskCrypt's client-side state in a SuperNode's context state
_STATE = "shelora-maskcrypt-state"
_PROPOSAL = "shelora-proposal"  # this client's last negotiation proposal (its coverage check)


@dataclass
class ClientEnv:
    """What one client holds: the public configuration, its node settings and, loaded on first
    use, its keys, its model and its examples."""

    cfg: Any
    node: NodeSettings

    @classmethod
    def from_context(cls, context: Context) -> ClientEnv:
        return cls(
            parse_config(context.run_config.get("config")),
            NodeSettings.from_node_config(context.node_config),
        )

    @property
    def client_id(self) -> int:
        if self.node.partition_id < 0 or self.node.client_dir is None:
            raise ProtocolError(
                "this SuperNode plays no client (partition-id = -1): the ServerApp sent it a "
                "client's message",
                reason="role",
            )
        if self.node.partition_id >= self.cfg.num_clients:
            raise ProtocolError(
                f"node config partition-id = {self.node.partition_id}, but the run has "
                f"{self.cfg.num_clients} clients (ids 0..{self.cfg.num_clients - 1}): fix the "
                "SuperNode's --node-config",
                client_id=self.node.partition_id,
                reason="partition",
            )
        return self.node.partition_id

    # -------------------------------------------------------------- keys (own directory only)
    def _read(self, directory: Any, name: str) -> bytes:
        from ..errors import CheckpointError

        path = directory / name
        if not path.exists():
            raise CheckpointError(
                f"key file {path} is missing: the key holder writes it (shelora_core.flower.keys)"
                f"; point this SuperNode's node config to the directory it wrote"
            )
        return path.read_bytes()

    @cached_property
    def crypto(self) -> Any:
        """This client's secret CKKS context, or ``None`` for methods without CKKS."""
        from ..ckks import ClientCrypto
        from ..methods import get_method

        if not get_method(self.cfg.method, self.cfg).needs_crypto:
            return None
        return ClientCrypto(self._read(self.node.client_dir, "secret.ctx"))

    @cached_property
    def evaluator_crypto(self) -> Any:
        from ..ckks import ClientCrypto
        from ..methods import get_method

        if not get_method(self.cfg.method, self.cfg).needs_crypto:
            return None
        return ClientCrypto(self._read(self.node.evaluator_dir, "secret.ctx"))

    @cached_property
    def init_seed(self) -> int | None:
        """``secret_init``: the seed of the initial A, from the clients' shared ``init.key``."""
        if not self.cfg.secret_init:
            return None
        from ..client import secret_init_seed

        return secret_init_seed(self._read(self.node.client_dir, "init.key"))

    @cached_property
    def ope(self) -> Any:
        """The clients' OPE key (SHE-LoRA's negotiation)."""
        from ..ope import ColumnOPE, OPEKey

        return ColumnOPE(OPEKey.from_bytes(self._read(self.node.client_dir, "ope.key")))

    # -------------------------------------------------------------- model and examples
    @cached_property
    def _split(self) -> Any:
        from ..federation import split_data

        return split_data(self.cfg)

    @cached_property
    def _tokenizer(self) -> Any:
        from ..assets import load_tokenizer

        return load_tokenizer(self.cfg.model)

    @cached_property
    def model(self) -> Any:
        from ..federation import build_model

        return build_model(self.cfg, self._split[0].num_labels)

    @cached_property
    def data(self) -> Any:
        """This client's own examples: ``train[parts[client_id]]``, tokenized."""
        from ..federation import encode_examples
        from ..methods import get_method

        train, _, parts = self._split
        data = encode_examples(self.cfg, train.subset(parts[self.client_id]), self._tokenizer)
        if self.crypto is not None:  # the setup check of the in-process run, for this client
            get_method(self.cfg.method, self.cfg).check_sum_range(len(data), self.crypto.max_abs)
        return data

    @cached_property
    def test_data(self) -> Any:
        from ..federation import encode_examples

        return encode_examples(self.cfg, self._split[1], self._tokenizer)


def _configure_threads() -> None:
    """Honour ``SHELORA_TORCH_THREADS`` (the launcher sets it: several SuperNodes share cores)."""
    import os

    n = os.environ.get("SHELORA_TORCH_THREADS")
    if n:
        import torch

        torch.set_num_threads(int(n))


def _reply(msg: Message, step: Any) -> Message:
    """Run ``step()`` -> RecordDict; a named shelora error becomes a refusal record."""
    try:
        return Message(step(), reply_to=msg)
    except SheloraError as exc:
        reason = getattr(exc, "reason", None) or f"client:{type(exc).__name__}"
        return Message(wire.refusal(reason, str(exc)), reply_to=msg)


# ---------------------------------------------------------------------------- handlers
@app.query("hello")
def hello(msg: Message, context: Context) -> Message:
    """Who this SuperNode is: partition id, evaluator or not, its key's fingerprint."""

    def step() -> Any:
        env = ClientEnv.from_context(context)
        fp = ""
        if env.node.client_dir is not None and env.crypto is not None:
            fp = env.crypto.fingerprint
        return wire.content(
            meta={
                "partition-id": env.node.partition_id,
                "evaluator": env.node.evaluator_dir is not None,
                "fingerprint": fp,
            }
        )

    return _reply(msg, step)


@app.query("propose")
def propose(msg: Message, context: Context) -> Message:
    """SHE-LoRA: this client's OPE-encrypted proposal (a re-negotiation scores the global
    adapter of the broadcast it carries, read at the client's rank)."""
    from ..client import negotiation_proposal, receive

    def step() -> Any:
        _configure_threads()
        env = ClientEnv.from_context(context)
        t0 = time.perf_counter()
        cid = env.client_id
        blobs, meta = wire.read_blobs(msg), wire.meta(msg)
        weights = None
        if "broadcast" in blobs:
            weights = receive(
                env.cfg,
                blobs["broadcast"],
                client_id=cid,
                round_=int(meta["round"]),
                crypto=env.crypto,
            )
        elif env.init_seed is not None:  # secret_init: the first list scores the secret A
            weights = env.model.init_weights(env.cfg.client_rank(cid), seed=env.init_seed)
        t1 = time.perf_counter()
        proposal = negotiation_proposal(
            env.cfg, env.model, env.data, client_id=cid, ope=env.ope, weights=weights
        )
        t2 = time.perf_counter()
        # kept by this SuperNode (never sent again): the list the server returns is checked
        # against it before this client trains on it
        context.state[_PROPOSAL] = ArrayRecord({"proposal": wire.blob_array(proposal)})
        return wire.content(
            {"proposal": proposal}, metrics={"seconds": t2 - t1, "load_seconds": t1 - t0}
        )

    return _reply(msg, step)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One client step (:func:`shelora_core.client.client_step`): upload bytes (MaskCrypt: the
    mask proposal, the trained adapter kept in the context state for ``train.upload``)."""
    from ..client import check_negotiated_columns, client_step, negotiated_columns
    from ..methods import get_method
    from ..methods.wire import adapter_to_upload

    def step() -> Any:
        _configure_threads()
        env = ClientEnv.from_context(context)
        t0 = time.perf_counter()
        cid, cfg = env.client_id, env.cfg
        blobs, meta = wire.read_blobs(msg), wire.meta(msg)
        rnd = int(meta["round"])
        columns = None
        if "negotiation" in blobs:  # SHE-LoRA: the list G in force, decrypted with the OPE key
            columns = negotiated_columns(blobs["negotiation"], env.ope)
            if _PROPOSAL in context.state.array_records:  # a server steering the negotiation
                kept = wire.read_blob(context.state.array_records[_PROPOSAL]["proposal"])
                check_negotiated_columns(cfg, columns, kept, env.ope)
        model, data, crypto = env.model, env.data, env.crypto
        load = time.perf_counter() - t0
        needs_state = get_method(cfg.method, cfg).needs_consensus
        state: dict[str, Any] | None = {} if needs_state else None
        tc = time.perf_counter()
        up, loss, secs = client_step(
            cfg,
            model,
            data,
            client_id=cid,
            round_=rnd,
            broadcast=blobs.get("broadcast"),
            crypto=crypto,
            columns=columns,
            state=state,
            init_seed=env.init_seed,
        )
        seconds = time.perf_counter() - tc
        if state is not None:  # client-side only: kept by this SuperNode, never sent
            from ..messages import encode

            kept = adapter_to_upload(
                state["weights"],
                method=cfg.method,
                round_=state["round"],
                client_id=state["client_id"],
                num_examples=state["num_examples"],
            )
            context.state[_STATE] = ArrayRecord({"adapter": wire.blob_array(encode(kept))})
        return wire.content(
            {"upload": up},
            metrics={"loss": loss, "client_seconds": seconds, "load_seconds": load, **secs},
        )

    return _reply(msg, step)


@app.train("upload")
def upload(msg: Message, context: Context) -> Message:
    """MaskCrypt's second step (:func:`shelora_core.client.client_upload`) with the round's
    consensus, on the adapter the ``train`` step kept."""
    from ..client import client_upload
    from ..messages import decode
    from ..methods.wire import upload_to_adapter

    def step() -> Any:
        env = ClientEnv.from_context(context)
        blobs, meta = wire.read_blobs(msg), wire.meta(msg)
        rnd = int(meta["round"])
        if _STATE not in context.state.array_records:
            raise ProtocolError(
                f"round {rnd}: a consensus arrived but this client kept no trained adapter "
                "(it did not train this round, or its SuperNode restarted)",
                client_id=env.client_id,
                reason="state",
            )
        kept = decode(wire.read_blob(context.state.array_records[_STATE]["adapter"]))
        header, weights = upload_to_adapter(kept)
        if header["round"] != rnd or header["client_id"] != env.client_id:
            raise ProtocolError(
                f"the kept adapter is from round {header['round']} (client "
                f"{header['client_id']}); this consensus is for round {rnd}",
                client_id=env.client_id,
                reason="round",
            )
        state = {
            "weights": weights,
            "round": rnd,
            "client_id": env.client_id,
            "num_examples": int(header["num_examples"]),
        }
        up, seconds = client_upload(env.cfg, blobs["consensus"], state=state, crypto=env.crypto)
        del context.state.array_records[_STATE]
        return wire.content({"upload": up}, metrics={"upload": seconds})

    return _reply(msg, step)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """The evaluator: accuracy and macro-F1 of the broadcast's global model on the held-out
    examples (:func:`shelora_core.federation.evaluate_global`, the in-process evaluation)."""
    from ..federation import evaluate_global

    def step() -> Any:
        _configure_threads()
        env = ClientEnv.from_context(context)
        if env.node.evaluator_dir is None:
            raise ProtocolError(
                "this SuperNode holds no evaluator directory: give one SuperNode "
                "--node-config \"... evaluator-dir='<root>/evaluator'\"",
                reason="role",
            )
        t0 = time.perf_counter()
        scores = evaluate_global(
            env.cfg,
            wire.read_blobs(msg)["broadcast"],
            env.model,
            env.test_data,
            crypto=env.evaluator_crypto,
        )
        return wire.content(metrics={**scores, "seconds": time.perf_counter() - t0})

    return _reply(msg, step)
