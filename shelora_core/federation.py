"""The in-process federation driver: rounds of client steps and server steps exchanging bytes.

:func:`client_step` and :func:`server_step` are the only two places where work happens; the
:class:`Federation` loop merely calls them and moves ``bytes`` between them, so a Flower
ServerApp/ClientApp can drive the very same functions across machines (DESIGN.md section 3).
No Python object passes between a client step and a server step.

Per round: the server samples clients (``client_fraction``), every sampled client builds its
adapter from the last broadcast (or the common initial adapter in round 1), trains
``local_steps`` AdamW steps with a learning rate cosine-annealed over rounds, and uploads; the
server weighs clients by sample count over those that answered, aggregates and broadcasts. The
global model (the broadcast at the largest rank) is evaluated on held-out data. After every round
a checkpoint is written atomically; running the same configuration again resumes from it.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .ckks import ClientCrypto, KeyHolder, ServerCrypto
from .config import FederatedConfig
from .data import encode_dataset, load_dataset, partition, partition_stats
from .lora import LoraModel
from .messages import Message, decode, encode
from .methods import ckks_params_for, get_method
from .methods.shelora import public_column_order
from .metrics import classification_metrics
from .provenance import run_meta

__all__ = ["ClientData", "Federation", "RunResult", "client_step", "server_step"]


def quiet() -> bool:
    """True when running headless (papermill / CI): no progress bars."""
    return os.environ.get("SHELORA_QUIET", "0") not in ("", "0", "false", "False")


# ---------------------------------------------------------------------------- client side
@dataclass
class ClientData:
    """A client's private, tokenized examples (tensors indexed by example)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def batch(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        mask = self.attention_mask[idx]
        width = max(int(mask.sum(1).max()), 1)  # trim padding columns shared by the batch
        return {
            "input_ids": self.input_ids[idx, :width],
            "attention_mask": mask[:, :width],
            "labels": self.labels[idx],
        }

    def batches(self, batch_size: int):
        for start in range(0, len(self), batch_size):
            yield self.batch(torch.arange(start, min(start + batch_size, len(self))))


def learning_rate(cfg: FederatedConfig, round_: int) -> float:
    """Cosine annealing over rounds, from ``lr`` (round 1) to ``lr * lr_final_ratio`` (last)."""
    if cfg.rounds == 1:
        return cfg.lr
    t = (round_ - 1) / (cfg.rounds - 1)
    lo = cfg.lr * cfg.lr_final_ratio
    return lo + 0.5 * (cfg.lr - lo) * (1 + math.cos(math.pi * t))


def _seed(*parts: int) -> int:
    return int(np.random.default_rng(list(parts)).integers(2**31 - 1))


def local_train(
    model: LoraModel,
    data: ClientData,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    seed: int,
) -> float:
    """AdamW on the active adapter and head for ``steps`` minibatches; returns the mean loss."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    params = model.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    model.model.train()
    order = torch.randperm(len(data), generator=gen)
    pos, losses = 0, []
    for _ in range(steps):
        if pos + batch_size > len(order) and pos > 0:
            order, pos = torch.randperm(len(data), generator=gen), 0
        idx = order[pos : pos + batch_size]
        pos += batch_size
        b = data.batch(idx)
        loss = torch.nn.functional.cross_entropy(
            model.logits(b["input_ids"], b["attention_mask"]), b["labels"]
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.model.eval()
    return float(np.mean(losses))


def client_step(
    cfg: FederatedConfig,
    model: LoraModel,
    data: ClientData,
    *,
    client_id: int,
    round_: int,
    broadcast: bytes | None,
    crypto: ClientCrypto | None = None,
    columns: dict[str, list[int]] | None = None,
) -> tuple[bytes, float, dict[str, float]]:
    """One client's round: adapter from the broadcast, local training, upload bytes.

    Args:
        cfg: the run's public configuration.
        model: the (shared, frozen) base model with adapter slots; only this client's weights are
            loaded into it during the step.
        data: this client's private examples.
        client_id: the client's id (its rank is ``cfg.client_rank(client_id)``).
        round_: 1-based round number.
        broadcast: the server's last broadcast, or ``None`` in the first round.
        crypto: the client's CKKS context (secret key) for encrypted methods.
        columns: SHE-LoRA: the negotiated ordered column list G per layer (client-side state).

    Returns:
        ``(upload_bytes, mean_training_loss, seconds)`` with ``seconds`` split into
        ``receive`` (decrypt + reparameterize), ``train`` and ``upload`` (encrypt + serialize).
    """
    method = get_method(cfg.method, cfg)
    rank = cfg.client_rank(client_id)
    t0 = time.perf_counter()
    if broadcast is None:
        weights = model.init_weights(rank, seed=cfg.seed)
    else:
        weights = method.client_weights(
            decode(broadcast, expect_kind="broadcast"),
            rank=rank,
            alpha=cfg.lora_alpha,
            seed=_seed(cfg.seed, round_, client_id, 0),
            crypto=crypto,
        )
    model.load(weights)
    t1 = time.perf_counter()
    loss = local_train(
        model,
        data,
        steps=cfg.local_steps,
        batch_size=cfg.batch_size,
        lr=learning_rate(cfg, round_),
        weight_decay=cfg.weight_decay,
        seed=_seed(cfg.seed, round_, client_id, 1),
    )
    t2 = time.perf_counter()
    if cfg.method == "shelora" and columns is None:
        if cfg.column_order == "negotiated":
            raise ValueError("SHE-LoRA with column_order='negotiated' needs the negotiated columns")
        columns = public_column_order(
            model.base_weights(), cfg.max_budget, order=cfg.column_order, seed=cfg.seed
        )
    upload = method.make_upload(
        model.read(),
        round_=round_,
        client_id=client_id,
        num_examples=len(data),
        crypto=crypto,
        columns=columns,
    )
    data_bytes = encode(upload)
    t3 = time.perf_counter()
    return data_bytes, loss, {"receive": t1 - t0, "train": t2 - t1, "upload": t3 - t2}


# ---------------------------------------------------------------------------- server side
def sample_clients(cfg: FederatedConfig, round_: int) -> list[int]:
    """The clients asked to train in ``round_`` (seeded; sorted)."""
    if cfg.clients_per_round >= cfg.num_clients:
        return list(range(cfg.num_clients))
    rng = np.random.default_rng([cfg.seed, round_, 2])
    return sorted(int(i) for i in rng.choice(cfg.num_clients, cfg.clients_per_round, replace=False))


def server_step(
    cfg: FederatedConfig, uploads: list[bytes], *, round_: int, crypto: ServerCrypto | None = None
) -> bytes:
    """Aggregate the uploads of the clients that answered ``round_`` into broadcast bytes.

    ``crypto`` is the server's PUBLIC CKKS context (encrypted methods); it cannot decrypt.
    """
    method = get_method(cfg.method, cfg)
    msgs = [decode(u, expect_kind="upload") for u in uploads]
    for m in msgs:
        if m.header.get("round") != round_:
            raise ValueError(
                f"upload from client {m.header.get('client_id')} is for round "
                f"{m.header.get('round')}, not {round_}"
            )
    return encode(
        method.server_aggregate(msgs, round_=round_, max_rank=max(cfg.client_ranks), crypto=crypto)
    )


# ---------------------------------------------------------------------------- the loop
@dataclass
class RunResult:
    """What a run leaves: the config, one record per round and a summary."""

    config: FederatedConfig
    history: list[dict[str, Any]]
    partition_counts: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def final_accuracy(self) -> float:
        return self.history[-1]["accuracy"]

    def summary(self) -> dict[str, Any]:
        cfg = self.config
        evals = [h for h in self.history if h.get("accuracy") is not None]
        return {
            "run_name": cfg.run_name,
            "method": cfg.method,
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
            "cipher_mode": cfg.cipher_mode if cfg.method == "shelora" else None,
            "he_budgets": list(cfg.he_budgets) if cfg.method == "shelora" else None,
            "config": cfg.to_dict(),
        }


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
        self.train, self.test = train, test
        self.parts = partition(
            train.labels,
            config.num_clients,
            scheme=config.partition,
            alpha=config.dirichlet_alpha,
            seed=config.seed,
            min_size=config.min_client_examples,
        )
        self.partition_counts = partition_stats(train.labels, self.parts, train.num_labels)
        if model is None:
            model = LoraModel(
                config.model,
                num_labels=train.num_labels,
                ranks=config.ranks,
                alpha=config.lora_alpha,
                target_modules=config.target_modules,
                seed=config.seed,
            )
        missing = set(config.ranks) - set(model.ranks)
        if missing or model.alpha != config.lora_alpha:
            raise ValueError(
                f"the given model holds ranks {model.ranks} (alpha {model.alpha}); the config needs "
                f"ranks {config.ranks} (alpha {config.lora_alpha})"
            )
        self.model = model
        from .assets import load_tokenizer

        tok = load_tokenizer(config.model)
        enc = encode_dataset(tok, train, max_length=config.max_length)
        self.clients = [
            ClientData(enc["input_ids"][p], enc["attention_mask"][p], enc["labels"][p])
            for p in (torch.as_tensor(p) for p in self.parts)
        ]
        self.negotiation: dict[str, Any] | None = None  # SHE-LoRA: cost and outcome
        self.columns: dict[str, list[int]] | None = None
        self.client_crypto: ClientCrypto | None = None
        self.server_crypto: ServerCrypto | None = None
        self.key_bytes = {"public": 0, "secret": 0}
        if get_method(config.method, config).needs_crypto:
            secret, public = self._keys(ckks_params_for(config))
            self.client_crypto = ClientCrypto(secret)  # what every client loads
            self.server_crypto = ServerCrypto(public)  # what the server loads: no secret key
            self.key_bytes = {"public": len(public), "secret": len(secret)}
        enc_test = encode_dataset(tok, test, max_length=config.max_length)
        self.test_data = ClientData(
            enc_test["input_ids"], enc_test["attention_mask"], enc_test["labels"]
        )

    # -------------------------------------------------------------- paths
    @property
    def checkpoint_dir(self) -> Path:
        return self.results_dir / "checkpoints" / self.cfg.run_name

    @property
    def metrics_path(self) -> Path:
        return self.results_dir / "federated_tuning" / f"{self.cfg.run_name}.jsonl"

    def _columns(self, *, fresh: bool) -> dict[str, list[int]] | None:
        """SHE-LoRA's column list G: negotiated once before round 1 (kept with the clients' keys
        so a resumed run reuses it), or a public ablation order."""
        cfg = self.cfg
        if cfg.method != "shelora":
            return None
        if cfg.column_order != "negotiated":
            return public_column_order(
                self.model.base_weights(), cfg.max_budget, order=cfg.column_order, seed=cfg.seed
            )
        path = self.checkpoint_dir / "keys" / "columns.json"
        if path.exists() and not fresh:
            saved = json.loads(path.read_text())
            self.negotiation = saved["negotiation"]
            return saved["columns"]
        from .methods.shelora_negotiation import client_columns, client_proposal, server_negotiate
        from .ope import ColumnOPE, OPEKey

        key_path = self.checkpoint_dir / "keys" / "ope.key"
        key = OPEKey.from_bytes(key_path.read_bytes()) if key_path.exists() else OPEKey.generate()
        key_path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(key_path, key.to_bytes())  # the clients' shared key: never sent to the server
        ope = ColumnOPE(key)
        t0 = time.perf_counter()
        ups = [
            encode(client_proposal(cfg, self.model, self.clients[i], client_id=i, ope=ope))
            for i in range(cfg.num_clients)
        ]
        t1 = time.perf_counter()
        msg, result = server_negotiate(cfg, [decode(u, expect_kind="proposal") for u in ups])
        down = encode(msg)
        t2 = time.perf_counter()
        columns = client_columns(decode(down, expect_kind="negotiation"), ope)
        self.negotiation = {
            "proposal_bytes_per_client": float(np.mean([len(u) for u in ups])),
            "broadcast_bytes": len(down),
            "client_seconds": (t1 - t0) / cfg.num_clients,
            "server_seconds": t2 - t1,
            "coverage": result.coverage,
            "risk": result.risk,
            "tiers": {layer: [(t.a, t.b) for t in tiers] for layer, tiers in result.tiers.items()},
        }
        _atomic_write(
            path,
            json.dumps({"columns": columns, "negotiation": self.negotiation}, indent=1).encode(),
        )
        return columns

    def _keys(self, params: str) -> tuple[bytes, bytes]:
        """The key holder's CKKS contexts, kept beside the checkpoint so a resumed run can read
        the last broadcast (TenSEAL keys cannot be seeded)."""
        d = self.checkpoint_dir / "keys"
        sec, pub = d / "secret.ctx", d / "public.ctx"
        if sec.exists() and pub.exists():
            return sec.read_bytes(), pub.read_bytes()
        kh = KeyHolder.generate(params, seed=self.cfg.seed)
        d.mkdir(parents=True, exist_ok=True)
        _atomic_write(sec, kh.secret_bytes())
        _atomic_write(pub, kh.public_bytes())
        return kh.secret_bytes(), kh.public_bytes()

    def _load_checkpoint(self) -> tuple[int, bytes | None, list[dict]]:
        state = self.checkpoint_dir / "state.json"
        blob = self.checkpoint_dir / "broadcast.bin"
        if not (state.exists() and blob.exists()):
            return 0, None, []
        s = json.loads(state.read_text())
        if s.get("fingerprint") != self.cfg.fingerprint():
            raise RuntimeError(f"checkpoint {state} belongs to another configuration; delete it")
        data = blob.read_bytes()
        decode(data, expect_kind="broadcast")  # a damaged checkpoint fails loudly, not silently
        return int(s["round"]), data, list(s["history"])

    def _save_checkpoint(self, round_: int, broadcast: bytes, history: list[dict]) -> None:
        d = self.checkpoint_dir
        d.mkdir(parents=True, exist_ok=True)
        _atomic_write(d / "broadcast.bin", broadcast)
        state = {
            "round": round_,
            "fingerprint": self.cfg.fingerprint(),
            "config": self.cfg.to_dict(),
            "history": history,
        }
        _atomic_write(d / "state.json", json.dumps(state, indent=1).encode())
        self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(self.metrics_path, "".join(json.dumps(h) + "\n" for h in history).encode())

    # -------------------------------------------------------------- evaluation
    def evaluate(self, broadcast: bytes) -> dict[str, float]:
        """Accuracy and macro-F1 of the global model (the broadcast at the largest rank)."""
        method = get_method(self.cfg.method, self.cfg)
        r_max = max(self.cfg.client_ranks)
        weights = method.client_weights(
            decode(broadcast, expect_kind="broadcast"),
            rank=r_max,
            alpha=self.cfg.lora_alpha,
            crypto=self.client_crypto,
        )
        self.model.load(weights)
        preds, refs = self.model.predict(self.test_data.batches(64))
        return classification_metrics(preds, refs)

    # -------------------------------------------------------------- the loop
    def run(
        self,
        *,
        resume: bool = True,
        stop_after_round: int | None = None,
        on_round: Callable[[dict[str, Any]], None] | None = None,
    ) -> RunResult:
        """Run (or resume) the federation.

        Args:
            resume: continue from the last checkpoint of this exact configuration, if any.
            stop_after_round: stop after this round as if interrupted (tests, notebooks).
            on_round: called with each new round's record.
        """
        if self.progress:
            from tqdm.auto import tqdm
        else:
            from tqdm import tqdm

        cfg = self.cfg
        start, broadcast, history = self._load_checkpoint() if resume else (0, None, [])
        self.columns = self._columns(fresh=not resume)
        bar = tqdm(
            range(start + 1, cfg.rounds + 1),
            desc=cfg.run_name[:40],
            initial=start,
            total=cfg.rounds,
            disable=not self.progress,
            leave=False,
        )
        for rnd in bar:
            t0 = time.perf_counter()
            uploads, losses, client_secs, parts = [], [], [], []
            for cid in sample_clients(cfg, rnd):
                tc = time.perf_counter()
                up, loss, secs = client_step(
                    cfg,
                    self.model,
                    self.clients[cid],
                    client_id=cid,
                    round_=rnd,
                    broadcast=broadcast,
                    crypto=self.client_crypto,
                    columns=self.columns,
                )
                client_secs.append(time.perf_counter() - tc)
                parts.append(secs)
                uploads.append(up)
                losses.append(loss)
            download = len(broadcast) if broadcast is not None else 0
            ts = time.perf_counter()
            broadcast = server_step(cfg, uploads, round_=rnd, crypto=self.server_crypto)
            server_secs = time.perf_counter() - ts
            rec: dict[str, Any] = {
                "round": rnd,
                "clients": len(uploads),
                "lr": learning_rate(cfg, rnd),
                "train_loss": float(np.mean(losses)),
                "upload_bytes": int(sum(len(u) for u in uploads)),
                "download_bytes": download * len(uploads),
                "broadcast_bytes": len(broadcast),
                "client_seconds": float(np.mean(client_secs)),
                "client_receive_seconds": float(np.mean([x["receive"] for x in parts])),
                "client_upload_seconds": float(np.mean([x["upload"] for x in parts])),
                "key_bytes_public": self.key_bytes["public"],
                "server_seconds": server_secs,
                "accuracy": None,
                "macro_f1": None,
            }
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
        meta = run_meta(cfg.seed)
        if self.negotiation is not None:
            meta["negotiation"] = self.negotiation
        return RunResult(cfg, history, self.partition_counts, meta=meta)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def run_federated(config: FederatedConfig, *, results_dir: str | Path, **kwargs: Any) -> RunResult:
    """Convenience: build a :class:`Federation` for ``config`` and run it."""
    model = kwargs.pop("model", None)
    progress = kwargs.pop("progress", None)
    return Federation(config, results_dir=results_dir, model=model, progress=progress).run(**kwargs)


def broadcast_message(data: bytes) -> Message:
    """Decode broadcast bytes (for notebooks that want to look inside)."""
    return decode(data, expect_kind="broadcast")
