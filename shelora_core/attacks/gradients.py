"""What a server sees of one client update, in the form a gradient-inversion attack reads.

DAGER (Petrov et al., NeurIPS 2024) needs the update of the *query projection* of the first two
decoder layers. This module computes it for a LLaMA-type decoder (SmolLM2-135M) in the settings the
attack table covers, and packs it into an :class:`ObservedUpdate`:

* **full fine-tuning** (FedSGD): ``grad W`` of ``q_proj`` (m x n) of layers 0 and 1;
* **LoRA** on ``q_proj`` (FedSGD): ``grad A`` (r x n) and ``grad B`` (m x r), plus the factors
  ``A`` and ``B`` at which the gradient was taken (the server broadcast them, so it knows them);
* **multi-step LoRA update** (FedAvg): the weight difference of several local steps divided by
  the learning rate, a pseudo-gradient of the same shape (:func:`update_from_weights`); AdamW (the
  training loop's optimizer) or plain SGD (DAGER's FedAvg setting, :func:`multistep_update`);
* what SHE-LoRA leaves in plaintext: the same update with a set of A's *columns* (input features)
  zeroed (:func:`hide_columns`), and local DP (clip + Gaussian noise, :func:`add_dp_noise`).

Notation follows the package (``lora.py``): layer ``y = W0 x + s B A x`` with ``W0`` (m x n),
``B`` (m x r), ``A`` (r x n), ``s = alpha / r``. With ``g_t = dL/dy_t`` and ``x_t`` the layer
inputs, ``grad W = sum_t g_t x_t^T``, ``grad A = s B^T grad W`` and ``grad B = s grad W A^T``.

Sentences are tokenized with BOS prepended (:func:`encode_batch`): in a causal decoder the first
position attends only to itself, so its query gets no gradient; the BOS token takes that place.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..adapters import layer_index
from ..privacy import clip_by_norm

__all__ = [
    "LayerUpdate",
    "ObservedUpdate",
    "add_dp_noise",
    "add_lora",
    "capture_update",
    "encode_batch",
    "hide_columns",
    "multistep_update",
    "q_proj",
    "set_lora_factors",
    "unwrap",
    "update_from_weights",
]


# ---------------------------------------------------------------------------- containers
@dataclass
class LayerUpdate:
    """The server's view of the ``q_proj`` update of one decoder layer.

    Exactly one of the two forms is set: ``grad_w`` (full fine-tuning) or the LoRA form
    (``grad_a``, ``grad_b``, ``lora_a``, ``lora_b``, ``scaling``).

    Attributes:
        layer: decoder layer index (0 = the first layer, whose input is the token embedding).
        grad_w: full fine-tuning gradient, shape (m, n), float64.
        grad_a: LoRA gradient of ``A``, shape (r, n), float64.
        grad_b: LoRA gradient of ``B``, shape (m, r), float64.
        lora_a: the ``A`` at which the gradient was taken, as the server knows it (hidden
            columns zeroed by :func:`hide_columns`), shape (r, n).
        lora_b: the ``B`` at which the gradient was taken, shape (m, r).
        scaling: LoRA scaling ``alpha / r``.
        hidden: input columns (features) the server does not see, int64, sorted.
        a_hidden: whether ``lora_a[:, hidden]`` is unknown to the server (zeroed) too.
    """

    layer: int
    grad_w: np.ndarray | None = None
    grad_a: np.ndarray | None = None
    grad_b: np.ndarray | None = None
    lora_a: np.ndarray | None = None
    lora_b: np.ndarray | None = None
    scaling: float = 1.0
    hidden: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    a_hidden: bool = False

    @property
    def mode(self) -> str:
        """``"full"`` or ``"lora"``."""
        return "full" if self.grad_w is not None else "lora"

    @property
    def rank(self) -> int | None:
        """LoRA rank r, or ``None`` for full fine-tuning."""
        return None if self.lora_a is None else int(self.lora_a.shape[0])

    @property
    def width(self) -> int:
        """Input width n of the layer."""
        return int((self.grad_w if self.grad_w is not None else self.lora_a).shape[1])

    def arrays(self) -> dict[str, np.ndarray]:
        """The gradient arrays a client uploads for this layer (name -> array)."""
        names = ("grad_w",) if self.mode == "full" else ("grad_a", "grad_b")
        return {n: getattr(self, n) for n in names}


@dataclass
class ObservedUpdate:
    """What the server (and so the attacker) sees of one client update.

    Attributes:
        layers: layer index -> :class:`LayerUpdate` (layers 0 and 1 for DAGER).
        total_norm: L2 norm of the client's WHOLE update (every trainable parameter), the norm
            local DP clips; the attacked layers are a part of it.
        kind: ``"gradient"`` (one SGD step, FedSGD) or ``"multistep"`` (weight difference / lr).
        batch_size: number of sentences behind the update (DAGER assumes the server knows it).
        bos_id: token id prepended to every sentence (public: part of the protocol).
    """

    layers: dict[int, LayerUpdate]
    total_norm: float
    kind: str = "gradient"
    batch_size: int = 1
    bos_id: int | None = None

    @property
    def mode(self) -> str:
        """``"full"`` or ``"lora"`` (the mode of the attacked layers)."""
        return self.layers[min(self.layers)].mode

    def copy(self) -> ObservedUpdate:
        """A deep copy (arrays included)."""
        return copy.deepcopy(self)


# ---------------------------------------------------------------------------- model helpers
def unwrap(model: Any) -> torch.nn.Module:
    """The ``torch`` module of a package :class:`~shelora_core.lora.LoraModel` or HF model."""
    inner = getattr(model, "model", None)
    if hasattr(model, "layer_shapes") and isinstance(inner, torch.nn.Module):
        return inner  # shelora_core.lora.LoraModel
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"expected a torch model or a LoraModel, got {type(model).__name__}")
    return model


def q_proj(model: Any, layer: int) -> torch.nn.Module:
    """The ``q_proj`` module of decoder layer ``layer`` (peft-wrapped or plain).

    Raises:
        ValueError: if the model has no ``layers.<layer>.self_attn.q_proj`` module.
    """
    suffix = f"layers.{layer}.self_attn.q_proj"
    for name, module in unwrap(model).named_modules():
        if name.endswith(suffix):
            return module
    raise ValueError(
        f"the model has no module '*{suffix}': DAGER here supports LLaMA-type decoders "
        "(SmolLM2); check the layer index"
    )


def _active_adapter(module: torch.nn.Module) -> str | None:
    """Name of the active LoRA adapter of a peft layer, or ``None`` for a plain linear layer."""
    if not hasattr(module, "lora_A"):
        return None
    active = module.active_adapters if hasattr(module, "active_adapters") else module.active_adapter
    names = [active] if isinstance(active, str) else list(active)
    names = [n for n in names if n in module.lora_A]
    return names[0] if names else None


def add_lora(
    model: torch.nn.Module,
    *,
    rank: int,
    alpha: float = 16.0,
    layers: Sequence[int] = (0, 1),
    adapter: str = "default",
) -> torch.nn.Module:
    """Wrap a plain HF decoder with peft LoRA on ``q_proj`` of the given layers.

    ``A`` gets peft's default init, ``B = 0`` (the round-1 adapter); use
    :func:`set_lora_factors` to set other values.

    Args:
        model: a ``transformers`` decoder (e.g. ``LlamaForCausalLM``).
        rank: LoRA rank r (>= 1).
        alpha: LoRA alpha (scaling ``alpha / r``).
        layers: decoder layers to adapt.
        adapter: peft adapter name.

    Returns:
        The peft model (it shares the base weights with ``model``).
    """
    from peft import LoraConfig, get_peft_model

    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1 (got {rank})")
    cfg = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=["q_proj"],
        layers_to_transform=list(layers),
        lora_dropout=0.0,
        bias="none",
    )
    return get_peft_model(model, cfg, adapter_name=adapter)


@torch.no_grad()
def set_lora_factors(model: Any, layer: int, *, b: np.ndarray, a: np.ndarray) -> None:
    """Copy ``B`` (m x r) and ``A`` (r x n) into the active adapter of ``q_proj`` of ``layer``."""
    mod = q_proj(model, layer)
    name = _active_adapter(mod)
    if name is None:
        raise ValueError(f"q_proj of layer {layer} has no LoRA adapter")
    mod.lora_B[name].weight.copy_(torch.as_tensor(np.asarray(b), dtype=torch.float32))
    mod.lora_A[name].weight.copy_(torch.as_tensor(np.asarray(a), dtype=torch.float32))


def encode_batch(
    tokenizer: Any,
    sentences: Sequence[str],
    *,
    max_length: int = 64,
    add_bos: bool = True,
    add_eos: bool = False,
) -> dict[str, torch.Tensor]:
    """Tokenize sentences with BOS prepended, right-padded with the pad token.

    Args:
        tokenizer: the model's tokenizer (``bos_token_id`` and ``pad_token_id`` set).
        sentences: the batch.
        max_length: longest sequence kept, BOS included (longer ones are truncated).
        add_bos: prepend ``tokenizer.bos_token_id`` (DAGER's convention; the first position of a
            causal decoder gets no query gradient).
        add_eos: append ``tokenizer.eos_token_id``. Use it with a causal-LM loss: the last
            position's query gets no gradient there (its output predicts nothing), so without
            an EOS the last real token is invisible to DAGER. A classifier pools the last real
            token, which does get a gradient.

    Returns:
        ``{"input_ids", "attention_mask"}``, int64 tensors of shape (batch, longest).
    """
    if isinstance(sentences, str) or not len(sentences):
        raise ValueError("sentences must be a non-empty list of strings")
    if add_bos and tokenizer.bos_token_id is None:
        raise ValueError("the tokenizer has no BOS token; pass add_bos=False")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = []
    for s in sentences:
        ids = list(tokenizer(s, add_special_tokens=False)["input_ids"])
        if add_bos:
            ids = [int(tokenizer.bos_token_id)] + ids
        ids = ids[: max_length - 1] if add_eos else ids[:max_length]
        if add_eos:
            ids = ids + [int(tokenizer.eos_token_id)]
        rows.append(ids)
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), int(pad), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return {"input_ids": input_ids, "attention_mask": mask}


# ---------------------------------------------------------------------------- capture
def _loss(net: torch.nn.Module, batch: Mapping[str, torch.Tensor], labels: torch.Tensor | None):
    out = net(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    logits = out.logits
    if logits.dim() == 2:  # sequence classification
        if labels is None:
            raise ValueError("a classifier needs labels= (one class id per sentence)")
        return torch.nn.functional.cross_entropy(logits, torch.as_tensor(labels).long())
    # causal LM: next-token loss on the real tokens
    target = batch["input_ids"].clone()
    target[batch["attention_mask"] == 0] = -100
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), target[:, 1:].reshape(-1), ignore_index=-100
    )


def _trainable(net: torch.nn.Module, lora: bool) -> list[torch.nn.Parameter]:
    if lora:
        return [p for p in net.parameters() if p.requires_grad]
    return list(net.parameters())


def _read_layer(net: torch.nn.Module, layer: int, *, grads: bool) -> LayerUpdate:
    mod = q_proj(net, layer)
    name = _active_adapter(mod)

    def grab(p: torch.Tensor) -> np.ndarray:
        t = p.grad if grads else p
        if t is None:
            return np.zeros(tuple(p.shape))
        return t.detach().cpu().double().numpy().copy()

    if name is None:
        return LayerUpdate(layer=layer, grad_w=grab(mod.weight))
    a, b = mod.lora_A[name].weight, mod.lora_B[name].weight
    return LayerUpdate(
        layer=layer,
        grad_a=grab(a),
        grad_b=grab(b),
        lora_a=a.detach().cpu().double().numpy().copy(),
        lora_b=b.detach().cpu().double().numpy().copy(),
        scaling=float(mod.scaling[name]),
    )


def _has_lora(net: torch.nn.Module, layers: Sequence[int]) -> bool:
    flags = {_active_adapter(q_proj(net, i)) is not None for i in layers}
    if len(flags) != 1:
        raise ValueError(f"layers {list(layers)} mix LoRA and plain q_proj; adapt all or none")
    return flags.pop()


def capture_update(
    model: Any,
    batch: Mapping[str, torch.Tensor],
    *,
    labels: Sequence[int] | torch.Tensor | None = None,
    layers: Sequence[int] = (0, 1),
    bos_id: int | None = None,
) -> ObservedUpdate:
    """One SGD step's gradient (FedSGD) of ``q_proj`` of ``layers``: what the server sees.

    With LoRA on those layers (peft, e.g. the package's ``LoraModel`` or :func:`add_lora`) the
    trainable parameters are the ones peft left trainable (adapters, classification head) and the
    update holds ``grad A`` and ``grad B``; without LoRA every parameter is trained (full
    fine-tuning) and the update holds ``grad W``. The loss is cross-entropy on ``labels`` for a
    classifier (2-D logits) and the next-token loss on the real tokens for a causal LM.

    Args:
        model: a ``LoraModel`` or a ``transformers`` decoder (peft-wrapped or not).
        batch: ``{"input_ids", "attention_mask"}`` from :func:`encode_batch`.
        labels: class ids, one per sentence (classifiers only).
        layers: decoder layers to record.
        bos_id: recorded in the update (public protocol knowledge); defaults to the first token.

    Returns:
        An :class:`ObservedUpdate` of kind ``"gradient"``; the model's weights are unchanged and
        its gradients are cleared.
    """
    net = unwrap(model)
    lora = _has_lora(net, layers)
    params = _trainable(net, lora)
    saved = [p.requires_grad for p in params]
    was_training = net.training
    try:
        for p in params:
            p.requires_grad_(True)
            p.grad = None
        net.eval()  # no dropout: the attacked step is deterministic
        loss = _loss(net, batch, None if labels is None else torch.as_tensor(labels))
        loss.backward()
        norms = [torch.linalg.vector_norm(p.grad) for p in params if p.grad is not None]
        total = float(torch.linalg.vector_norm(torch.stack(norms).double())) if norms else 0.0
        out = {i: _read_layer(net, i, grads=True) for i in layers}
    finally:
        for p, flag in zip(params, saved, strict=True):
            p.grad = None
            p.requires_grad_(flag)
        net.train(was_training)
    return ObservedUpdate(
        layers=out,
        total_norm=total,
        kind="gradient",
        batch_size=int(batch["input_ids"].shape[0]),
        bos_id=int(batch["input_ids"][0, 0]) if bos_id is None else bos_id,
    )


def update_from_weights(
    before: Mapping[Any, tuple[np.ndarray, np.ndarray]],
    after: Mapping[Any, tuple[np.ndarray, np.ndarray]],
    *,
    lr: float,
    scaling: float,
    batch_size: int = 1,
    bos_id: int | None = None,
    total_norm: float | None = None,
) -> ObservedUpdate:
    """Turn a real LoRA update (weights before and after local training) into an update to attack.

    The pseudo-gradient is ``(before - after) / lr`` for ``A`` and for ``B``; the factors at which
    it is "taken" are the ``before`` ones (the broadcast the server knows). After one plain SGD
    step this is exactly the gradient; after several plain SGD steps (``lr = steps * sgd_lr``) the
    mean of their gradients; after several AdamW steps it is not a gradient at all (AdamW rescales
    every coordinate, which breaks the span structure DAGER relies on).

    Args:
        before: layer -> ``(B, A)`` before local training. Keys are layer indices or module names
            containing ``layers.<i>.`` (as in :class:`~shelora_core.lora.AdapterWeights`).
        after: the same layers after local training.
        lr: the scale to divide by: the local learning rate, or ``steps * lr`` for the mean
            gradient of several SGD steps (a positive scale; the span check does not depend on
            it).
        scaling: LoRA scaling ``alpha / r``.
        batch_size: number of sentences behind the update.
        bos_id: the BOS token id the client prepends.
        total_norm: L2 norm of the whole update (defaults to the norm of these layers).

    Returns:
        An :class:`ObservedUpdate` of kind ``"multistep"``.
    """
    if not lr > 0:
        raise ValueError(f"lr must be > 0 (got {lr})")
    if set(before) != set(after):
        raise ValueError("before and after must hold the same layers")
    layers: dict[int, LayerUpdate] = {}
    for key in before:
        idx = key if isinstance(key, int) else layer_index(str(key))
        (b0, a0), (b1, a1) = before[key], after[key]
        b0, a0, b1, a1 = (np.asarray(v, np.float64) for v in (b0, a0, b1, a1))
        if b0.shape != b1.shape or a0.shape != a1.shape:
            raise ValueError(f"layer {key}: shapes differ before/after ({b0.shape}, {b1.shape})")
        layers[idx] = LayerUpdate(
            layer=idx,
            grad_a=(a0 - a1) / lr,
            grad_b=(b0 - b1) / lr,
            lora_a=a0.copy(),
            lora_b=b0.copy(),
            scaling=float(scaling),
        )
    if total_norm is None:
        total_norm = math.sqrt(
            sum(float(np.sum(v**2)) for u in layers.values() for v in u.arrays().values())
        )
    return ObservedUpdate(
        layers=layers, total_norm=total_norm, kind="multistep", batch_size=batch_size, bos_id=bos_id
    )


def multistep_update(
    model: Any,
    batch: Mapping[str, torch.Tensor],
    *,
    labels: Sequence[int] | torch.Tensor | None = None,
    steps: int = 5,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    optimizer: str = "adamw",
    layers: Sequence[int] = (0, 1),
) -> ObservedUpdate:
    """Several local steps on ``batch`` (FedAvg), returned as a pseudo-gradient.

    Trains the LoRA adapters (and whatever else peft left trainable) like the package's
    ``local_train``, reads ``A`` and ``B`` of ``layers`` before and after, restores every weight
    and returns :func:`update_from_weights` of the difference.

    ``optimizer="sgd"`` is DAGER's FedAvg setting: plain SGD (no momentum, no weight decay), and
    the pseudo-gradient is ``(before - after) / (steps * lr)``, the mean of the ``steps``
    gradients. Each of them is a sum of outer products with the layer inputs, so their mean keeps
    the span structure DAGER tests: exactly for ``grad A`` of the first layer (its inputs, the
    token embeddings, do not change while the adapters train), approximately elsewhere (the
    second layer's inputs and the ``A`` inside ``grad B`` drift by ``lr`` times a gradient per
    step). AdamW divides every coordinate by its own running scale, which breaks that structure.

    Args:
        model: a model with LoRA on ``q_proj`` of ``layers``.
        batch: the client's batch (every step uses all of it).
        labels: class ids for a classifier.
        steps: local steps (>= 1).
        lr: learning rate (AdamW or SGD).
        weight_decay: AdamW weight decay (SGD: must be 0).
        optimizer: ``"adamw"`` or ``"sgd"``.
        layers: decoder layers to record.

    Returns:
        An :class:`ObservedUpdate` of kind ``"multistep"``.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1 (got {steps})")
    if optimizer not in ("adamw", "sgd"):
        raise ValueError(f"unknown optimizer {optimizer!r}; choose 'adamw' or 'sgd'")
    if optimizer == "sgd" and weight_decay:
        raise ValueError(
            f"plain SGD has no weight decay here (got weight_decay={weight_decay}); pass 0"
        )
    net = unwrap(model)
    if not _has_lora(net, layers):
        raise ValueError("multistep_update needs LoRA on q_proj (see add_lora)")
    params = [p for p in net.parameters() if p.requires_grad]
    saved = [p.detach().clone() for p in params]
    before = {i: _factors(net, i) for i in layers}
    scaling = _read_layer(net, layers[0], grads=False).scaling
    was_training = net.training
    if optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr, momentum=0.0)
    else:
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    scale = lr * steps if optimizer == "sgd" else lr
    try:
        net.eval()
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            _loss(net, batch, None if labels is None else torch.as_tensor(labels)).backward()
            opt.step()
        after = {i: _factors(net, i) for i in layers}
        total = (
            math.sqrt(
                sum(
                    float((p.detach() - s).double().pow(2).sum())
                    for p, s in zip(params, saved, strict=True)
                )
            )
            / scale
        )
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved, strict=True):
                p.copy_(s)
                p.grad = None
        net.train(was_training)
    return update_from_weights(
        before,
        after,
        lr=scale,
        scaling=scaling,
        batch_size=int(batch["input_ids"].shape[0]),
        bos_id=int(batch["input_ids"][0, 0]),
        total_norm=total,
    )


def _factors(net: torch.nn.Module, layer: int) -> tuple[np.ndarray, np.ndarray]:
    u = _read_layer(net, layer, grads=False)
    return u.lora_b, u.lora_a


# ---------------------------------------------------------------------------- protections
def hide_columns(
    update: ObservedUpdate,
    hidden: Sequence[int] | Mapping[int, Sequence[int]],
    *,
    hide_a: bool = True,
) -> ObservedUpdate:
    """What the server sees when the input columns ``hidden`` travel encrypted (SHE-LoRA).

    SHE-LoRA encrypts the columns ``J`` of every layer's ``A`` (input features of the layer); the
    server gets the rest in plaintext. In the update this zeroes ``grad A[:, J]`` (and
    ``grad W[:, J]`` for full fine-tuning, for comparison). ``grad B`` stays visible, but the
    server no longer knows the aggregated ``A[:, J]`` it would need to test ``A x`` (``hide_a``).

    Args:
        update: the plaintext update.
        hidden: columns hidden in every layer, or layer -> columns.
        hide_a: also zero ``A[:, J]`` in the attacker's knowledge of the factors. ``False`` models
            a first round whose initial ``A`` comes from a public seed.

    Returns:
        A copy of ``update`` with the columns zeroed and recorded in ``LayerUpdate.hidden``.
    """
    out = update.copy()
    for idx, lu in out.layers.items():
        cols = hidden.get(idx, ()) if isinstance(hidden, Mapping) else hidden
        cols = np.unique(np.asarray(list(cols), dtype=np.int64))
        if cols.size and (cols.min() < 0 or cols.max() >= lu.width):
            raise ValueError(f"hidden columns must lie in [0, {lu.width}) (got {cols.tolist()})")
        for name in ("grad_w", "grad_a"):
            arr = getattr(lu, name)
            if arr is not None:
                arr[:, cols] = 0.0
        if hide_a and lu.lora_a is not None and cols.size:
            lu.lora_a[:, cols] = 0.0
            lu.a_hidden = True
        lu.hidden = np.union1d(lu.hidden, cols).astype(np.int64)
    return out


def add_dp_noise(
    update: ObservedUpdate,
    *,
    noise_multiplier: float,
    max_norm: float,
    rng: np.random.Generator,
) -> ObservedUpdate:
    """Local DP on the update: clip the WHOLE update to ``max_norm``, add N(0, (sigma C)^2).

    The clipping factor uses ``update.total_norm`` (every trainable parameter, as the client clips
    its full upload), computed through :func:`shelora_core.privacy.clip_by_norm`; noise is drawn
    for the recorded layers only (the other layers' noise is irrelevant to the attack).
    ``shelora_core.privacy.gaussian_sigma(epsilon, delta)`` gives the multiplier of an
    (epsilon, delta) release (10, 1e-5 in the authors' configuration).

    Args:
        update: the update to privatize.
        noise_multiplier: sigma, noise std per unit of clipping norm (>= 0).
        max_norm: clipping norm C (> 0).
        rng: the client's noise generator.

    Returns:
        A noisy copy of ``update``.
    """
    if noise_multiplier < 0:
        raise ValueError(f"noise_multiplier must be >= 0 (got {noise_multiplier})")
    out = update.copy()
    arrays = {f"{i}/{k}": v for i, lu in out.layers.items() for k, v in lu.arrays().items()}
    seen = sum(float(np.sum(v**2)) for v in arrays.values())
    rest = math.sqrt(max(update.total_norm**2 - seen, 0.0))
    clipped, _factor = clip_by_norm({**arrays, "_rest": np.array([rest])}, max_norm)
    std = noise_multiplier * max_norm
    for key, v in clipped.items():
        if key == "_rest":
            continue
        idx, name = key.split("/")
        setattr(out.layers[int(idx)], name, v + rng.normal(0.0, std, size=v.shape))
    out.total_norm = float(min(update.total_norm, max_norm))
    return out
