"""DAGER: exact gradient inversion of a LLaMA-type decoder from what the server sees.

Written from the paper [1]_ for SmolLM2-135M (LLaMA architecture). The attack reads only an
:class:`~shelora_core.attacks.gradients.ObservedUpdate` (what the server received) and the public
pretrained model (:class:`~shelora_core.attacks.decoder_view.DecoderView`); every test is the span
check of :mod:`~shelora_core.attacks.span` ("does this input lie in the row space of the observed
gradient?"). Two stages, run together by :func:`dager_attack`:

1. **Token filtering** (:func:`filter_tokens`, layer 1): every vocabulary token has one candidate
   input to the first layer's ``q_proj``; keep the tokens within ``span_tol`` (relative distance)
   of the layer-1 span.
2. **Sequence reconstruction** (:func:`reconstruct_sequences`, layer 2): sentences are grown token
   by token from BOS; every live prefix is extended by every filtered token, the extension's
   input to the second layer's ``q_proj`` is computed exactly from the public weights, and the
   extensions within ``span_tol`` of the layer-2 span survive (greedy search with a beam of
   ``beam_width``).

With hidden columns and the adaptive attacker on the ``grad_b`` route, the unknown offset of
layer 2 is learned during the search (a posterior that widens the tolerance while it is
uncertain), then refitted on the reconstruction for a few EM passes. ``selection="rank"``
replaces the fixed threshold by "take the rank-many closest" (rank of the observed gradient), the
variant that survives an oblivious view of hidden columns.

The span check, the decoder view and the scores (:mod:`~shelora_core.attacks.scoring`) are
re-exported here.

References
----------
.. [1] Petrov, Dimitrov, Baader, Mueller and Vechev, "DAGER: Exact Gradient Inversion for Large
   Language Models", NeurIPS 2024.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .columns import sensitive_columns
from .decoder_view import DecoderView
from .gradients import ObservedUpdate
from .options import ATTACKERS, SELECTIONS, _check_choice
from .scoring import match_sentences, score_reconstruction, token_set_scores
from .span import RowSpan, SpanCheck, row_span, span_distances

__all__ = [
    "ATTACKERS",
    "SELECTIONS",
    "AttackResult",
    "DecoderView",
    "RowSpan",
    "SpanCheck",
    "TokenFilter",
    "dager_attack",
    "filter_tokens",
    "match_sentences",
    "reconstruct_sequences",
    "row_span",
    "score_reconstruction",
    "sensitive_columns",
    "span_distances",
    "token_set_scores",
]


# ---------------------------------------------------------------------------- stage 1: tokens
@dataclass
class TokenFilter:
    """Result of layer-1 token filtering.

    Attributes:
        tokens: selected token ids, closest first (int64).
        distances: relative distance of every vocabulary token to the span, float64 (V,).
        rank: rank of the observed layer-1 gradient.
        route: which gradient was used.
    """

    tokens: np.ndarray
    distances: np.ndarray
    rank: int
    route: str


def filter_tokens(
    view: DecoderView,
    check: SpanCheck,
    *,
    span_tol: float = 1e-3,
    selection: str = "threshold",
    exclude: Sequence[int] = (),
) -> TokenFilter:
    """DAGER's first stage: which vocabulary tokens' layer-1 inputs lie in the observed span.

    Args:
        view: the public model.
        check: the layer-1 span check (an adaptive ``grad_b`` check is fitted here).
        span_tol: relative distance below which a token passes (``selection="threshold"``).
        selection: ``"threshold"`` (DAGER as written) or ``"rank"`` (the rank-many closest).
        exclude: token ids never returned (e.g. BOS, whose position gets no query gradient).

    Returns:
        A :class:`TokenFilter`.
    """
    _check_choice(selection, SELECTIONS, "selection")
    x = view.first_layer_inputs()
    if check.route == "grad_b" and check.hidden.size:
        check.fit_offset(x, inliers=check.rank)
    dist = check.distances(x)
    if exclude:
        dist[torch.as_tensor(list(exclude), dtype=torch.long)] = math.inf
    order = torch.argsort(dist)
    if selection == "rank":
        chosen = order[: check.rank]
    else:
        chosen = order[: int((dist < span_tol).sum())]
    return TokenFilter(
        tokens=chosen.numpy().astype(np.int64),
        distances=dist.numpy(),
        rank=check.rank,
        route=check.route,
    )


# ---------------------------------------------------------------------------- stage 2: sentences
@dataclass
class _Beam:
    ids: list[int]
    dists: list[float] = field(default_factory=list)
    xs: list[torch.Tensor] = field(default_factory=list)  # accepted layer-2 inputs (online check)
    cum: float = 0.0  # cumulative distance (online check, one sentence)

    @property
    def score(self) -> float:
        return float(np.mean(self.dists)) if self.dists else math.inf


def reconstruct_sequences(
    view: DecoderView,
    check: SpanCheck,
    tokens: Sequence[int],
    *,
    batch_size: int,
    bos_id: int,
    span_tol: float = 1e-3,
    selection: str = "threshold",
    max_length: int = 64,
    beam_width: int | None = None,
    chunk: int = 4096,
    online: bool = False,
    online_beam: int = 32,
    online_mode: str = "auto",
) -> list[list[int]]:
    """DAGER's second stage for a causal decoder: grow sentences from BOS, one token at a time.

    Every live prefix is extended by every candidate token; the extension's layer-2 input is
    computed exactly (causal: it depends only on the prefix) and tested against the layer-2 span.
    With ``selection="threshold"`` the extensions within ``span_tol`` survive (at most
    ``beam_width``, closest first); a prefix none of whose extensions survives is finished. With
    ``selection="rank"`` the ``beam_width`` closest extensions survive at every step and a prefix
    is finished when its best extension is farther than twice its mean accepted distance.

    Args:
        view: the public model.
        check: the layer-2 span check.
        tokens: candidate tokens from :func:`filter_tokens`.
        batch_size: sentences in the batch (DAGER assumes the server knows it).
        bos_id: the BOS token every sentence starts with.
        span_tol: relative distance threshold.
        selection: ``"threshold"`` or ``"rank"``.
        max_length: longest sentence grown, BOS included.
        beam_width: live prefixes kept per step (default ``2 * batch_size + 4``; ``rank``
            selection: ``batch_size``).
        chunk: (prefix, token) pairs evaluated at once (bounds memory).
        online: adaptive ``grad_b`` check with hidden columns: the hidden offset is learned
            during the search (:meth:`SpanCheck.fit_posterior`).
        online_beam: beam width while learning online (at least).
        online_mode: ``"pooled"``: one posterior fitted on the inputs all live prefixes accepted
            (several sentences pin the offset down quickly, but wrong prefixes contaminate it);
            ``"per_beam"``: every prefix is a hypothesis with its own posterior, ranked by its
            cumulative distance (clean, but each sentence needs more than k positions);
            ``"auto"``: per-beam for one sentence or one hidden column, pooled otherwise (the
            better of the two in our SmolLM2 measurements, which are few).

    Returns:
        Up to ``batch_size`` token-id lists (BOS excluded), best mean distance first.
    """
    _check_choice(selection, SELECTIONS, "selection")
    if beam_width is None:
        beam_width = batch_size if selection == "rank" else 2 * batch_size + 4
    cand = torch.as_tensor(list(tokens), dtype=torch.long)
    online = online and check.online
    _check_choice(online_mode, ("auto", "pooled", "per_beam"), "online_mode")
    if online_mode == "auto":
        online_mode = "per_beam" if batch_size == 1 or check.hidden.size == 1 else "pooled"
    per_beam = online and online_mode == "per_beam"
    if online:
        beam_width = max(beam_width, online_beam)
    finished: list[_Beam] = []
    live = [_Beam([int(bos_id)])]
    if cand.numel() == 0:
        return []
    for _ in range(1, max_length):
        if not live:
            break
        prefixes = torch.tensor([b.ids for b in live], dtype=torch.long)
        width = view.embed.shape[1]
        if online and not per_beam:
            seen: dict[tuple[int, ...], torch.Tensor] = {}
            for b in live:
                for j, xj in enumerate(b.xs):
                    seen.setdefault(tuple(b.ids[: j + 2]), xj)
            acc = torch.stack(list(seen.values())) if seen else torch.zeros(0, width)
            check.fit_posterior(acc, span_tol=span_tol)
        step = max(1, chunk // len(live))
        parts, cums, inputs = [], [], []
        for lo in range(0, cand.numel(), step):
            x = view.second_layer_inputs(prefixes, cand[lo : lo + step])  # (P, c, n)
            if per_beam:
                rows = []
                for pi, b in enumerate(live):
                    acc = torch.stack(b.xs) if b.xs else torch.zeros(0, width)
                    check.fit_posterior(acc, span_tol=span_tol)
                    rows.append(check.distances(x[pi]))
                parts.append(torch.stack(rows))
                cums.append(torch.stack([r + b.cum for r, b in zip(rows, live, strict=True)]))
            else:
                parts.append(check.distances(x.reshape(-1, width)).reshape(len(live), -1))
            if online:
                inputs.append(x)
        dist = torch.cat(parts, dim=1)
        xall = torch.cat(inputs, dim=1) if online else None
        cum = torch.cat(cums, dim=1) if per_beam else None
        flat = torch.argsort((cum if per_beam else dist).reshape(-1))
        nxt: list[_Beam] = []
        extended = set()
        for f in flat.tolist():
            pi, ci = divmod(f, cand.numel())
            d = float(dist[pi, ci])
            beam = live[pi]
            if selection == "threshold" and not d < span_tol:
                if per_beam:
                    continue  # ranked by cumulative distance, not this step's: look further
                break
            if selection == "rank" and beam.dists and d > 2.0 * max(beam.score, 1e-12):
                continue
            xs = beam.xs + [xall[pi, ci]] if online else beam.xs
            total = float(cum[pi, ci]) if per_beam else 0.0
            nxt.append(_Beam(beam.ids + [int(cand[ci])], beam.dists + [d], xs, total))
            extended.add(pi)
            if len(nxt) >= beam_width:
                break
        finished += [b for i, b in enumerate(live) if i not in extended and len(b.ids) > 1]
        live = nxt
    finished += [b for b in live if len(b.ids) > 1]
    finished.sort(key=lambda b: (b.score, -len(b.ids)))
    out: list[list[int]] = []
    for b in finished:
        seq = b.ids[1:]
        if seq not in out:
            out.append(seq)
        if len(out) == batch_size:
            break
    return out


def _refit_second_layer(
    view: DecoderView,
    check: SpanCheck,
    sequences: Sequence[Sequence[int]],
    bos_id: int,
    span_tol: float,
) -> None:
    """EM step: posterior mean of the hidden offset from every position of the reconstruction."""
    xs = [view.sequence_inputs([bos_id, *s]) for s in sequences if s]
    check.fit_posterior(
        torch.cat(xs) if xs else torch.zeros(0, view.embed.shape[1]), span_tol=span_tol
    )
    check.clear_posterior()


# ---------------------------------------------------------------------------- whole attack
@dataclass
class AttackResult:
    """What DAGER recovered from one update.

    Attributes:
        sequences: reconstructed token ids per sentence (BOS excluded).
        tokens: layer-1 token set (ids).
        rank_layer1: rank of the layer-1 gradient.
        rank_layer2: rank of the layer-2 gradient.
        route: which gradient the checks used (``grad_w``, ``grad_a`` or ``grad_b``).
        token_distances: layer-1 distance of every vocabulary token (V,).
    """

    sequences: list[list[int]]
    tokens: np.ndarray
    rank_layer1: int
    rank_layer2: int
    route: str
    token_distances: np.ndarray


def dager_attack(
    model: Any,
    update: ObservedUpdate,
    *,
    attacker: str = "oblivious",
    selection: str = "threshold",
    route: str = "auto",
    rank_tol: float = 1e-5,
    span_tol: float = 1e-3,
    span_tol2: float | None = None,
    max_length: int = 64,
    beam_width: int | None = None,
    max_tokens: int | None = None,
    em_rounds: int = 2,
    online_mode: str = "auto",
) -> AttackResult:
    """Run DAGER on an observed update: token filtering, then sentence reconstruction.

    Reads only ``update`` (what the server received) and the public weights of ``model``; the
    LoRA factors, if any, come from ``update`` (hidden columns stay unknown).

    Args:
        model: the attacker's copy of the public model (its LoRA weights are not read).
        update: the observed update with layers 0 and 1.
        attacker: ``"oblivious"`` or ``"adaptive"``.
        selection: ``"threshold"`` or ``"rank"`` (both stages).
        route: span-check route (see :class:`SpanCheck`).
        rank_tol: singular-value threshold for the gradient ranks.
        span_tol: layer-1 relative distance threshold.
        span_tol2: layer-2 threshold (defaults to ``span_tol``).
        max_length: longest sentence grown, BOS included.
        beam_width: see :func:`reconstruct_sequences`.
        max_tokens: at most this many (closest) layer-1 tokens enter the sentence search
            (default: the layer width n, the largest span a gradient can have). The reported token
            set is not capped.
        em_rounds: adaptive ``grad_b`` route: passes of "reconstruct, refit the hidden offset of
            layer 2 on the reconstruction".
        online_mode: adaptive ``grad_b`` route: see :func:`reconstruct_sequences`.

    Returns:
        An :class:`AttackResult`; ``sequences`` is empty when the layer-2 span is full rank
        (the check is vacuous: every extension would pass).
    """
    _check_choice(attacker, ATTACKERS, "attacker")
    _check_choice(selection, SELECTIONS, "selection")
    for i in (0, 1):
        if i not in update.layers:
            raise ValueError(f"the update has no layer {i}; DAGER needs layers 0 and 1")
    if update.bos_id is None:
        raise ValueError("the update records no BOS id; DAGER grows sentences from BOS")
    view = DecoderView.from_model(model, update)
    check1 = SpanCheck(update.layers[0], attacker=attacker, route=route, rank_tol=rank_tol)
    check2 = SpanCheck(update.layers[1], attacker=attacker, route=route, rank_tol=rank_tol)
    filt = filter_tokens(
        view, check1, span_tol=span_tol, selection=selection, exclude=[update.bos_id]
    )
    tol2 = span_tol if span_tol2 is None else span_tol2
    cap = view.embed.shape[1] if max_tokens is None else max_tokens
    candidates = filt.tokens[:cap]
    if check2.vacuous or candidates.size == 0:
        # a full-rank layer-2 span tests nothing: every extension would pass
        return AttackResult([], filt.tokens, check1.rank, check2.rank, check1.route, filt.distances)
    kwargs = dict(
        batch_size=update.batch_size,
        bos_id=update.bos_id,
        span_tol=tol2,
        max_length=max_length,
        beam_width=beam_width,
    )
    adaptive_b = check2.route == "grad_b" and check2.hidden.size > 0
    if adaptive_b:
        # unknown N of layer 2: learn it while growing the sentences, then refit on the result
        seqs = reconstruct_sequences(
            view,
            check2,
            candidates,
            selection=selection,
            online=True,
            online_mode=online_mode,
            **kwargs,
        )
        for _ in range(em_rounds):
            _refit_second_layer(view, check2, seqs, update.bos_id, tol2)
            seqs = reconstruct_sequences(view, check2, candidates, selection=selection, **kwargs)
    else:
        seqs = reconstruct_sequences(view, check2, candidates, selection=selection, **kwargs)
    return AttackResult(
        sequences=seqs,
        tokens=filt.tokens,
        rank_layer1=check1.rank,
        rank_layer2=check2.rank,
        route=check1.route,
        token_distances=filt.distances,
    )
