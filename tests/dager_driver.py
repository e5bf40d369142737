"""Test-only DAGER driver: simulate one client's update on given sentences and attack it.

The package's attack grid (:mod:`shelora_core.attacks.grid`) attacks the bytes each method
really uploads; this driver is the smaller harness ``tests/test_dager.py`` runs DAGER (Petrov et
al., "DAGER: Exact Gradient Inversion for Large Language Models", NeurIPS 2024) through: it builds
the update directly from a training step (:mod:`shelora_core.attacks.gradients`), hides SHE-LoRA's
columns and adds local DP itself.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from shelora_core.attacks.dager import (
    ATTACKERS,
    SELECTIONS,
    dager_attack,
    match_sentences,
    score_reconstruction,
    sensitive_columns,
    token_set_scores,
)
from shelora_core.attacks.gradients import (
    add_dp_noise,
    capture_update,
    encode_batch,
    hide_columns,
    multistep_update,
)
from shelora_core.attacks.options import _check_choice

#: Which client update is attacked (see :func:`run_attack`).
UPDATES: tuple[str, ...] = ("fedsgd_round1", "fedsgd_later", "multistep")


@functools.lru_cache(maxsize=2)
def load_victim(model_name: str, lora_rank: int | None, alpha: float):
    """A classifier (full fine-tuning) or ``LoraModel`` (q_proj adapters) for the attacked client.

    Cached (two entries): building one costs a model load; every run sets the adapter explicitly.
    """
    from shelora_core.assets import load_classifier, load_tokenizer
    from shelora_core.lora import LoraModel

    tok = load_tokenizer(model_name)
    if lora_rank is None:
        return load_classifier(model_name, num_labels=2, seed=0), tok
    model = LoraModel(
        model_name, num_labels=2, ranks=(lora_rank,), alpha=alpha, target_modules=("q_proj",)
    )
    return model, tok


def run_attack(
    model_name: str,
    sentences: Sequence[str],
    *,
    batch_size: int,
    lora_rank: int | None = None,
    hidden_columns: int | Sequence[int] | Mapping[int, Sequence[int]] | None = None,
    attacker: str = "oblivious",
    update: str = "fedsgd_round1",
    dp_sigma: float | None = None,
    dp_clip: float = 1.0,
    seed: int = 0,
    labels: Sequence[int] | None = None,
    selection: str = "threshold",
    rank_tol: float = 1e-5,
    span_tol: float = 1e-3,
    max_length: int = 48,
    lora_alpha: float = 16.0,
    later_b_std: float = 0.01,
    local_steps: int = 5,
    local_lr: float = 1e-3,
    hide_initial_a: bool = True,
) -> dict[str, Any]:
    """Simulate one client's update on ``sentences`` and attack it with DAGER.

    The client fine-tunes the package's sequence classifier (Rotten Tomatoes sentiment, 2
    classes): full fine-tuning when ``lora_rank`` is ``None``, otherwise LoRA on every ``q_proj``
    (``LoraModel``). ``sentences`` are split into consecutive batches of ``batch_size``; every batch
    is one client update, attacked separately; the metrics are means over batches.

    Updates:

    - ``"fedsgd_round1"``: one SGD step's gradient at the round-1 adapter (``B = 0``, ``A`` the
      package's seeded init), so ``grad A = 0`` and LoRA attacks go through ``grad B``;
    - ``"fedsgd_later"``: one gradient at a later-round adapter (``B`` drawn N(0, later_b_std^2),
      seeded), so ``grad A`` spans the inputs;
    - ``"multistep"``: ``local_steps`` AdamW steps on the batch, weight difference / lr.

    Args:
        model_name: ``"smollm2"`` (the decoder DAGER is written for here).
        sentences: the client's texts, ``len`` a multiple of ``batch_size``.
        batch_size: sentences per update (1, 2, 4, 8, ...).
        lora_rank: LoRA rank r, or ``None`` for full fine-tuning.
        hidden_columns: SHE-LoRA's encrypted A columns: ``k`` (the client's top-``k`` sensitive
            columns per layer, :func:`sensitive_columns`), explicit columns, or layer -> columns.
        attacker: ``"oblivious"`` or ``"adaptive"`` (knows which columns are hidden).
        update: ``"fedsgd_round1"``, ``"fedsgd_later"`` or ``"multistep"``.
        dp_sigma: local DP noise multiplier (``None``: no DP); see
            :func:`~shelora_core.privacy.gaussian_sigma` for an (epsilon, delta) value.
        dp_clip: DP clipping norm of the whole update.
        seed: seeds labels (when not given), the later-round ``B`` and the DP noise.
        labels: class ids per sentence (default: seeded random).
        selection: ``"threshold"`` or ``"rank"``.
        rank_tol: singular-value threshold for gradient ranks.
        span_tol: relative span-distance threshold (both layers).
        max_length: tokens per sentence, BOS included (longer ones are truncated).
        lora_alpha: LoRA alpha.
        later_b_std: std of the later-round ``B``.
        local_steps: AdamW steps of a ``"multistep"`` update.
        local_lr: AdamW learning rate of a ``"multistep"`` update.
        hide_initial_a: with hidden columns, the attacker does not know ``A[:, J]`` (``False``: a
            round-1 ``A`` from a public seed is known to the server).

    Returns:
        ``{"rouge1", "rouge2", "rougeL", "token_precision", "token_recall", "reconstructed",
        "references", "batches"}``; ``batches`` lists per-batch metrics and diagnostics (gradient
        ranks, route, hidden columns).

    Raises:
        ValueError: on a model other than ``"smollm2"``, an unknown attacker, update or
            selection, ``lora_rank < 1``, a sentence count that is not a positive multiple of
            ``batch_size``, or a multi-step update without LoRA.
    """
    _check_choice(attacker, ATTACKERS, "attacker")
    _check_choice(update, UPDATES, "update")
    _check_choice(selection, SELECTIONS, "selection")
    if model_name != "smollm2":
        raise ValueError(
            f"run_attack is written for the decoder 'smollm2' (got {model_name!r}); DAGER's "
            "encoder variant (BERT, MiniLM) is not built"
        )
    if isinstance(sentences, str):
        raise ValueError("sentences must be a list of strings, not one string")
    sentences = list(sentences)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 (got {batch_size})")
    if not sentences or len(sentences) % batch_size:
        raise ValueError(
            f"got {len(sentences)} sentences for batch_size={batch_size}: pass a positive "
            "multiple of the batch size (every batch is one client update)"
        )
    if lora_rank is not None and lora_rank < 1:
        raise ValueError(f"lora_rank must be >= 1 or None for full fine-tuning (got {lora_rank})")
    if update == "multistep" and lora_rank is None:
        raise ValueError(
            "update='multistep' needs lora_rank (multi-step full fine-tuning is not built)"
        )
    if labels is not None and len(labels) != len(sentences):
        raise ValueError(f"got {len(labels)} labels for {len(sentences)} sentences")
    if dp_sigma is not None and dp_sigma < 0:
        raise ValueError(f"dp_sigma must be >= 0 (got {dp_sigma})")

    victim, tok = load_victim(model_name, lora_rank, float(lora_alpha))
    rng = np.random.default_rng([seed, 0xDA6E])
    if labels is None:
        labels = rng.integers(0, 2, size=len(sentences)).tolist()
    if lora_rank is not None:
        weights = victim.init_weights(lora_rank, seed=seed)
        if update == "fedsgd_later":
            for name, (b, a) in weights.factors.items():
                weights.factors[name] = (
                    rng.normal(0.0, later_b_std, size=b.shape).astype(np.float32),
                    a,
                )
        victim.load(weights)

    rows, recon_all, refs_all = [], [], []
    for start in range(0, len(sentences), batch_size):
        batch_texts = sentences[start : start + batch_size]
        batch = encode_batch(tok, batch_texts, max_length=max_length)
        y = labels[start : start + batch_size]
        if update == "multistep":
            obs = multistep_update(victim, batch, labels=y, steps=local_steps, lr=local_lr)
        else:
            obs = capture_update(victim, batch, labels=y)
        hidden = _resolve_hidden(hidden_columns, victim, batch)
        if hidden is not None:
            obs = hide_columns(obs, hidden, hide_a=hide_initial_a)
        if dp_sigma is not None:
            obs = add_dp_noise(obs, noise_multiplier=dp_sigma, max_norm=dp_clip, rng=rng)
        res = dager_attack(
            victim,
            obs,
            attacker=attacker,
            selection=selection,
            rank_tol=rank_tol,
            span_tol=span_tol,
            max_length=max_length,
        )
        ids = batch["input_ids"][batch["attention_mask"].bool()].tolist()
        true_tokens = set(ids) - {tok.bos_token_id}
        refs = [
            tok.decode(row[1:][m[1:].bool()].tolist())
            for row, m in zip(batch["input_ids"], batch["attention_mask"], strict=True)
        ]
        recon = [tok.decode(s) for s in res.sequences]
        matched = match_sentences(recon, refs)
        rouge = score_reconstruction(recon, refs)
        prec, rec = token_set_scores(res.tokens, true_tokens)
        rows.append(
            {
                "rouge1": rouge["rouge1"],
                "rouge2": rouge["rouge2"],
                "rougeL": rouge["rougeL"],
                "token_precision": prec,
                "token_recall": rec,
                "rank_layer1": res.rank_layer1,
                "rank_layer2": res.rank_layer2,
                "route": res.route,
                "distinct_tokens": len(true_tokens),
                "hidden": {int(i): [int(c) for c in v] for i, v in (hidden or {}).items()}
                if isinstance(hidden, Mapping)
                else hidden,
            }
        )
        recon_all += matched
        refs_all += refs
    keys = ("rouge1", "rouge2", "rougeL", "token_precision", "token_recall")
    out: dict[str, Any] = {k: float(np.mean([r[k] for r in rows])) for k in keys}
    out.update(reconstructed=recon_all, references=refs_all, batches=rows)
    return out


def _resolve_hidden(
    hidden: int | Sequence[int] | Mapping[int, Sequence[int]] | None,
    model: Any,
    batch: Mapping[str, torch.Tensor],
) -> Mapping[int, Sequence[int]] | Sequence[int] | None:
    if hidden is None:
        return None
    if isinstance(hidden, (int, np.integer)) and not isinstance(hidden, bool):
        if hidden < 0:
            raise ValueError(f"hidden_columns must be >= 0 (got {hidden})")
        if hidden == 0:
            return None
        return sensitive_columns(model, batch, int(hidden))
    return hidden
