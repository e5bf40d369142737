"""The client side of a round: local training and the client steps of the round engine.

A client owns its data, its secret CKKS context and the OPE key; what leaves it is bytes. The
steps, in the order a round uses them (``docs/design.md``, "One round on the wire"):

* :func:`negotiation_proposal` / :func:`negotiated_columns` (SHE-LoRA, before round 1 and at
  re-negotiations): OPE-encrypted sensitivity proposals, then the decrypted ordered list G;
* :func:`receive`: the client's adapter of its own rank from the last broadcast;
* local training (:func:`local_train`);
* :func:`propose_masks` (MaskCrypt): the client's ranked mask, before the upload;
* :func:`upload`: the method's upload bytes (plaintext, ciphertexts or both).

:func:`client_step` strings them together for one training round (:func:`client_upload` is
MaskCrypt's second step, after the consensus). The in-process loop, the HE cost benchmark, the
attack grid's victim and a remote driver all call these functions; none calls a method's
``make_upload`` / ``client_weights`` itself.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .adapters import AdapterWeights
from .ckks.roles import DECRYPT_PRECISION, ClientCrypto
from .config import FederatedConfig, learning_rate
from .data import ClientData
from .errors import ProtocolError, SheloraError
from .messages import Message, decode, encode
from .methods import get_method

if TYPE_CHECKING:
    from .lora import LoraModel

__all__ = [
    "batch_loss",
    "check_broadcast",
    "check_negotiated_columns",
    "client_seed",
    "client_step",
    "client_upload",
    "learning_rate",
    "local_gradient",
    "local_train",
    "log_label_prior",
    "negotiated_columns",
    "negotiation_proposal",
    "propose_masks",
    "receive",
    "secret_init_seed",
    "upload",
]


# ---------------------------------------------------------------------------- local training
def client_seed(*parts: int) -> int:
    """A 31-bit seed from integers, e.g. ``(cfg.seed, round, client_id, purpose)``: purpose 0
    reparameterization, 1 local training, 2 MaskCrypt's calibration batch, 3 upload noise (DP)."""
    return int(np.random.default_rng(list(parts)).integers(2**31 - 1))


def secret_init_seed(init_key: bytes) -> int:
    """The seed of the initial adapter's A under ``secret_init``: a 64-bit integer derived
    (SHA-256, domain-separated) from the clients' shared initialisation key
    (:attr:`~shelora_core.checkpoint.KeyBundle.init_key`). Only clients hold the key; the same
    key gives the same A on every client (a common initial model), another key another A.

    Raises:
        ProtocolError: a key of fewer than 16 bytes (not a key the key holder wrote).
    """
    key = bytes(init_key)
    if len(key) < 16:
        raise ProtocolError(
            f"the shared initialisation key has {len(key)} bytes; the key holder writes 32 "
            "(clients/<i>/init.key): restore it or start the run over",
            reason="key",
        )
    digest = hashlib.sha256(b"shelora/secret-init/v1\0" + key).digest()
    return int.from_bytes(digest[:8], "big")


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


# ---------------------------------------------------------------------------- round-engine steps
def receive(
    cfg: FederatedConfig,
    broadcast: bytes,
    *,
    client_id: int | None = None,
    round_: int | None = None,
    rank: int | None = None,
    crypto: Any = None,
    model: Any = None,
) -> AdapterWeights:
    """The client's adapter from the server's broadcast: decrypt, fuse, truncate to its rank.

    Every value decrypted here is rounded to :data:`~shelora_core.ckks.roles.DECRYPT_PRECISION`
    (``crypto.with_precision``) before the method uses it, unless ``crypto`` already sets a
    precision.

    Args:
        cfg: the run's public configuration.
        broadcast: the broadcast bytes.
        client_id, round_: the receiving client and the round it starts; they give its rank and
            the seed of any component it must re-initialise. ``None`` (an evaluator reading the
            global model): seed 0.
        rank: overrides the client's rank (the evaluator reads the largest).
        crypto: the client's secret CKKS context for encrypted methods.
        model: the client's model (anything with ``validate(weights)``, e.g.
            :class:`~shelora_core.lora.LoraModel`): the adapter read from the broadcast must fit
            its layers and head.

    Raises:
        MessageError, ProtocolError: bytes that are not a broadcast, or a broadcast for another
            round, method or key, or one that does not fit the client's model; the client does
            not train on it.
    """
    if rank is None:
        if client_id is None:
            raise ValueError("receive() needs the client_id or an explicit rank")
        rank = cfg.client_rank(client_id)
    seed = 0 if client_id is None or round_ is None else client_seed(cfg.seed, round_, client_id, 0)
    msg = decode(broadcast, expect_kind="broadcast")
    check_broadcast(cfg, msg, round_=round_, crypto=crypto)
    if isinstance(crypto, ClientCrypto) and crypto.precision is None:
        # decrypted aggregates leave the decryption rounded (CKKS noise reveals the key)
        crypto = crypto.with_precision(DECRYPT_PRECISION)
    weights = get_method(cfg.method, cfg).client_weights(
        msg,
        rank=rank,
        alpha=cfg.lora_alpha,
        seed=seed,
        crypto=crypto,
    )
    if model is not None:
        try:
            model.validate(weights)
        except SheloraError:
            raise
        except ValueError as exc:
            raise ProtocolError(
                f"the broadcast of round {msg.header.get('round')} does not fit this client's "
                f"model: {exc}",
                reason="shape",
            ) from exc
    return weights


def check_broadcast(
    cfg: FederatedConfig, msg: Message, *, round_: int | None = None, crypto: Any = None
) -> None:
    """A client's checks of a decoded broadcast before it reads it: the run's method, the round
    before ``round_`` (the round the client is starting; ``None``: any, e.g. the evaluator) and
    the client's own key.

    Raises:
        ProtocolError: naming what does not match (a stale or replayed broadcast, another
            method's or another key's).
    """
    h = msg.header
    missing = [k for k in ("method", "round", "max_rank", "clients") if k not in h]
    if missing:
        raise ProtocolError(
            f"the broadcast's header lacks {missing}: not a broadcast of this protocol",
            reason="header",
        )
    if h.get("method") != cfg.method:
        raise ProtocolError(
            f"the broadcast is for method {h.get('method')!r}; this client runs {cfg.method!r}",
            reason="method",
        )
    if round_ is not None and h.get("round") != round_ - 1:
        raise ProtocolError(
            f"the broadcast is from round {h.get('round')!r}; starting round {round_} needs round "
            f"{round_ - 1}'s (a stale or replayed broadcast): pass the server's latest broadcast",
            reason="round",
        )
    for name in ("total_examples", "max_rank"):
        v = h.get(name, 1)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ProtocolError(
                f"the broadcast's {name} = {v!r} is not a positive integer", reason="header"
            )
    fp = getattr(crypto, "fingerprint", None)
    if fp is not None and "fingerprint" in h and h["fingerprint"] != fp:
        raise ProtocolError(
            f"the broadcast was encrypted under key {h['fingerprint']!r}, this client holds "
            f"{fp!r}: it comes from another key or session",
            reason="key",
        )


def upload(
    cfg: FederatedConfig,
    weights: AdapterWeights,
    *,
    round_: int,
    client_id: int,
    num_examples: int,
    crypto: Any = None,
    columns: Mapping[str, Any] | None = None,
    consensus: bytes | None = None,
    start: AdapterWeights | None = None,
    seed: int | None = None,
) -> bytes:
    """The client's upload bytes for its trained adapter ``weights``.

    Args:
        columns: SHE-LoRA, the ordered column list G per layer.
        consensus: MaskCrypt, this round's mask consensus bytes.
        start: the adapter the client started the round from (local DP privatizes the update
            ``weights - start``).
        seed: seeds any randomness of the upload (DP noise); default from the run's seed, the
            round and the client.
    """
    method = get_method(cfg.method, cfg)
    if method.needs_consensus:
        if consensus is None:
            raise ValueError(f"{cfg.method} uploads need this round's mask consensus bytes")
        columns = decode(consensus, expect_kind="mask_consensus")
    if seed is None:
        seed = client_seed(cfg.seed, round_, client_id, 3)
    msg = method.make_upload(
        weights,
        round_=round_,
        client_id=client_id,
        num_examples=num_examples,
        crypto=crypto,
        columns=columns,
        start=start,
        seed=seed,
    )
    return encode(msg)


def propose_masks(
    cfg: FederatedConfig,
    trained: AdapterWeights,
    start: AdapterWeights,
    grads: Mapping[str, tuple[np.ndarray, np.ndarray]],
    *,
    round_: int,
    client_id: int,
) -> bytes:
    """MaskCrypt: the client's ranked mask proposal (bytes) from its trained adapter, the
    adapter it started from (the adversary's estimate) and its gradient per layer."""
    method = get_method(cfg.method, cfg)
    if not method.needs_consensus:
        raise ValueError(f"method {cfg.method!r} has no mask proposal step")
    return encode(method.make_proposal(trained, start, grads, round_=round_, client_id=client_id))


def negotiation_proposal(
    cfg: FederatedConfig,
    model: Any,
    data: ClientData,
    *,
    client_id: int,
    ope: Any,
    weights: AdapterWeights | None = None,
) -> bytes:
    """SHE-LoRA: the client's OPE-encrypted sensitivity proposal (bytes).

    ``weights``: the adapter to score (``None``: the client's round-0 adapter; a re-negotiation
    passes the current global adapter at the client's rank).
    """
    from .methods.shelora_negotiation import client_proposal

    return encode(client_proposal(cfg, model, data, client_id=client_id, ope=ope, weights=weights))


def negotiated_columns(
    broadcast: bytes,
    ope: Any,
    *,
    proposal: bytes | None = None,
    cfg: FederatedConfig | None = None,
) -> dict[str, list[int]]:
    """SHE-LoRA: decrypt the negotiation's broadcast with the OPE key: layer -> ordered G.

    With ``proposal`` (the client's own proposal bytes) and ``cfg``, the client also checks that
    G covers its own most sensitive columns (:func:`check_negotiated_columns`).

    Raises:
        NegotiationError: a list that covers too little of the client's own proposal.
    """
    from .methods.shelora_negotiation import client_columns

    columns = client_columns(decode(broadcast, expect_kind="negotiation"), ope)
    if proposal is not None:
        if cfg is None:
            raise ValueError("checking the negotiated list against a proposal needs cfg")
        check_negotiated_columns(cfg, columns, proposal, ope)
    return columns


def check_negotiated_columns(
    cfg: FederatedConfig, columns: Mapping[str, list[int]], proposal: bytes, ope: Any
) -> float:
    """SHE-LoRA: a client's check of the decrypted list G against its own proposal bytes: G's
    prefix ``G[:k_i]`` must cover at least ``cfg.min_column_coverage`` of its own top-k_i
    columns (:func:`shelora_core.methods.shelora_negotiation.check_coverage`). Returns the
    client's coverage.

    Raises:
        NegotiationError: naming the coverage, the worst layer and the fix (a server steering
            the negotiation).
    """
    from .methods.shelora_negotiation import check_coverage

    own = decode(proposal, expect_kind="proposal")
    return check_coverage(cfg, dict(columns), own, ope)


def client_step(
    cfg: FederatedConfig,
    model: Any,
    data: ClientData,
    *,
    client_id: int,
    round_: int,
    broadcast: bytes | None,
    crypto: Any = None,
    columns: dict[str, list[int]] | None = None,
    state: dict[str, Any] | None = None,
    init_seed: int | None = None,
) -> tuple[bytes, float, dict[str, float]]:
    """One client's training round: adapter from the broadcast, local training, upload bytes.

    For MaskCrypt (``needs_consensus``) the bytes are the client's mask proposal instead; the
    trained adapter stays in ``state`` (client-side, never sent) for :func:`client_upload`.

    Args:
        cfg: the run's public configuration.
        model: the (shared, frozen) :class:`~shelora_core.lora.LoraModel` with adapter slots;
            only this client's weights are loaded into it during the step.
        data: this client's private examples.
        client_id: the client's id (its rank is ``cfg.client_rank(client_id)``).
        round_: 1-based round number.
        broadcast: the server's last broadcast, or ``None`` in the first round.
        crypto: the client's CKKS context (secret key) for encrypted methods.
        columns: SHE-LoRA: the negotiated ordered column list G per layer (client-side state).
        state: MaskCrypt: a dict the client keeps between its two steps of a round.
        init_seed: ``secret_init``: the seed of the round-1 adapter's A, from the clients'
            shared key (:func:`secret_init_seed`); ``None``: ``cfg.seed`` (public).

    Returns:
        ``(upload_bytes, mean_training_loss, seconds)`` with ``seconds`` split into
        ``receive`` (decrypt + reparameterize), ``train`` and ``upload`` (encrypt + serialize);
        MaskCrypt: ``mask`` (gradient, scores, proposal) instead of ``upload``.
    """
    from .methods.shelora import public_columns

    method = get_method(cfg.method, cfg)
    rank = cfg.client_rank(client_id)
    t0 = time.perf_counter()
    if broadcast is None:
        if cfg.secret_init and init_seed is None:
            raise ValueError(
                "secret_init: round 1 starts from A derived from the clients' shared key; pass "
                "init_seed=secret_init_seed(<the client's init.key>)"
            )
        weights = model.init_weights(rank, seed=cfg.seed if init_seed is None else init_seed)
    else:
        weights = receive(
            cfg, broadcast, client_id=client_id, round_=round_, crypto=crypto, model=model
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
        seed=client_seed(cfg.seed, round_, client_id, 1),
        loss=cfg.loss,
        head_lr_scale=cfg.head_lr_scale,
    )
    t2 = time.perf_counter()
    trained = model.read()
    if method.needs_consensus:
        if state is None:
            raise ValueError(
                f"{cfg.method}: pass a client-side state dict; the trained adapter waits there "
                "for the mask consensus (client_upload)"
            )
        grads = local_gradient(
            model,
            data,
            num_examples=cfg.calibration_examples,
            batch_size=cfg.batch_size,
            seed=client_seed(cfg.seed, round_, client_id, 2),
        )
        proposal = propose_masks(cfg, trained, weights, grads, round_=round_, client_id=client_id)
        state.update(weights=trained, round=round_, client_id=client_id, num_examples=len(data))
        t3 = time.perf_counter()
        return proposal, loss, {"receive": t1 - t0, "train": t2 - t1, "mask": t3 - t2}
    if cfg.uses_columns and columns is None:
        columns = public_columns(cfg, model.base_weights())
        if columns is None:
            raise ValueError("SHE-LoRA with column_order='negotiated' needs the negotiated columns")
    data_bytes = upload(
        cfg,
        trained,
        round_=round_,
        client_id=client_id,
        num_examples=len(data),
        crypto=crypto,
        columns=columns,
        start=weights,
    )
    t3 = time.perf_counter()
    return data_bytes, loss, {"receive": t1 - t0, "train": t2 - t1, "upload": t3 - t2}


def client_upload(
    cfg: FederatedConfig,
    consensus: bytes,
    *,
    state: dict[str, Any],
    crypto: Any = None,
) -> tuple[bytes, float]:
    """MaskCrypt's second client step: encrypt the consensus entries of the adapter kept in
    ``state`` by :func:`client_step`; returns ``(upload_bytes, seconds)``."""
    t0 = time.perf_counter()
    data = upload(
        cfg,
        state["weights"],
        round_=state["round"],
        client_id=state["client_id"],
        num_examples=state["num_examples"],
        crypto=crypto,
        consensus=consensus,
    )
    return data, time.perf_counter() - t0
