"""The in-process federation driver: rounds of client steps and server steps exchanging bytes.

:func:`shelora_core.client.client_step` and :func:`shelora_core.server.server_step` (the round
engine) are where work happens; the :class:`Federation` loop merely calls them and moves ``bytes``
between them, so a Flower
ServerApp/ClientApp can drive the very same functions across machines (docs/design.md, "Layers").
No Python object passes between a client step and a server step.

Per round: the server samples clients (``client_fraction``), every sampled client builds its
adapter from the last broadcast (or the common initial adapter in round 1), trains
``local_steps`` AdamW steps with a learning rate cosine-annealed over rounds, and uploads; the
server weighs clients by sample count over those that answered, aggregates and broadcasts. The
global model (the broadcast at the largest rank) is evaluated on held-out data by the evaluator
(its own key). After every round one checkpoint file is written atomically
(:mod:`shelora_core.checkpoint`: key holder, server, clients and evaluator each have their own
directory; the server's holds no secret); running the same configuration again resumes from it.

A client whose own step refuses (a stale broadcast, a named error) drops out of the round; the
server refuses bad uploads one by one (:mod:`shelora_core.validation`) and aggregates the rest,
re-weighted, when at least ``cfg.min_clients`` remain. Both are recorded in the round's record
under ``"rejected"``.

Two methods add an exchange to the plain client-step / server-step round:

* SHE-LoRA (``column_order="negotiated"``) negotiates its column list G before round 1 and, with
  ``renegotiate_every=K``, again before rounds 1+K, 1+2K, ... on the current global adapter
  (sensitivity -> OPE -> server negotiation; the cost lands in that round's record). Every G is
  kept by every client (``clients/<i>/columns.json`` for round 1, ``columns_r<round>.json``
  after), so a resumed run uses the same lists.
* MaskCrypt exchanges masks inside every round: :func:`client_step` returns the client's mask
  proposal and keeps its trained adapter in a client-side ``state``; :func:`server_consensus`
  merges the proposals; :func:`client_upload` encrypts with the consensus; :func:`server_step`
  aggregates (costs recorded as ``consensus_*``).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint import RunDirs, atomic_write
from .ckks import ClientCrypto, KeyHolder, ServerCrypto
from .client import (
    client_step,
    client_upload,
    receive,
    secret_init_seed,
)
from .config import FederatedConfig
from .data import ClientData, TextDataset, encode_dataset, load_dataset
from .engine import run_negotiation
from .errors import CheckpointError, RoundError, SheloraError
from .lora import LoraModel
from .messages import Message, decode
from .methods import ckks_params_for, get_method
from .methods.shelora import public_columns
from .metrics import classification_metrics
from .partitions import partition, partition_stats
from .provenance import run_meta
from .records import (
    RunResult,
    negotiation_record,
    negotiation_summary,
    round_record,
    rows_current,
)
from .server import sample_clients, server_consensus, server_round, with_client_refusals

__all__ = [
    "Federation",
    "RunResult",
    "build_model",
    "client_datasets",
    "client_parts",
    "encode_examples",
    "evaluate_global",
    "negotiation_record",
    "negotiation_summary",
    "round_record",
    "run_federated",
    "split_data",
]


def quiet() -> bool:
    """True when running headless (papermill / CI): no progress bars."""
    return os.environ.get("SHELORA_QUIET", "0") not in ("", "0", "false", "False")


# ---------------------------------------------------------------------------- the loop
# ---------------------------------------------------------------------------- shared pieces
# The loop below and a remote driver (:mod:`shelora_core.flower`) both build their data, their
# model, their evaluation and their round records with these functions.
def split_data(config: FederatedConfig) -> tuple[TextDataset, TextDataset, list[np.ndarray]]:
    """The run's training and test examples and each client's indices into the training set.

    Seeded by ``config.seed``: every process that calls it with the same configuration (the
    in-process loop, each remote client, the evaluator) gets the same split.

    Raises:
        ValueError: more clients than the training examples allow.
    """
    train, test = load_dataset(config.dataset, seed=config.seed)
    if config.train_examples is not None and config.train_examples < len(train):
        pick = np.random.default_rng([config.seed, 3]).choice(
            len(train), config.train_examples, replace=False
        )
        train = train.subset(np.sort(pick))
    if config.num_clients * config.min_client_examples > len(train):
        raise ValueError(
            f"config.num_clients = {config.num_clients} is invalid: more clients than the data "
            f"allows ({config.num_clients} x {config.min_client_examples} > {len(train)} examples)"
        )
    if config.eval_examples is not None and config.eval_examples < len(test):
        pick = np.random.default_rng([config.seed, 4]).choice(
            len(test), config.eval_examples, replace=False
        )
        test = test.subset(np.sort(pick))
    return train, test, client_parts(config, train.labels)


def client_parts(config: FederatedConfig, labels: np.ndarray) -> list[np.ndarray]:
    """Each client's indices into examples with ``labels``, as ``config`` partitions them
    (scheme, Dirichlet concentration, seed, minimum size)."""
    return partition(
        labels,
        config.num_clients,
        scheme=config.partition,
        alpha=config.dirichlet_alpha,
        seed=config.seed,
        min_size=config.min_client_examples,
    )


def build_model(config: FederatedConfig, num_labels: int) -> LoraModel:
    """The run's :class:`LoraModel` with one adapter slot per rank (seeded by ``config.seed``)."""
    return LoraModel(
        config.model,
        num_labels=num_labels,
        ranks=config.ranks,
        alpha=config.lora_alpha,
        target_modules=config.target_modules,
        seed=config.seed,
    )


def encode_examples(config: FederatedConfig, ds: TextDataset, tokenizer: Any) -> ClientData:
    """``ds`` tokenized to ``config.max_length`` (padded to it, so a subset encodes the same)."""
    enc = encode_dataset(tokenizer, ds, max_length=config.max_length)
    return ClientData(enc["input_ids"], enc["attention_mask"], enc["labels"])


def client_datasets(
    config: FederatedConfig, train: TextDataset, parts: list[np.ndarray], tokenizer: Any
) -> list[ClientData]:
    """Each client's private examples (client ``i`` holds ``train[parts[i]]``), tokenized."""
    enc = encode_dataset(tokenizer, train, max_length=config.max_length)
    return [
        ClientData(enc["input_ids"][p], enc["attention_mask"][p], enc["labels"][p])
        for p in (torch.as_tensor(p) for p in parts)
    ]


def evaluate_global(
    config: FederatedConfig,
    broadcast: bytes,
    model: LoraModel,
    test_data: ClientData,
    *,
    crypto: Any = None,
) -> dict[str, float]:
    """Accuracy and macro-F1 of the global model: the broadcast read at the largest rank with
    the evaluator's context ``crypto`` (a secret context for encrypted methods)."""
    r_max = max(config.client_ranks)
    weights = receive(config, broadcast, rank=r_max, crypto=crypto)
    model.load(weights)
    preds, refs = model.predict(test_data.batches(64))
    return classification_metrics(preds, refs)


class Federation:
    """Runs one :class:`FederatedConfig`, with checkpoints and resume.

    Args:
        config: the run.
        results_dir: where ``federated_tuning/<run>.jsonl`` and ``checkpoints/<run>/`` go.
        model: an existing :class:`LoraModel` to reuse (must hold every client rank).
        progress: show a tqdm bar over rounds (default: off when ``SHELORA_QUIET=1``).
    """

    def __init__(
        self,
        config: FederatedConfig,
        *,
        results_dir: str | Path,
        model: LoraModel | None = None,
        progress: bool | None = None,
    ) -> None:
        config.validate()
        self.cfg = config
        self.results_dir = Path(results_dir)
        self.progress = (not quiet()) if progress is None else progress
        train, test, self.parts = split_data(config)
        self.train, self.test = train, test
        self.partition_counts = partition_stats(train.labels, self.parts, train.num_labels)
        if model is None:
            model = build_model(config, train.num_labels)
        missing = set(config.ranks) - set(model.ranks)
        if missing or model.alpha != config.lora_alpha:
            raise ValueError(
                f"the given model holds ranks {model.ranks} (alpha {model.alpha}); the config needs "
                f"ranks {config.ranks} (alpha {config.lora_alpha})"
            )
        self.model = model
        from .assets import load_tokenizer

        tok = load_tokenizer(config.model)
        self.clients = client_datasets(config, train, self.parts, tok)
        self.negotiation: dict[str, Any] | None = None  # SHE-LoRA: cost and outcome
        self.columns: dict[str, list[int]] | None = None
        self.client_crypto: ClientCrypto | None = None
        self.server_crypto: ServerCrypto | None = None
        self.evaluator_crypto: ClientCrypto | None = None
        self.key_bytes = {"public": 0, "secret": 0}
        self.dirs = RunDirs(self.checkpoint_dir, config.num_clients)
        ckks = None
        if get_method(config.method, config).needs_crypto:
            params = ckks_params_for(config)
            ckks = lambda: KeyHolder.generate(params, seed=config.seed)  # noqa: E731
        self.keys = self.dirs.keys(
            ckks=ckks,
            ope=config.uses_columns and config.column_order == "negotiated",
            init=config.secret_init,
        )
        # secret_init: the clients' seed of the initial A (client-side; the server never has it)
        self.init_seed = secret_init_seed(self.keys.init_key) if config.secret_init else None
        if ckks is not None:
            secret, public = self.keys.client_secret, self.keys.server_public
            self.client_crypto = ClientCrypto(secret)  # what every client loads
            self.server_crypto = ServerCrypto(public)  # what the server loads: no secret key
            self.evaluator_crypto = ClientCrypto(self.keys.evaluator_secret)
            self.key_bytes = {"public": len(public), "secret": len(secret)}
            get_method(config.method, config).check_sum_range(
                max(len(p) for p in self.parts), self.client_crypto.max_abs
            )
        self.test_data = encode_examples(config, test, tok)

    # -------------------------------------------------------------- paths
    @property
    def checkpoint_dir(self) -> Path:
        return self.results_dir / "checkpoints" / self.cfg.run_name

    def role_dir(self, role: str, client_id: int | None = None) -> Path:
        """A role's directory: ``"keyholder"``, ``"server"``, ``"evaluator"`` or ``"client"``
        (with ``client_id``); see :mod:`shelora_core.checkpoint`."""
        dirs = RunDirs(self.checkpoint_dir, self.cfg.num_clients)
        if role == "client":
            return dirs.client(0 if client_id is None else client_id)
        return getattr(dirs, role)

    @property
    def metrics_path(self) -> Path:
        return self.results_dir / "federated_tuning" / f"{self.cfg.run_name}.jsonl"

    def _columns(
        self, *, fresh: bool, round_: int = 1, broadcast: bytes | None = None
    ) -> dict[str, list[int]] | None:
        """SHE-LoRA's column list G for ``round_``: a public ablation order, or the list
        negotiated before round ``cfg.negotiation_round(round_)``.

        A negotiated list is kept with the clients' keys, so a resumed run reuses it; it is
        negotiated now (``self.negotiation`` then holds its cost) when ``round_`` is that round
        and no list is kept, or when ``fresh``. A re-negotiation scores the current global
        adapter, each client's reparameterization of ``broadcast``.
        """
        cfg = self.cfg
        if not cfg.uses_columns:
            return None
        public = public_columns(cfg, self.model.base_weights())
        if public is not None:
            return public
        e = cfg.negotiation_round(round_)
        saved = None if fresh else self.dirs.load_columns(e)
        if saved is not None:
            self.negotiation = saved["negotiation"]
            return saved["columns"]
        if e != round_:
            raise CheckpointError(
                f"round {round_} uses the column list negotiated before round {e}, but the "
                f"clients' {self.dirs.columns_name(e)} under {self.dirs.root / 'clients'} is "
                f"missing; delete {self.checkpoint_dir} to start the run over"
            )
        if e > 1 and broadcast is None:
            raise ValueError("a re-negotiation scores the global adapter: pass the last broadcast")
        from .ope import ColumnOPE, OPEKey

        ope = ColumnOPE(
            OPEKey.from_bytes(self.keys.ope_key)
        )  # the clients' key, never the server's
        weights = None  # before round 1: every client's initial adapter
        if self.init_seed is not None and broadcast is None:  # secret_init: from the shared key
            weights = [
                self.model.init_weights(cfg.client_rank(i), seed=self.init_seed)
                for i in range(cfg.num_clients)
            ]
        if broadcast is not None:  # a re-negotiation: the current global adapter at each rank
            weights = [
                receive(cfg, broadcast, client_id=i, round_=round_, crypto=self.client_crypto)
                for i in range(cfg.num_clients)
            ]
        trace = run_negotiation(cfg, self.model, self.clients, ope=ope, weights=weights)
        columns = trace.columns
        self.negotiation = negotiation_summary(
            e,
            proposals=trace.proposals,
            broadcast=trace.broadcast,
            result=trace.result,
            client_seconds=trace.seconds["proposal"],
            server_seconds=trace.seconds["server"],
        )
        self.dirs.save_columns(e, {"columns": columns, "negotiation": self.negotiation})
        return columns

    def _negotiation_record(self) -> dict[str, Any]:
        """The cost of the negotiation held in ``self.negotiation``, for a round's record."""
        return negotiation_record(self.negotiation, self.cfg.num_clients)

    def _load_checkpoint(self) -> tuple[int, bytes | None, list[dict]]:
        start, broadcast, history = self.dirs.load_checkpoint(self.cfg.fingerprint())
        if start:  # the derived records follow the checkpoint (a kill may have come between)
            self._write_metrics(history)
        return start, broadcast, history

    def last_broadcast(self) -> bytes | None:
        """The broadcast of the last checkpointed round (``None`` before round 1)."""
        return self.dirs.load_checkpoint(self.cfg.fingerprint())[1]

    def _save_checkpoint(self, round_: int, broadcast: bytes, history: list[dict]) -> None:
        self.dirs.save_checkpoint(
            round_=round_,
            broadcast=broadcast,
            history=history,
            fingerprint=self.cfg.fingerprint(),
            config=self.cfg.to_dict(),
        )
        self._write_metrics(history)

    def _write_metrics(self, history: list[dict]) -> None:
        atomic_write(self.metrics_path, "".join(json.dumps(h) + "\n" for h in history).encode())

    @property
    def summary_path(self) -> Path:
        """Written when the run completes: its :meth:`RunResult.summary` and meta (a finished run
        is documented even when the notebook that collects all runs has not finished)."""
        return self.metrics_path.with_name(f"{self.cfg.run_name}.summary.json")

    def _save_summary(self, result: RunResult) -> None:
        rec = {**result.summary(), "meta": result.meta}
        atomic_write(self.summary_path, json.dumps(rec, indent=1, default=str).encode())

    def completed_history(self) -> list[dict[str, Any]] | None:
        """This configuration's records from its JSONL when it holds every round from this code
        (:data:`RESULTS_VERSION`), else ``None``."""
        if not self.metrics_path.exists():
            return None
        lines = self.metrics_path.read_text().splitlines()
        history = [json.loads(x) for x in lines if x.strip()]
        last = self.cfg.rounds
        stopped = self._stopped()
        if stopped is not None:  # a run that stopped ends before its stop round
            last = int(stopped["round"]) - 1
        complete = [h.get("round") for h in history] == list(range(1, last + 1))
        return history if complete and rows_current(history, self.cfg.method) else None

    def _stopped(self) -> dict[str, Any] | None:
        """The stop recorded in this configuration's summary (``run(on_round_error="stop")``)."""
        if not self.summary_path.exists():
            return None
        return json.loads(self.summary_path.read_text()).get("stopped")

    # -------------------------------------------------------------- evaluation
    def evaluate(self, broadcast: bytes) -> dict[str, float]:
        """Accuracy and macro-F1 of the global model (the broadcast at the largest rank)."""
        return evaluate_global(
            self.cfg, broadcast, self.model, self.test_data, crypto=self.evaluator_crypto
        )

    # -------------------------------------------------------------- the loop
    def run(
        self,
        *,
        resume: bool = True,
        stop_after_round: int | None = None,
        on_round: Callable[[dict[str, Any]], None] | None = None,
        reuse_complete: bool = False,
        on_round_error: str = "raise",
    ) -> RunResult:
        """Run (or resume) the federation.

        Args:
            resume: continue from the last checkpoint of this exact configuration, if any.
            stop_after_round: stop after this round as if interrupted (tests, notebooks).
            on_round: called with each new round's record.
            reuse_complete: when this configuration's per-round JSONL already holds every round
                (from this code's :data:`RESULTS_VERSION`), return it without training: the
                paper profile's hours-long runs survive without their (uncommitted) checkpoints.
                A run that stopped (below) counts as finished: re-running it stops again.
            on_round_error: ``"raise"`` (default) raises the :class:`RoundError` of a round that
                cannot be aggregated (fewer than ``min_clients`` valid uploads, e.g. every sampled
                client refused to encrypt a diverged update); ``"stop"`` ends the run there
                instead and returns the rounds before it, with ``RunResult.stopped`` (round,
                error, every refusal) recorded in the summary: a grid of runs goes on and
                reports the stop (a stop in the run's first round still raises).
        """
        if on_round_error not in ("raise", "stop"):
            raise ValueError(f"on_round_error={on_round_error!r}: choose 'raise' or 'stop'")
        if self.progress:
            from tqdm.auto import tqdm
        else:
            from tqdm import tqdm

        cfg = self.cfg
        if resume and reuse_complete:
            done = self.completed_history()
            if done is not None:
                return self._reused(done)
        method = get_method(cfg.method, cfg)
        start, broadcast, history = self._load_checkpoint() if resume else (0, None, [])
        first = min(start + 1, cfg.rounds)
        self.columns = self._columns(fresh=not resume, round_=first, broadcast=broadcast)
        negotiated = cfg.uses_columns and cfg.column_order == "negotiated"
        neg_round = cfg.negotiation_round(first)
        bar = tqdm(
            range(start + 1, cfg.rounds + 1),
            desc=cfg.run_name[:40],
            initial=start,
            total=cfg.rounds,
            disable=not self.progress,
            leave=False,
        )
        stopped: dict[str, Any] | None = None
        for rnd in bar:
            extra: dict[str, Any] = {}
            if negotiated and cfg.negotiation_round(rnd) != neg_round:  # re-negotiate before rnd
                neg_round = cfg.negotiation_round(rnd)
                self.columns = self._columns(fresh=not resume, round_=rnd, broadcast=broadcast)
            if negotiated and neg_round == rnd:  # G was negotiated before this round: its cost
                extra.update(self._negotiation_record())
            t0 = time.perf_counter()
            uploads, losses, client_secs, parts, states, ids = [], [], [], [], [], []
            failed: list[dict[str, Any]] = []  # clients whose own step refused (named errors)
            sampled = sample_clients(cfg, rnd)
            for cid in sampled:
                tc = time.perf_counter()
                state: dict[str, Any] | None = {} if method.needs_consensus else None
                try:
                    up, loss, secs = client_step(
                        cfg,
                        self.model,
                        self.clients[cid],
                        client_id=cid,
                        round_=rnd,
                        broadcast=broadcast,
                        crypto=self.client_crypto,
                        columns=self.columns,
                        state=state,
                        init_seed=self.init_seed,
                    )
                except SheloraError as exc:  # this client drops out; the round goes on
                    failed.append(_failure(cid, exc))
                    continue
                client_secs.append(time.perf_counter() - tc)
                parts.append(secs)
                uploads.append(up)
                losses.append(loss)
                states.append(state)
                ids.append(cid)
            download = len(broadcast) if broadcast is not None else 0
            senders = list(ids)  # who delivered each upload
            consensus = None
            if method.needs_consensus:  # MaskCrypt: masks -> consensus -> encrypted uploads
                proposals = uploads
                ts = time.perf_counter()
                consensus = server_consensus(cfg, proposals, round_=rnd)
                extra["consensus_server_seconds"] = time.perf_counter() - ts
                uploads, senders = [], []
                for j, st in enumerate(states):
                    tc = time.perf_counter()
                    try:
                        up, parts[j]["upload"] = client_upload(
                            cfg, consensus, state=st, crypto=self.client_crypto
                        )
                    except SheloraError as exc:
                        failed.append(_failure(ids[j], exc))
                        parts[j]["upload"] = time.perf_counter() - tc
                        continue
                    client_secs[j] += time.perf_counter() - tc
                    uploads.append(up)
                    senders.append(ids[j])
                extra.update(
                    consensus_upload_bytes=int(sum(len(x) for x in proposals)),
                    consensus_broadcast_bytes=len(consensus),
                    client_mask_seconds=float(np.mean([x["mask"] for x in parts])),
                )
            ts = time.perf_counter()
            try:
                outcome = server_round(
                    cfg,
                    uploads,
                    round_=rnd,
                    crypto=self.server_crypto,
                    consensus=consensus,
                    sampled=sampled,
                    senders=senders,
                    layers=self.model.layer_shapes,
                    head={k: v.shape for k, v in self.model.initial_head.items()},
                )
            except RoundError as exc:  # the server knows only what reached it: add who never sent
                err = with_client_refusals(exc, failed)
                if on_round_error == "raise" or not history:  # nothing to report before it
                    raise err from exc
                stopped = {"round": rnd, "error": str(err), "rejected": err.rejected}
                break
            broadcast = outcome.broadcast
            if failed or outcome.rejected:  # recorded only when it happens (records stay as before)
                extra["rejected"] = failed + outcome.rejected
            server_secs = time.perf_counter() - ts
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
                key_bytes_public=self.key_bytes["public"],
                server_seconds=server_secs,
                extra=extra,
            )
            if rnd % cfg.eval_every == 0 or rnd == cfg.rounds:
                rec.update(self.evaluate(broadcast))
            rec["seconds"] = time.perf_counter() - t0
            history.append(rec)
            self._save_checkpoint(rnd, broadcast, history)
            if on_round is not None:
                on_round(rec)
            if rec["accuracy"] is not None:
                bar.set_postfix(acc=f"{rec['accuracy']:.3f}", loss=f"{rec['train_loss']:.3f}")
            if stop_after_round is not None and rnd >= stop_after_round:
                break
        bar.close()
        if stopped is not None and history[-1].get("accuracy") is None:
            # the last aggregated round is the run's result: evaluate it as a final round
            history[-1].update(self.evaluate(broadcast))
            self._write_metrics(history)
        if stopped is None and len(history) == start:  # the checkpoint held every round
            return self._reused(history)
        meta = run_meta(cfg.seed)
        if start:
            meta["resumed_after_round"] = start
        if self.negotiation is not None:
            meta["negotiation"] = self.negotiation
        result = RunResult(cfg, history, self.partition_counts, meta=meta, stopped=stopped)
        if len(history) == cfg.rounds or stopped is not None:
            self._save_summary(result)
        return result

    def _reused(self, history: list[dict[str, Any]]) -> RunResult:
        """A finished run returned without training, with the provenance (commit, time, threads)
        its summary recorded when it was computed, marked ``reused``."""
        saved = {}
        if self.summary_path.exists():
            saved = json.loads(self.summary_path.read_text()).get("meta", {})
        meta = {**saved, "reused": True}
        if not saved:  # finished before summaries existed: say what is not known
            meta["provenance"] = "not recorded (summary written after the run)"
            meta["summary_written"] = run_meta(self.cfg.seed)
        result = RunResult(
            self.cfg, history, self.partition_counts, meta=meta, stopped=self._stopped()
        )
        if not saved:
            self._save_summary(result)
        return result


def _failure(client_id: int, exc: Exception) -> dict[str, Any]:
    """A round record's entry for a client whose own step refused (it did not upload)."""
    return {
        "client_id": int(client_id),
        "reason": getattr(exc, "reason", None) or f"client:{type(exc).__name__}",
        "error": str(exc),
    }


def run_federated(config: FederatedConfig, *, results_dir: str | Path, **kwargs: Any) -> RunResult:
    """Convenience: build a :class:`Federation` for ``config`` and run it."""
    model = kwargs.pop("model", None)
    progress = kwargs.pop("progress", None)
    return Federation(config, results_dir=results_dir, model=model, progress=progress).run(**kwargs)


def broadcast_message(data: bytes) -> Message:
    """Decode broadcast bytes (for notebooks that want to look inside)."""
    return decode(data, expect_kind="broadcast")
