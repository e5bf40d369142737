"""An optimisation-based reconstruction attack: gradient matching on continuous input embeddings.

DAGER (:mod:`~shelora_core.attacks.dager`) is a span check: it asks whether a candidate input lies
in the row space of an observed gradient. Reviewers asked for an attack that is NOT a span check,
so this module implements one from the other family of gradient-inversion attacks, the
optimisation-based one of DLG / TAG / LAMP (Zhu et al. 2019; Deng et al. 2021; Balunovic et al.
2022), written here from the idea, not from their code:

1. The server holds the public model, the LoRA factors it broadcast (entries it broadcast
   encrypted are unknown: zero in its copy) and the observed update ``(start - after) / lr`` of
   every adapted layer (:class:`MatchTarget`). It knows the batch size, every sentence's length
   (the attention mask, as the DAGER cells know the batch size; an assumption in the attacker's
   favour), the BOS token at position 0 and the labels (known, not optimised: with two classes
   the head's update does not reveal them, see the notes).
2. It optimises dummy *input embeddings* (one 576-vector per real position) with Adam so that the
   LoRA gradient the dummy batch produces matches the observed one. The distance (:func:`distance`)
   is, over every adapted layer and both factors, the mean of ``1 - cos(dummy, observed)`` plus
   ``l2_weight`` times the relative squared L2 error ``||dummy - observed||^2 / ||observed||^2``
   (TAG's idea of pairing a scale-free and a scale-aware term), plus LAMP's prior that keeps every
   dummy embedding's norm near the vocabulary's mean norm.
3. Every position is decoded to its nearest vocabulary embedding (cosine), then a few discrete
   refinement sweeps try, position by position, the ``refine_candidates`` nearest tokens and keep
   the one with the smallest matching distance, then every swap of two neighbouring tokens (one
   pass for all of them), keeping the best if it lowers the distance.

Masking: the ``"adaptive"`` attacker knows which entries it does not see (SHE-LoRA's encrypted
columns of ``grad A``; the column list travels in the upload header) and leaves them out of the
distance; the ``"oblivious"`` one reads them as zeros and matches them. The unknown columns of the
broadcast ``A`` (a later SHE-LoRA round) stay zero in the dummy model for both (fitting them too
would add ``r * k`` unknowns per layer). Their effect on the forward pass is negligible, but
``grad B = s G X A^T`` reads them in every entry (SHE-LoRA's columns are the massive-activation
features, so ``x_J`` is large), so the adaptive attacker also drops ``grad B`` of such layers
(:meth:`MatchTarget.from_update`); the visible ``grad A`` still carries the inputs.

How the gradient is formed: forward hooks add ``s B A x`` to every plain ``q_proj`` of the public
model and keep its input ``x_t`` and output ``y_t``; ``G_t = dL/dy_t`` comes from one
``autograd.grad`` with ``create_graph=True``, and ``grad A = s sum_t (G_t B)^T x_t``,
``grad B = s sum_t G_t^T (A x_t)`` per *group* of ``batch_size`` sentences. Several random
restarts therefore run as groups of one forward pass (the cost of a step on 2 cores is mostly
per-operation overhead, not arithmetic), and the refinement scores all candidates of a position
in one first-order pass.

Cost (SmolLM2-135M, one thread, 2 shared cores): one Adam step (forward, ``G`` with its graph,
the second backward) takes about 0.6-1.2 s for one to a few short sentences, nearly independent
of their length; a refinement sweep costs one first-order pass (about 0.3-0.5 s) per position.
A hard iteration cap (``max_iters``) and a time cap (``time_cap`` seconds, split between the
continuous phase and the refinement by ``refine_share``) bound every attack. The result is
deterministic given the seed as long as the iteration cap, not the time cap, stops it
(:attr:`OptimisationResult.stopped` says which).

Notes
-----
Labels: with a softmax over two classes and one sentence, the update of the head is
``(p - y) h^T`` whose two rows are negatives of each other, so DLG's label trick does not tell
the label; the attacker here is given the labels (in its favour). The attack reads the update of
every adapted layer (SmolLM2: all 30 ``q_proj``), not only the first two as DAGER does.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..adapters import layer_index
from .gradients import ObservedUpdate, q_proj, unwrap
from .options import _check_choice
from .threat import ServerKnowledge, ServerView, observed_update

__all__ = [
    "MASKINGS",
    "MatchTarget",
    "OptimisationResult",
    "OptimisationSettings",
    "attack_view",
    "distance",
    "matching_distance",
    "optimisation_attack",
]

#: how the attacker treats the entries it does not see (see the module docstring)
MASKINGS: tuple[str, ...] = ("adaptive", "oblivious")


@dataclass(frozen=True)
class OptimisationSettings:
    """The knobs of :func:`optimisation_attack`.

    Attributes:
        max_iters: hard cap on Adam steps (>= 0).
        time_cap: wall-clock seconds for the whole attack (continuous phase and refinement; the
            attack stops at the first check past it, so it may overrun by one step).
        restarts: random initialisations optimised together (the lowest distance is decoded).
        lr: Adam step size in units of the vocabulary embeddings' per-coordinate std.
        l2_weight: weight of the relative squared L2 term beside the cosine term.
        norm_weight: weight of the embedding-norm prior (LAMP).
        refine_rounds: discrete refinement sweeps over the positions (0: nearest token only).
        refine_candidates: nearest tokens tried per position in a sweep.
        refine_share: fraction of ``time_cap`` kept for the refinement.
        seed: seeds the initialisation.
    """

    max_iters: int = 200
    time_cap: float = 30.0
    restarts: int = 2
    lr: float = 0.5
    l2_weight: float = 0.5
    norm_weight: float = 0.05
    refine_rounds: int = 1
    refine_candidates: int = 4
    refine_share: float = 0.25
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_iters < 0:
            raise ValueError(f"max_iters must be >= 0 (got {self.max_iters})")
        if not self.time_cap > 0:
            raise ValueError(f"time_cap must be > 0 seconds (got {self.time_cap})")
        if self.restarts < 1:
            raise ValueError(f"restarts must be >= 1 (got {self.restarts})")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0 (got {self.lr})")
        if self.refine_rounds < 0 or self.refine_candidates < 1:
            raise ValueError(
                f"refine_rounds must be >= 0 and refine_candidates >= 1 (got "
                f"{self.refine_rounds}, {self.refine_candidates})"
            )
        if not 0.0 <= self.refine_share < 1.0:
            raise ValueError(f"refine_share must lie in [0, 1) (got {self.refine_share})")


@dataclass
class MatchTarget:
    """What the attacker matches: the observed LoRA update of every adapted layer, and masks.

    Attributes:
        grad_a: layer -> observed ``grad A`` (r, n), float32 (unknown entries zero).
        grad_b: layer -> observed ``grad B`` (m, r).
        mask_a: layer -> bool (r, n): entries of ``grad A`` the distance reads.
        mask_b: layer -> bool (m, r): entries of ``grad B`` the distance reads.
        lora_a: layer -> the broadcast ``A`` as the attacker knows it (unknown entries zero).
        lora_b: layer -> the broadcast ``B``.
        scaling: LoRA scaling ``alpha / r``.
        masking: ``"adaptive"`` or ``"oblivious"``.
    """

    grad_a: dict[int, torch.Tensor]
    grad_b: dict[int, torch.Tensor]
    mask_a: dict[int, torch.Tensor]
    mask_b: dict[int, torch.Tensor]
    lora_a: dict[int, torch.Tensor]
    lora_b: dict[int, torch.Tensor]
    scaling: float
    masking: str = "adaptive"

    @classmethod
    def from_update(cls, update: ObservedUpdate, *, masking: str = "adaptive") -> MatchTarget:
        """The target of an :class:`ObservedUpdate` in LoRA form (zeros where hidden).

        ``"adaptive"`` masks the hidden columns (``LayerUpdate.hidden``) of ``grad A`` out of the
        distance, and the whole ``grad B`` of a layer whose broadcast ``A`` has unknown columns
        (``LayerUpdate.a_hidden``): ``grad B = s G X A^T`` mixes them into every entry, and with
        them zero in the dummy model even the true batch would not match it (on SmolLM2 at
        r = 128, budget 4, a later round: distance 0.55 of the true sentence with ``grad B``,
        2e-5 without). ``"oblivious"`` matches every entry.
        """
        _check_choice(masking, MASKINGS, "masking")
        if update.mode != "lora":
            raise ValueError("the optimisation attack matches LoRA updates (grad A, grad B)")

        def t(a: np.ndarray) -> torch.Tensor:
            return torch.as_tensor(np.asarray(a), dtype=torch.float32).clone()

        out = cls({}, {}, {}, {}, {}, {}, scaling=0.0, masking=masking)
        for i, lu in sorted(update.layers.items()):
            out.grad_a[i], out.grad_b[i] = t(lu.grad_a), t(lu.grad_b)
            out.lora_a[i], out.lora_b[i] = t(lu.lora_a), t(lu.lora_b)
            mask = torch.ones(out.grad_a[i].shape, dtype=torch.bool)
            if masking == "adaptive" and lu.hidden.size:
                mask[:, torch.as_tensor(lu.hidden, dtype=torch.long)] = False
            out.mask_a[i] = mask
            # grad B = s G X A^T reads every column of A: with columns of the broadcast A unknown
            # (zero in the dummy model) even the true batch would not match it
            see_b = not (masking == "adaptive" and lu.a_hidden)
            out.mask_b[i] = torch.full(out.grad_b[i].shape, see_b, dtype=torch.bool)
            out.scaling = float(lu.scaling)
        return out

    @property
    def layers(self) -> list[int]:
        return sorted(self.grad_a)

    def visible_norm(self) -> float:
        """L2 norm of the entries the distance reads."""
        sq = sum(
            float((g[m] ** 2).sum())
            for gs, ms in ((self.grad_a, self.mask_a), (self.grad_b, self.mask_b))
            for g, m in ((gs[i], ms[i]) for i in self.layers)
        )
        return math.sqrt(sq)


@dataclass
class OptimisationResult:
    """What the optimisation attack recovered from one update.

    Attributes:
        sequences: decoded token ids per sentence (BOS and padding excluded).
        tokens: the set of decoded token ids.
        iterations: Adam steps taken.
        refine_evaluations: candidate sequences scored by the refinement.
        seconds: wall-clock seconds of the whole attack.
        stopped: ``"iterations"`` (the cap), ``"time"`` (the time cap) or ``"nothing visible"``.
        distance: matching distance of the decoded sequences (after refinement).
        continuous_distance: matching distance of the best continuous embeddings.
        history: matching distance of the best restart every 10 steps.
    """

    sequences: list[list[int]]
    tokens: np.ndarray
    iterations: int
    refine_evaluations: int
    seconds: float
    stopped: str
    distance: float
    continuous_distance: float
    history: list[float] = field(default_factory=list)


# ---------------------------------------------------------------------------- the dummy model
class _Dummy:
    """The public model with the broadcast LoRA added by hooks; LoRA gradients per group."""

    def __init__(
        self,
        model: Any,
        target: MatchTarget,
        head: Mapping[str, Any] | None,
        pad_id: int | None,
    ) -> None:
        net = unwrap(model)
        self.net = net
        self.backbone = getattr(net, net.base_model_prefix)
        if any(hasattr(q_proj(net, i), "lora_A") for i in target.layers):
            raise ValueError(
                "the attack needs the plain public model (its q_proj without peft LoRA): the "
                "broadcast factors come from the target"
            )
        if head is not None:
            w = torch.as_tensor(np.asarray(head["weight"]), dtype=torch.float32)
            bias = head.get("bias")
            bias = None if bias is None else torch.as_tensor(np.asarray(bias), torch.float32)
        else:
            score = getattr(net, "score", None)
            if score is None:
                raise ValueError(
                    "no classification head given and the model has no 'score' module; pass "
                    "head={'weight': ...}"
                )
            w, bias = score.weight, score.bias
        self.head_bias = None if bias is None else bias.detach().float()
        self.head_w = w.detach().float()
        self.embed = net.get_input_embeddings().weight.detach().float()
        self.pad_id = pad_id if pad_id is not None else getattr(net.config, "pad_token_id", None)
        self.target = target
        self.xs: dict[int, torch.Tensor] = {}
        self.ys: dict[int, torch.Tensor] = {}
        self._hooks: list[Any] = []
        self._saved_attn: str | None = None

    def __enter__(self) -> _Dummy:
        cfg = self.net.config
        self._saved_attn = getattr(cfg, "_attn_implementation", None)
        cfg._attn_implementation = "eager"  # SDPA's CPU kernel has no double backward
        self._saved_grad = [p.requires_grad for p in self.net.parameters()]
        for p in self.net.parameters():
            p.requires_grad_(False)
        s = self.target.scaling
        for i in self.target.layers:
            a, b = self.target.lora_a[i], self.target.lora_b[i]

            def hook(_mod, inp, out, i=i, a=a, b=b):
                x = inp[0]
                y = out + s * (x @ a.T) @ b.T
                self.xs[i], self.ys[i] = x, y
                return y

            self._hooks.append(q_proj(self.net, i).register_forward_hook(hook))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self.net.config._attn_implementation = self._saved_attn
        for p, flag in zip(self.net.parameters(), self._saved_grad, strict=True):
            p.requires_grad_(flag)
        self.xs.clear()
        self.ys.clear()

    def grads(
        self,
        embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        group: int,
        *,
        create_graph: bool,
    ) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        """LoRA gradients of every layer for each group of ``group`` sentences.

        ``embeds`` (N, L, n) with N a multiple of ``group``; every group's loss is the mean
        cross-entropy of its sentences (the client's loss). Returns ``(grad_a, grad_b)``, layer ->
        (N / group, r, n) and (N / group, m, r).
        """
        n_seq, length = embeds.shape[:2]
        if not embeds.requires_grad:  # scoring fixed tokens: G still needs a graph to x
            embeds = embeds.detach().clone().requires_grad_(True)
        hidden = self.backbone(inputs_embeds=embeds, attention_mask=attention_mask)
        hidden = hidden.last_hidden_state
        last = attention_mask.sum(1) - 1
        pooled = hidden[torch.arange(n_seq), last]
        logits = pooled @ self.head_w.T
        if self.head_bias is not None:
            logits = logits + self.head_bias
        loss = torch.nn.functional.cross_entropy(logits, labels, reduction="sum") / group
        layers = self.target.layers
        gs = torch.autograd.grad(loss, [self.ys[i] for i in layers], create_graph=create_graph)
        s = self.target.scaling
        ga, gb = {}, {}
        n_groups = n_seq // group
        for i, g in zip(layers, gs, strict=True):
            x = self.xs[i]
            g = g.reshape(n_groups, group * length, -1)
            x = x.reshape(n_groups, group * length, -1)
            ga[i] = s * torch.einsum("gtr,gtn->grn", g @ self.target.lora_b[i], x)
            gb[i] = s * torch.einsum("gtm,gtr->gmr", g, x @ self.target.lora_a[i].T)
        self.xs.clear()
        self.ys.clear()
        return ga, gb


def distance(
    grad_a: Mapping[int, torch.Tensor],
    grad_b: Mapping[int, torch.Tensor],
    target: MatchTarget,
    *,
    l2_weight: float,
    scale: float = 1.0,
) -> torch.Tensor:
    """Matching distance of dummy gradients (a leading group axis) to ``target``, per group.

    Mean over the (layer, factor) pairs with a nonzero visible observation of
    ``1 - cos(dummy, observed)`` on the visible entries, plus ``l2_weight`` times
    ``||dummy - observed||^2 / ||observed||^2`` summed over every visible entry. Both sides are
    multiplied by ``scale`` first (keeps float32 away from tiny numbers). Zero when nothing is
    visible.
    """
    cos_terms, sq_err = [], 0.0
    ref_sq = 0.0
    for dummy, obs, masks in (
        (grad_a, target.grad_a, target.mask_a),
        (grad_b, target.grad_b, target.mask_b),
    ):
        for i in target.layers:
            m = masks[i]
            if not bool(m.any()):
                continue
            d = (dummy[i] * scale)[:, m]  # (G, visible)
            o = (obs[i] * scale)[m]
            o_sq = float((o**2).sum())
            sq_err = sq_err + ((d - o) ** 2).sum(1)
            ref_sq += o_sq
            if o_sq > 0:
                cos = (d @ o) / (d.norm(dim=1) * math.sqrt(o_sq) + 1e-12)
                cos_terms.append(1.0 - cos)
    n_groups = next(iter(grad_a.values())).shape[0]
    if ref_sq == 0.0:
        return torch.zeros(n_groups)
    out = l2_weight * sq_err / ref_sq
    if cos_terms:
        out = out + torch.stack(cos_terms).mean(0)
    return out


def _scale(target: MatchTarget) -> float:
    """One over the RMS of the visible observation (1 when nothing is visible)."""
    count = sum(int(m.sum()) for ms in (target.mask_a, target.mask_b) for m in ms.values())
    norm = target.visible_norm()
    return 1.0 if norm == 0 or count == 0 else math.sqrt(count) / norm


def _check_inputs(attention_mask: torch.Tensor, labels: Sequence[int]) -> tuple[torch.Tensor, int]:
    mask = torch.as_tensor(attention_mask).long()
    if mask.dim() != 2 or mask.shape[0] != len(labels):
        raise ValueError(
            f"attention_mask must be (batch, length) with one label per sentence (got "
            f"{tuple(mask.shape)} and {len(labels)} labels)"
        )
    lengths = mask.sum(1)
    if bool((lengths < 2).any()):
        raise ValueError("every sentence needs BOS and at least one token (attention_mask)")
    if bool((mask[:, :-1] < mask[:, 1:]).any()):
        raise ValueError("attention_mask must be right-padded (ones, then zeros)")
    return mask, int(mask.shape[0])


def _embeds(
    dummy: _Dummy, z: torch.Tensor, free: torch.Tensor, bos_id: int, mask: torch.Tensor
) -> torch.Tensor:
    """Full input embeddings (R * bs, L, n): BOS, the free positions ``z``, padding."""
    pad = dummy.pad_id if dummy.pad_id is not None else bos_id
    fixed = torch.full(mask.shape, int(pad), dtype=torch.long)
    fixed[:, 0] = int(bos_id)
    base = dummy.embed[fixed]  # (bs, L, n)
    r = z.shape[0]
    return torch.where(free[None, ..., None], z, base[None]).reshape(
        r * mask.shape[0], *z.shape[2:]
    )


def _tile(t: torch.Tensor, reps: int) -> torch.Tensor:
    return t.repeat(reps, *([1] * (t.dim() - 1)))


def matching_distance(
    model: Any,
    target: MatchTarget,
    token_ids: torch.Tensor,
    *,
    attention_mask: torch.Tensor,
    labels: Sequence[int],
    head: Mapping[str, Any] | None = None,
    l2_weight: float = OptimisationSettings.l2_weight,
) -> float:
    """The matching distance of a batch of token ids (e.g. the true batch, as a diagnostic)."""
    mask, _ = _check_inputs(attention_mask, labels)
    with _Dummy(model, target, head, None) as dummy:
        emb = dummy.embed[torch.as_tensor(token_ids).long()]
        y = torch.as_tensor(list(labels), dtype=torch.long)
        ga, gb = dummy.grads(emb, mask, y, mask.shape[0], create_graph=False)
        d = distance(ga, gb, target, l2_weight=l2_weight, scale=_scale(target))
    return float(d[0].detach())


def optimisation_attack(
    model: Any,
    target: MatchTarget,
    *,
    attention_mask: torch.Tensor,
    labels: Sequence[int],
    bos_id: int,
    head: Mapping[str, Any] | None = None,
    pad_id: int | None = None,
    settings: OptimisationSettings = OptimisationSettings(),
    exclude: Sequence[int] = (),
) -> OptimisationResult:
    """Reconstruct a batch by matching its LoRA gradient (see the module docstring).

    Args:
        model: the attacker's plain public model (a LLaMA-type ``...ForSequenceClassification``);
            its weights are not changed (hooks and the attention setting are restored).
        target: the observed update and what the attacker knows of it (:class:`MatchTarget`).
        attention_mask: (batch, length), right-padded, BOS at position 0: the sentence lengths.
        labels: one class id per sentence (known to the attacker).
        bos_id: the BOS token every sentence starts with.
        head: the broadcast classification head (``{"weight": (classes, n)}``); default the
            model's own ``score``.
        pad_id: the padding token (default the model config's).
        settings: iteration / time caps and the optimiser's knobs.
        exclude: token ids never decoded (e.g. BOS and padding).

    Returns:
        An :class:`OptimisationResult`.
    """
    t0 = time.perf_counter()
    mask, bs = _check_inputs(attention_mask, labels)
    cfg = settings
    y = torch.as_tensor(list(labels), dtype=torch.long)
    free = mask.bool().clone()
    free[:, 0] = False  # BOS is known
    scale = _scale(target)
    history: list[float] = []
    with _Dummy(model, target, head, pad_id) as dummy:
        emb = dummy.embed
        std = float(emb.std())
        mean_norm = float(emb.norm(dim=1).mean())
        gen = torch.Generator().manual_seed(int(cfg.seed))
        z = torch.randn((cfg.restarts, *mask.shape, emb.shape[1]), generator=gen) * std
        z.requires_grad_(True)
        nothing = target.visible_norm() == 0.0
        opt = torch.optim.Adam([z], lr=cfg.lr * std)
        mask_r, y_r = _tile(mask, cfg.restarts), _tile(y, cfg.restarts)
        phase_cap = cfg.time_cap * (1.0 - cfg.refine_share)
        it = 0
        stopped = "nothing visible" if nothing else "iterations"
        last = torch.full((cfg.restarts,), math.inf)
        while not nothing and it < cfg.max_iters:
            if time.perf_counter() - t0 > phase_cap:
                stopped = "time"
                break
            opt.zero_grad(set_to_none=True)
            ga, gb = dummy.grads(
                _embeds(dummy, z, free, bos_id, mask), mask_r, y_r, bs, create_graph=True
            )
            d = distance(ga, gb, target, l2_weight=cfg.l2_weight, scale=scale)
            norms = z.norm(dim=-1)[:, free]  # (R, free positions)
            prior = ((norms - mean_norm) / mean_norm).pow(2).mean(1)
            (d + cfg.norm_weight * prior).sum().backward()
            for g in opt.param_groups:  # cosine decay to a tenth
                g["lr"] = cfg.lr * std * (0.55 + 0.45 * math.cos(math.pi * it / cfg.max_iters))
            opt.step()
            last = d.detach()
            if it % 10 == 0:
                history.append(float(last.min()))
            it += 1
        best = int(torch.argmin(last)) if torch.isfinite(last).any() else 0
        zb = z.detach()[best]  # (bs, L, n)
        cont = float(last[best]) if torch.isfinite(last[best]) else math.nan
        # decode: nearest vocabulary embedding by cosine, then refinement sweeps
        unit = emb / emb.norm(dim=1, keepdim=True)
        sims = (zb / zb.norm(dim=-1, keepdim=True).clamp_min(1e-12)) @ unit.T  # (bs, L, V)
        banned = sorted({int(bos_id), *(int(v) for v in exclude)})
        if dummy.pad_id is not None:
            banned.append(int(dummy.pad_id))
        sims[..., banned] = -math.inf
        cands = sims.topk(cfg.refine_candidates, dim=-1).indices  # (bs, L, c)
        ids = torch.full(mask.shape, int(dummy.pad_id if dummy.pad_id is not None else bos_id))
        ids[:, 0] = int(bos_id)
        ids[free] = cands[..., 0][free]
        evals = 0

        def score(batch_ids: torch.Tensor) -> torch.Tensor:  # (C, bs, L) -> (C,)
            c = batch_ids.shape[0]
            e = emb[batch_ids.reshape(c * bs, -1)]
            ga, gb = dummy.grads(e, _tile(mask, c), _tile(y, c), bs, create_graph=False)
            return distance(ga, gb, target, l2_weight=cfg.l2_weight, scale=scale).detach()

        current = float(score(ids[None])[0]) if not nothing else 0.0
        positions = [tuple(p) for p in torch.nonzero(free).tolist()]
        for _ in range(cfg.refine_rounds if not nothing else 0):
            if time.perf_counter() - t0 > cfg.time_cap:
                stopped = "time"
                break
            # token moves: the nearest tokens of every position, one position at a time
            for b, p in positions:
                if time.perf_counter() - t0 > cfg.time_cap:
                    stopped = "time"
                    break
                options = [int(v) for v in cands[b, p] if int(v) != int(ids[b, p])]
                if not options:
                    continue
                trial = ids[None].repeat(len(options), 1, 1)
                trial[:, b, p] = torch.as_tensor(options)
                d = score(trial)
                evals += len(options)
                k = int(torch.argmin(d))
                if float(d[k]) < current:
                    current = float(d[k])
                    ids[b, p] = options[k]
            # order moves: swap neighbouring tokens (the continuous phase finds the tokens
            # more easily than their order), all swaps of the batch in one pass
            swaps = [(b, p) for b, p in positions if (b, p + 1) in set(positions)]
            if not swaps or time.perf_counter() - t0 > cfg.time_cap:
                continue
            trial = ids[None].repeat(len(swaps), 1, 1)
            for j, (b, p) in enumerate(swaps):
                trial[j, b, p], trial[j, b, p + 1] = ids[b, p + 1], ids[b, p]
            d = score(trial)
            evals += len(swaps)
            k = int(torch.argmin(d))
            if float(d[k]) < current:
                current = float(d[k])
                ids = trial[k].clone()
    seqs = [ids[b, 1 : int(mask[b].sum())].tolist() for b in range(bs)]
    return OptimisationResult(
        sequences=seqs,
        tokens=np.unique(np.concatenate([np.asarray(s, np.int64) for s in seqs])),
        iterations=it,
        refine_evaluations=evals,
        seconds=time.perf_counter() - t0,
        stopped=stopped,
        distance=current,
        continuous_distance=cont,
        history=history,
    )


def attack_view(
    view: ServerView,
    knowledge: ServerKnowledge,
    public_model: Any,
    *,
    attention_mask: torch.Tensor,
    labels: Sequence[int],
    settings: OptimisationSettings = OptimisationSettings(),
    masking: str = "adaptive",
    exclude: Sequence[int] = (),
) -> tuple[OptimisationResult, MatchTarget] | None:
    """The optimisation attack on what the server decoded of one upload (``None``: no update).

    The target is the update ``(start - after) / lr`` of EVERY adapted layer the plaintext part
    carries (:func:`~shelora_core.attacks.threat.observed_update`, unknown entries zero and
    their columns recorded as hidden); the dummy model uses the broadcast factors and head as
    the server knows them (``knowledge.start``).
    """
    if view.after is None:
        return None
    layers = sorted(layer_index(n) for n in view.after.factors)
    obs = observed_update(view, knowledge, attacker="oblivious", layers=layers)
    if obs is None:
        return None
    target = MatchTarget.from_update(obs, masking=masking)
    res = optimisation_attack(
        public_model,
        target,
        attention_mask=attention_mask,
        labels=labels,
        bos_id=knowledge.bos_id,
        head=knowledge.start.head,
        settings=settings,
        exclude=exclude,
    )
    return res, target
