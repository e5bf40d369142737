"""Column sensitivity of LoRA ``A`` matrices: which input columns a client wants encrypted.

Step 1 of SHE-LoRA (Liu et al., "SHE-LoRA: Selective Homomorphic Encryption for Federated Tuning
with Heterogeneous LoRA", ICLR 2026; docs/design.md, "One round on the wire"): before round 1 every client runs a small
calibration batch of its OWN data through the model, measures per input feature ``j`` of every
adapted layer the activation norm ``||X_j||_2`` (over all non-padding tokens), and scores the
columns of its LoRA factor ``A`` (r x n) with a Wanda-style metric (Sun et al., "A Simple and
Effective Pruning Approach for Large Language Models", ICLR 2024, which scores weights by
``|W_ij| * ||X_j||``)::

    "abs_sum"  (default, Wanda-style):      S_j = (sum_k |A_kj|) * ||X_j||
    "authors"  (the SHE-LoRA authors' code): S_j = |sum_k A_kj|  * ||X_j||

The client's proposal is the top-``k`` columns by decreasing score (ties to the lower index). The
two variants agree when every column of ``A`` has entries of one sign and differ otherwise: with
mixed signs the authors' form lets entries cancel, so it ranks a column with large but opposing
entries low.

:func:`massive_features` summarises how concentrated the activation norms are (a few
"massive-activation" features dominate the inputs of some models) and :func:`topk_overlap`
compares two proposals for the stability analysis.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from .data import ClientData
    from .lora import AdapterWeights, LoraModel

__all__ = [
    "VARIANTS",
    "activation_norms",
    "calibration_indices",
    "client_sensitivity",
    "column_scores",
    "massive_features",
    "propose",
    "propose_with_scores",
    "topk_overlap",
]

#: Allowed scoring variants of :func:`column_scores`.
VARIANTS: tuple[str, ...] = ("abs_sum", "authors")


# ---------------------------------------------------------------------------- activations
def calibration_indices(num_available: int, num_examples: int, *, seed: int = 0) -> np.ndarray:
    """The (seeded) example indices of a client's calibration batch.

    Args:
        num_available: how many examples the client holds.
        num_examples: calibration batch size; all examples are used if the client has fewer.
        seed: seeds the draw (same seed, same subset).

    Returns:
        Sorted int64 indices, ``min(num_examples, num_available)`` of them, without repetition.

    Raises:
        ValueError: if ``num_examples < 1`` or the client holds no example.
    """
    if num_examples < 1:
        raise ValueError(f"num_examples must be >= 1 (got {num_examples})")
    if num_available < 1:
        raise ValueError("the client holds no example: cannot build a calibration batch")
    if num_examples >= num_available:
        return np.arange(num_available, dtype=np.int64)
    rng = np.random.default_rng([seed, 0x5E45])
    return np.sort(rng.choice(num_available, size=num_examples, replace=False)).astype(np.int64)


def _trim(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the leading/trailing sequence positions that are padding in every row of the batch."""
    used = torch.nonzero(mask.bool().any(0)).flatten()
    if used.numel() == 0:
        return ids[:, :1], mask[:, :1]
    lo, hi = int(used[0]), int(used[-1]) + 1
    return ids[:, lo:hi], mask[:, lo:hi]


def activation_norms(
    model: LoraModel,
    data: ClientData,
    *,
    num_examples: int = 128,
    batch_size: int = 32,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Per input feature ``j`` of every adapted layer, ``||X_j||_2`` over a calibration batch.

    ``X`` is the input of the LoRA-wrapped layer (the same input its ``A`` sees), gathered with
    forward pre-hooks over all NON-padding tokens of ``num_examples`` examples drawn (seeded) from
    the client's data. Squares are accumulated in float64 and the square root is taken at the end,
    so the result does not depend on ``batch_size`` (up to float32 forward-pass rounding). The
    forward runs in eval mode (no dropout) under ``torch.no_grad()``; the model's previous
    train/eval mode is restored and the hooks removed afterwards, even on error.

    Args:
        model: the base model with the client's adapter already loaded and active (activations at
            deeper layers depend on the adapters of the layers below).
        data: the client's private examples.
        num_examples: calibration batch size (all examples if the client has fewer).
        batch_size: examples per forward pass (memory only; not the result).
        seed: seeds the choice of calibration examples.

    Returns:
        Layer name -> float64 vector of length ``n`` (the layer's input width).

    Raises:
        ValueError: on a non-positive ``batch_size`` or ``num_examples``, an empty client, or a
            hooked input whose shape does not match the attention mask.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 (got {batch_size})")
    idx = torch.from_numpy(calibration_indices(len(data), num_examples, seed=seed))
    sq = {name: np.zeros(shape[1], dtype=np.float64) for name, shape in model.layer_shapes.items()}
    current: dict[str, torch.Tensor] = {}

    def make_hook(name: str):
        def hook(_module: torch.nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]
            mask = current["mask"]
            if x.shape[:-1] != mask.shape:
                raise ValueError(
                    f"hooked input of {name} has shape {tuple(x.shape)}, which does not match "
                    f"the attention mask {tuple(mask.shape)} (expected (batch, seq, n))"
                )
            tokens = x.detach().reshape(-1, x.shape[-1])[mask.reshape(-1).bool()]
            sq[name] += (tokens.double() ** 2).sum(0).cpu().numpy()

        return hook

    was_training = model.model.training
    handles = []
    try:
        model.model.eval()
        for name, module in model._lora_modules.items():
            handles.append(module.register_forward_pre_hook(make_hook(name)))
        with torch.no_grad():
            for start in range(0, len(idx), batch_size):
                sel = idx[start : start + batch_size]
                ids, mask = _trim(data.input_ids[sel], data.attention_mask[sel])
                current["mask"] = mask
                model.logits(ids, mask)
    finally:
        for h in handles:
            h.remove()
        model.model.train(was_training)
    return {name: np.sqrt(v) for name, v in sq.items()}


# ---------------------------------------------------------------------------- scores and top-k
def column_scores(a: np.ndarray, norms: np.ndarray, *, variant: str = "abs_sum") -> np.ndarray:
    """Sensitivity ``S_j`` of every input column ``j`` of a LoRA factor ``A``.

    Args:
        a: the LoRA ``A`` matrix, shape (r, n).
        norms: ``||X_j||`` per input feature, shape (n,) (from :func:`activation_norms`).
        variant: ``"abs_sum"`` for ``(sum_k |A_kj|) * ||X_j||`` (Wanda-style, default) or
            ``"authors"`` for ``|sum_k A_kj| * ||X_j||`` (the SHE-LoRA authors' code).

    Returns:
        float64 scores, shape (n,).

    Raises:
        ValueError: on an unknown variant, or if ``a`` is not (r, n) with ``norms`` of length n.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown sensitivity variant {variant!r}; choose one of {list(VARIANTS)}")
    a = np.asarray(a, dtype=np.float64)
    norms = np.asarray(norms, dtype=np.float64)
    if a.ndim != 2 or norms.ndim != 1 or a.shape[1] != norms.shape[0]:
        raise ValueError(
            f"shape mismatch: A has shape {a.shape} and norms {norms.shape}; expected A (r, n) "
            "and norms (n,) with the same n (the layer's input width)"
        )
    col = np.abs(a).sum(0) if variant == "abs_sum" else np.abs(a.sum(0))
    return col * norms


def propose_with_scores(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The top-``k`` columns by decreasing score, with their scores.

    Ties go to the lower column index (a stable sort), so the proposal is deterministic.

    Args:
        scores: per-column scores, shape (n,).
        k: how many columns to propose (the client's HE budget for the layer).

    Returns:
        ``(indices, scores)``: int64 indices (length ``k``) and their float64 scores, in order.

    Raises:
        ValueError: if ``scores`` is not 1-D or holds NaN, ``k < 0``, or ``k > n``.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 1:
        raise ValueError(f"scores must be a 1-D vector, got shape {scores.shape}")
    n = scores.shape[0]
    if k < 0:
        raise ValueError(f"budget k must be >= 0 (got k={k})")
    if k > n:
        raise ValueError(f"budget k={k} exceeds the layer width n={n}; lower the HE budget")
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN: check the activation norms and the adapter")
    order = np.argsort(-scores, kind="stable")[:k].astype(np.int64)
    return order, scores[order]


def propose(scores: np.ndarray, k: int) -> np.ndarray:
    """The top-``k`` column indices by decreasing score, ties to the lower index.

    Args:
        scores: per-column scores, shape (n,).
        k: how many columns to propose; ``0`` gives an empty proposal.

    Returns:
        int64 indices, length ``k``.

    Raises:
        ValueError: as :func:`propose_with_scores`, e.g. ``"budget k=... exceeds the layer width
            n=...; lower the HE budget"``.
    """
    return propose_with_scores(scores, k)[0]


def client_sensitivity(
    model: LoraModel,
    weights: AdapterWeights,
    data: ClientData,
    *,
    budget: int,
    num_examples: int = 128,
    variant: str = "abs_sum",
    seed: int = 0,
    batch_size: int = 32,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """A client's proposal: per layer the ``budget`` most sensitive columns and their scores.

    Loads ``weights`` into the model first (layer l's input does not depend on layer l's own
    adapter, but deeper layers' inputs depend on the adapters below), measures the activation
    norms on the client's calibration batch and scores every layer's ``A``.

    Args:
        model: the shared base model; ``weights`` is loaded into the adapter of its rank.
        weights: the client's adapter (the ``A`` factors are scored).
        data: the client's private examples.
        budget: columns proposed per layer (the client's HE budget k_i).
        num_examples: calibration batch size.
        variant: scoring variant, see :func:`column_scores`.
        seed: seeds the calibration subset.
        batch_size: examples per forward pass.

    Returns:
        Layer name -> ``(indices, scores)``, both of length ``budget``, by decreasing score.

    Raises:
        ValueError: on an unknown variant or a budget larger than a layer's width (checked before
            any forward pass).
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown sensitivity variant {variant!r}; choose one of {list(VARIANTS)}")
    for name, (_m, n) in model.layer_shapes.items():
        if not 0 <= budget <= n:
            raise ValueError(
                f"budget k={budget} exceeds the layer width n={n} of {name}; lower the HE budget"
                if budget > n
                else f"budget k must be >= 0 (got k={budget})"
            )
    model.load(weights)
    norms = activation_norms(
        model, data, num_examples=num_examples, batch_size=batch_size, seed=seed
    )
    out = {}
    for name in model.layer_names:
        _b, a = weights.factors[name]
        out[name] = propose_with_scores(column_scores(a, norms[name], variant=variant), budget)
    return out


# ---------------------------------------------------------------------------- analysis helpers
def massive_features(norms: np.ndarray, top: int = 8) -> dict[str, Any]:
    """How much of the activation energy the ``top`` largest features carry.

    ``sum_j ||X_j||^2`` is the total squared norm of all calibration tokens, so ``share`` is the
    fraction of ``E||x||^2`` carried by the ``top`` features (``uniform_share = top / n`` if all
    features were equal).

    Args:
        norms: ``||X_j||`` per input feature, shape (n,).
        top: how many of the largest features to report (clipped to n).

    Returns:
        ``{"indices": int64 (top,), "norms": float64 (top,), "share": float,
        "shares": float64 (top,), "uniform_share": float, "max_over_median": float}``; ``shares``
        is each feature's own share, ``max_over_median`` the largest norm over the median norm.

    Raises:
        ValueError: if ``norms`` is not a non-empty 1-D vector or ``top < 1``.
    """
    norms = np.asarray(norms, dtype=np.float64)
    if norms.ndim != 1 or norms.size == 0:
        raise ValueError(f"norms must be a non-empty 1-D vector, got shape {norms.shape}")
    if top < 1:
        raise ValueError(f"top must be >= 1 (got {top})")
    top = min(top, norms.size)
    idx, vals = propose_with_scores(norms, top)
    energy = norms**2
    total = float(energy.sum())
    shares = energy[idx] / total if total > 0 else np.zeros(top)
    median = float(np.median(norms))
    return {
        "indices": idx,
        "norms": vals,
        "share": float(shares.sum()),
        "shares": shares,
        "uniform_share": top / norms.size,
        "max_over_median": float(vals[0] / median) if median > 0 else float("inf"),
    }


def topk_overlap(a: Sequence[int], b: Sequence[int]) -> float:
    """Overlap ``|a & b| / k`` of two top-k proposals, with ``k = max(|a|, |b|)``.

    Chosen over Jaccard (``|a & b| / |a | b|``) because it reads directly as "the fraction of the
    top-k that survives": two proposals sharing 4 of 8 columns give 0.5 (Jaccard would give 1/3).
    Order and repeated indices are ignored (the inputs are treated as sets).

    Args:
        a: column indices of one proposal.
        b: column indices of another.

    Returns:
        A value in [0, 1]; 1.0 when both are empty.
    """
    sa = {int(i) for i in a}
    sb = {int(i) for i in b}
    k = max(len(sa), len(sb))
    if k == 0:
        return 1.0
    return len(sa & sb) / k
