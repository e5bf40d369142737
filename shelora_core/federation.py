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

Two methods add an exchange to the plain client-step / server-step round:

* SHE-LoRA (``column_order="negotiated"``) negotiates its column list G before round 1 and, with
  ``renegotiate_every=K``, again before rounds 1+K, 1+2K, ... on the current global adapter
  (sensitivity -> OPE -> server negotiation; the cost lands in that round's record). Every G is
  kept with the clients' keys (``keys/columns.json`` for round 1, ``keys/columns_r<round>.json``
  after), so a resumed run uses the same lists.
* MaskCrypt exchanges masks inside every round: :func:`client_step` returns the client's mask
  proposal and keeps its trained adapter in a client-side ``state``; :func:`server_consensus`
  merges the proposals; :func:`client_upload` encrypts with the consensus; :func:`server_step`
  aggregates (costs recorded as ``consensus_*``).
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
from .methods.shelora import public_columns
from .metrics import classification_metrics
from .provenance import run_meta

__all__ = [
    "ClientData",
    "Federation",
    "RunResult",
    "client_step",
    "client_upload",
    "batch_loss",
    "local_gradient",
    "log_label_prior",
    "server_consensus",
    "server_step",
]


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


def log_label_prior(labels: torch.Tensor, num_labels: int) -> torch.Tensor:
    """``log`` of a client's label frequencies, add-one smoothed (no label has prior 0)."""
    counts = torch.bincount(labels, minlength=num_labels).to(torch.float32) + 1.0
    return torch.log(counts / counts.sum())


def batch_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    loss: str = "ce",
    log_prior: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """The local training loss: cross-entropy, or cross-entropy on ``logits + log_prior``
    (``"logit_adjusted"``: the client's label skew goes into the offset, not into the head)."""
    if loss == "logit_adjusted":
        if log_prior is None:
            raise ValueError("loss='logit_adjusted' needs the client's log label prior")
        logits = logits + log_prior
    elif loss != "ce":
        raise ValueError(f"loss = {loss!r} is unknown; choose 'ce' or 'logit_adjusted'")
    return torch.nn.functional.cross_entropy(logits, labels, reduction=reduction)


def local_train(
    model: LoraModel,
    data: ClientData,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    seed: int,
    loss: str = "ce",
    head_lr_scale: float = 1.0,
) -> float:
    """AdamW on the active adapter (learning rate ``lr``) and head (``lr * head_lr_scale``) for
    ``steps`` minibatches; returns the mean loss (see :func:`batch_loss` for ``loss``)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    groups = [{"params": model.adapter_parameters(), "lr": lr}]
    groups.append({"params": model.head_parameters(), "lr": lr * head_lr_scale})
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    log_prior = None
    if loss == "logit_adjusted":
        log_prior = log_label_prior(data.labels, model.num_labels)
    model.model.train()
    order = torch.randperm(len(data), generator=gen)
    pos, losses = 0, []
    for _ in range(steps):
        if pos + batch_size > len(order) and pos > 0:
            order, pos = torch.randperm(len(data), generator=gen), 0
        idx = order[pos : pos + batch_size]
        pos += batch_size
        b = data.batch(idx)
        value = batch_loss(
            model.logits(b["input_ids"], b["attention_mask"]),
            b["labels"],
            loss=loss,
            log_prior=log_prior,
        )
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()
        losses.append(value.item())
    model.model.eval()
    return float(np.mean(losses))


def local_gradient(
    model: LoraModel, data: ClientData, *, num_examples: int, batch_size: int, seed: int
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``(dL/dB, dL/dA)`` per layer of the active adapter, L = mean loss on a calibration batch.

    The batch is ``num_examples`` of the client's examples (seeded,
    :func:`shelora_core.sensitivity.calibration_indices`), evaluated in eval mode (no dropout) at
    the adapter currently loaded. MaskCrypt scores its weights with it.
    """
    from .sensitivity import calibration_indices

    idx = torch.as_tensor(calibration_indices(len(data), num_examples, seed=seed))
    params = model.trainable_parameters()  # per layer lora_A then lora_B, then the head
    lora = params[: 2 * len(model.layer_names)]
    for i, layer in enumerate(model.layer_names):
        m, n = model.layer_shapes[layer]
        a, b = lora[2 * i], lora[2 * i + 1]
        if tuple(a.shape) != (model.active_rank, n) or tuple(b.shape) != (m, model.active_rank):
            raise RuntimeError(f"unexpected LoRA parameter order at layer {layer!r}")
    model.model.eval()
    for prm in params:
        prm.grad = None
    for start in range(0, len(idx), batch_size):
        b = data.batch(idx[start : start + batch_size])
        loss = batch_loss(
            model.logits(b["input_ids"], b["attention_mask"]), b["labels"], reduction="sum"
        ) / len(idx)
        loss.backward()
    grads = {}
    for i, layer in enumerate(model.layer_names):
        a, b = lora[2 * i], lora[2 * i + 1]
        grads[layer] = (b.grad.detach().numpy().copy(), a.grad.detach().numpy().copy())
    for prm in params:
        prm.grad = None
    return grads


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
    state: dict[str, Any] | None = None,
) -> tuple[bytes, float, dict[str, float]]:
    """One client's round: adapter from the broadcast, local training, upload bytes.

    For MaskCrypt (``needs_consensus``) the bytes are the client's mask proposal instead; the
    trained adapter stays in ``state`` (client-side, never sent) for :func:`client_upload`.

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
        state: MaskCrypt: a dict the client keeps between its two steps of a round.

    Returns:
        ``(upload_bytes, mean_training_loss, seconds)`` with ``seconds`` split into
        ``receive`` (decrypt + reparameterize), ``train`` and ``upload`` (encrypt + serialize);
        MaskCrypt: ``mask`` (gradient, scores, proposal) instead of ``upload``.
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
        loss=cfg.loss,
        head_lr_scale=cfg.head_lr_scale,
    )
    t2 = time.perf_counter()
    if method.needs_consensus:
        if state is None:
            raise ValueError(
                f"{cfg.method}: pass a client-side state dict; the trained adapter waits there "
                "for the mask consensus (client_upload)"
            )
        trained = model.read()
        grads = local_gradient(
            model,
            data,
            num_examples=cfg.calibration_examples,
            batch_size=cfg.batch_size,
            seed=_seed(cfg.seed, round_, client_id, 2),
        )
        proposal = method.make_proposal(trained, weights, grads, round_=round_, client_id=client_id)
        state.update(weights=trained, round=round_, client_id=client_id, num_examples=len(data))
        data_bytes = encode(proposal)
        t3 = time.perf_counter()
        return data_bytes, loss, {"receive": t1 - t0, "train": t2 - t1, "mask": t3 - t2}
    if cfg.method == "shelora" and columns is None:
        columns = public_columns(cfg, model.base_weights())
        if columns is None:
            raise ValueError("SHE-LoRA with column_order='negotiated' needs the negotiated columns")
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


def client_upload(
    cfg: FederatedConfig,
    consensus: bytes,
    *,
    state: dict[str, Any],
    crypto: ClientCrypto | None = None,
) -> tuple[bytes, float]:
    """MaskCrypt's second client step: encrypt the consensus entries of the adapter kept in
    ``state`` by :func:`client_step`; returns ``(upload_bytes, seconds)``."""
    t0 = time.perf_counter()
    method = get_method(cfg.method, cfg)
    msg = method.make_upload(
        state["weights"],
        round_=state["round"],
        client_id=state["client_id"],
        num_examples=state["num_examples"],
        crypto=crypto,
        columns=decode(consensus, expect_kind="mask_consensus"),
    )
    data = encode(msg)
    return data, time.perf_counter() - t0


# ---------------------------------------------------------------------------- server side
def server_consensus(cfg: FederatedConfig, proposals: list[bytes], *, round_: int) -> bytes:
    """MaskCrypt: merge the round's mask proposals into the consensus (broadcast bytes)."""
    method = get_method(cfg.method, cfg)
    msgs = [decode(b, expect_kind="mask_proposal") for b in proposals]
    return encode(method.server_consensus(msgs, round_=round_))


def sample_clients(cfg: FederatedConfig, round_: int) -> list[int]:
    """The clients asked to train in ``round_`` (seeded; sorted)."""
    if cfg.clients_per_round >= cfg.num_clients:
        return list(range(cfg.num_clients))
    rng = np.random.default_rng([cfg.seed, round_, 2])
    return sorted(int(i) for i in rng.choice(cfg.num_clients, cfg.clients_per_round, replace=False))


def server_step(
    cfg: FederatedConfig,
    uploads: list[bytes],
    *,
    round_: int,
    crypto: ServerCrypto | None = None,
    consensus: bytes | None = None,
) -> bytes:
    """Aggregate the uploads of the clients that answered ``round_`` into broadcast bytes.

    ``crypto`` is the server's PUBLIC CKKS context (encrypted methods); it cannot decrypt.
    ``consensus``: MaskCrypt, the mask consensus the server itself broadcast this round.
    """
    method = get_method(cfg.method, cfg)
    msgs = [decode(u, expect_kind="upload") for u in uploads]
    for m in msgs:
        if m.header.get("round") != round_:
            raise ValueError(
                f"upload from client {m.header.get('client_id')} is for round "
                f"{m.header.get('round')}, not {round_}"
            )
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


# ---------------------------------------------------------------------------- the loop
#: stamped on every round record; bumped when the code changes what one configuration computes
#: (2: MiniLM's head reads mean pooling), so a finished run from older code is never reused
RESULTS_VERSION = 2

#: methods whose encrypted share is set by ``he_budgets`` and ``cipher_mode``
_BUDGETED = ("shelora", "maskcrypt")


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
            "cipher_mode": cfg.cipher_mode if cfg.method in _BUDGETED else None,
            "he_budgets": list(cfg.he_budgets) if cfg.method in _BUDGETED else None,
            "shelora_protect": cfg.shelora_protect if cfg.method == "shelora" else None,
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

    def _columns_path(self, round_: int) -> Path:
        """Where the column list negotiated before ``round_`` is kept (with the clients' keys)."""
        name = "columns.json" if round_ == 1 else f"columns_r{round_}.json"
        return self.checkpoint_dir / "keys" / name

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
        if cfg.method != "shelora":
            return None
        public = public_columns(cfg, self.model.base_weights())
        if public is not None:
            return public
        e = cfg.negotiation_round(round_)
        path = self._columns_path(e)
        if path.exists() and not fresh:
            saved = json.loads(path.read_text())
            self.negotiation = saved["negotiation"]
            return saved["columns"]
        if e != round_:
            raise RuntimeError(
                f"round {round_} uses the column list negotiated before round {e}, but {path} is "
                f"missing; delete {self.checkpoint_dir} to start the run over"
            )
        if e > 1 and broadcast is None:
            raise ValueError("a re-negotiation scores the global adapter: pass the last broadcast")
        from .methods.shelora_negotiation import client_columns, client_proposal, server_negotiate
        from .ope import ColumnOPE, OPEKey

        key_path = self.checkpoint_dir / "keys" / "ope.key"
        key = OPEKey.from_bytes(key_path.read_bytes()) if key_path.exists() else OPEKey.generate()
        key_path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(key_path, key.to_bytes())  # the clients' shared key: never sent to the server
        ope = ColumnOPE(key)
        method = get_method(cfg.method, cfg)
        t0 = time.perf_counter()
        ups = []
        for i in range(cfg.num_clients):
            weights = None  # before round 1: the client's initial adapter
            if broadcast is not None:  # the current global adapter at the client's rank
                weights = method.client_weights(
                    decode(broadcast, expect_kind="broadcast"),
                    rank=cfg.client_rank(i),
                    alpha=cfg.lora_alpha,
                    seed=_seed(cfg.seed, round_, i, 0),
                    crypto=self.client_crypto,
                )
            prop = client_proposal(
                cfg, self.model, self.clients[i], client_id=i, ope=ope, weights=weights
            )
            ups.append(encode(prop))
        t1 = time.perf_counter()
        msg, result = server_negotiate(cfg, [decode(u, expect_kind="proposal") for u in ups])
        down = encode(msg)
        t2 = time.perf_counter()
        columns = client_columns(decode(down, expect_kind="negotiation"), ope)
        self.negotiation = {
            "round": e,
            "proposal_bytes_per_client": float(np.mean([len(u) for u in ups])),
            "upload_bytes": int(sum(len(u) for u in ups)),
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

    def _negotiation_record(self) -> dict[str, Any]:
        """The cost of the negotiation held in ``self.negotiation``, for a round's record."""
        n = self.negotiation or {}
        up = n.get("upload_bytes", n.get("proposal_bytes_per_client", 0) * self.cfg.num_clients)
        return {
            "negotiation_upload_bytes": int(up),
            "negotiation_broadcast_bytes": int(n.get("broadcast_bytes", 0)),
            "negotiation_client_seconds": float(n.get("client_seconds", 0.0)),
            "negotiation_server_seconds": float(n.get("server_seconds", 0.0)),
        }

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

    @property
    def summary_path(self) -> Path:
        """Written when the run completes: its :meth:`RunResult.summary` and meta (a finished run
        is documented even when the notebook that collects all runs has not finished)."""
        return self.metrics_path.with_name(f"{self.cfg.run_name}.summary.json")

    def _save_summary(self, result: RunResult) -> None:
        rec = {**result.summary(), "meta": result.meta}
        self.summary_path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(self.summary_path, json.dumps(rec, indent=1, default=str).encode())

    def completed_history(self) -> list[dict[str, Any]] | None:
        """This configuration's records from its JSONL when it holds every round from this code
        (:data:`RESULTS_VERSION`), else ``None``."""
        if not self.metrics_path.exists():
            return None
        lines = self.metrics_path.read_text().splitlines()
        history = [json.loads(x) for x in lines if x.strip()]
        complete = [h.get("round") for h in history] == list(range(1, self.cfg.rounds + 1))
        current = all(h.get("results_version") == RESULTS_VERSION for h in history)
        return history if complete and current else None

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
        reuse_complete: bool = False,
    ) -> RunResult:
        """Run (or resume) the federation.

        Args:
            resume: continue from the last checkpoint of this exact configuration, if any.
            stop_after_round: stop after this round as if interrupted (tests, notebooks).
            on_round: called with each new round's record.
            reuse_complete: when this configuration's per-round JSONL already holds every round
                (from this code's :data:`RESULTS_VERSION`), return it without training: the
                paper profile's hours-long runs survive without their (uncommitted) checkpoints.
        """
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
        negotiated = cfg.method == "shelora" and cfg.column_order == "negotiated"
        neg_round = cfg.negotiation_round(first)
        bar = tqdm(
            range(start + 1, cfg.rounds + 1),
            desc=cfg.run_name[:40],
            initial=start,
            total=cfg.rounds,
            disable=not self.progress,
            leave=False,
        )
        for rnd in bar:
            extra: dict[str, Any] = {}
            if negotiated and cfg.negotiation_round(rnd) != neg_round:  # re-negotiate before rnd
                neg_round = cfg.negotiation_round(rnd)
                self.columns = self._columns(fresh=not resume, round_=rnd, broadcast=broadcast)
            if negotiated and neg_round == rnd:  # G was negotiated before this round: its cost
                extra.update(self._negotiation_record())
            t0 = time.perf_counter()
            uploads, losses, client_secs, parts, states = [], [], [], [], []
            for cid in sample_clients(cfg, rnd):
                tc = time.perf_counter()
                state: dict[str, Any] | None = {} if method.needs_consensus else None
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
                )
                client_secs.append(time.perf_counter() - tc)
                parts.append(secs)
                uploads.append(up)
                losses.append(loss)
                states.append(state)
            download = len(broadcast) if broadcast is not None else 0
            consensus = None
            if method.needs_consensus:  # MaskCrypt: masks -> consensus -> encrypted uploads
                proposals = uploads
                ts = time.perf_counter()
                consensus = server_consensus(cfg, proposals, round_=rnd)
                extra["consensus_server_seconds"] = time.perf_counter() - ts
                uploads = []
                for j, st in enumerate(states):
                    tc = time.perf_counter()
                    up, parts[j]["upload"] = client_upload(
                        cfg, consensus, state=st, crypto=self.client_crypto
                    )
                    client_secs[j] += time.perf_counter() - tc
                    uploads.append(up)
                extra.update(
                    consensus_upload_bytes=int(sum(len(x) for x in proposals)),
                    consensus_broadcast_bytes=len(consensus),
                    client_mask_seconds=float(np.mean([x["mask"] for x in parts])),
                )
            ts = time.perf_counter()
            broadcast = server_step(
                cfg, uploads, round_=rnd, crypto=self.server_crypto, consensus=consensus
            )
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
                "results_version": RESULTS_VERSION,
                **extra,
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
        if len(history) == start:  # the checkpoint already held every round: nothing recomputed
            return self._reused(history)
        meta = run_meta(cfg.seed)
        if start:
            meta["resumed_after_round"] = start
        if self.negotiation is not None:
            meta["negotiation"] = self.negotiation
        result = RunResult(cfg, history, self.partition_counts, meta=meta)
        if len(history) == cfg.rounds:
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
        result = RunResult(self.cfg, history, self.partition_counts, meta=meta)
        if not saved:
            self._save_summary(result)
        return result


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
