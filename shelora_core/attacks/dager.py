"""DAGER: exact gradient inversion of a LLaMA-type decoder from what the server sees.

Petrov, Dimitrov, Baader, Mueller and Vechev, "DAGER: Exact Gradient Inversion for Large Language
Models", NeurIPS 2024. Written from the paper for SmolLM2-135M (LLaMA architecture); the attack
reads only an :class:`~shelora_core.attacks.gradients.ObservedUpdate` (what the server received)
and the public pretrained model.

The idea: the gradient of a linear layer ``y_t = W x_t`` is ``grad W = sum_t g_t x_t^T``, so its
rows lie in the span of the layer inputs ``x_t``, and when there are fewer inputs than the width
(n = 576) the span is a proper subspace that almost no other vector falls into.

1. **Token filtering** (layer 1, the first decoder layer). In a LLaMA decoder the input of the
   first layer's ``q_proj`` is ``RMSNorm(e_v)`` (rotary position embedding is applied after the
   projection), so every vocabulary token ``v`` has ONE candidate input. Keep the tokens whose
   input is within ``span_tol`` (relative distance) of the row space of the observed gradient:

   - full fine-tuning: rows of ``grad W`` span ``{x_t}``;
   - LoRA, later rounds (``B != 0``): ``grad A = s B^T grad W`` spans ``{x_t}`` too (rank <= r);
   - LoRA, first round (``B = 0`` so ``grad A = 0``): ``grad B = s grad W A^T``, whose rows lie
     in ``span{A x_t}`` (in R^r): test ``A x_v``. Only informative while the number of distinct
     tokens is below r.

2. **Sequence reconstruction** (layer 2). A causal decoder's hidden state at position i depends
   only on tokens <= i, so sentences are grown token by token from BOS: every live prefix is
   extended by every filtered token, the extension's input to the second layer's ``q_proj`` is
   computed exactly from the public weights, and extensions within ``span_tol`` of the second
   layer's gradient span survive (greedy search with a beam of ``beam_width``).

**Hidden columns** (SHE-LoRA): the server does not see ``grad A[:, J]`` and does not know
``A[:, J]`` for the input features ``J``. Two attackers:

- ``"oblivious"``: runs DAGER as written on what it sees (zeros where columns are hidden);
- ``"adaptive"``: knows ``J`` (the negotiated column list is public to the server). For
  ``grad W`` / ``grad A`` it checks only the visible coordinates: rows of ``grad[:, V]`` span
  ``{x_t[V]}``, exactly. For ``grad B`` the unknown block ``A[:, J]`` adds ``A[:, J] x_J`` to every
  tested vector; with ``Q`` an orthonormal basis of the complement of the observed span, true
  tokens satisfy ``Q^T A_vis x_vis + N x_J = 0`` with the unknown ``N = Q^T A[:, J]``
  ((r - d) x k): a linear regression shared by the true tokens, fitted by trimmed least squares
  (concentration steps) over the vocabulary. In the second layer the candidates are prefixes, not
  a vocabulary, so ``N`` is learned during the search: a Gaussian posterior (prior: the scale of
  the visible entries of ``A``) fitted on the positions accepted so far widens the tolerance
  while ``N`` is uncertain and tightens it to the exact check once ``> k`` true positions pin it
  down; then a few EM passes (refit on the reconstruction, search again). This needs more true
  positions than hidden columns early in the search, so it fails more often with large k and
  one short sentence.

In this package the round-1 ``A`` is a public function of the configuration seed
(``LoraModel.init_weights``), so at round 1 the server knows ``A[:, J]`` anyway
(``hide_columns(..., hide_a=False)``); hiding it is the pessimistic case for the attacker.

``selection="rank"`` replaces the fixed threshold by "take the rank-many closest tokens" (rank of
the observed gradient), the variant that survives an oblivious view of hidden columns.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .gradients import (
    LayerUpdate,
    ObservedUpdate,
    _active_adapter,
    add_dp_noise,
    capture_update,
    encode_batch,
    hide_columns,
    multistep_update,
    q_proj,
    unwrap,
)

__all__ = [
    "ATTACKERS",
    "SELECTIONS",
    "UPDATES",
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
    "run_attack",
    "score_reconstruction",
    "sensitive_columns",
    "span_distances",
    "token_set_scores",
]

#: Attackers: DAGER as written on what the server sees, or aware of the hidden columns.
ATTACKERS: tuple[str, ...] = ("oblivious", "adaptive")
#: Token / extension selection: fixed distance threshold, or the rank-many closest.
SELECTIONS: tuple[str, ...] = ("threshold", "rank")
#: Which client update is attacked (see :func:`run_attack`).
UPDATES: tuple[str, ...] = ("fedsgd_round1", "fedsgd_later", "multistep")
#: Which observed gradient the span check uses.
ROUTES: tuple[str, ...] = ("auto", "grad_w", "grad_a", "grad_b")

_DT = torch.float64


def _check_choice(value: str, choices: Sequence[str], what: str) -> str:
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}; choose one of {list(choices)}")
    return value


# ---------------------------------------------------------------------------- public weights
@dataclass
class DecoderView:
    """The public weights DAGER needs, in float64: embeddings, layer 0, layer 1's input norm.

    ``wq`` is the effective query weight of layer 0 *as the attacker knows it*: ``W0 + s B A``
    with the factors from the observed update (hidden columns of ``A`` zeroed).

    Attributes:
        embed: token embeddings (V, n).
        norm0: RMSNorm weight of layer 0's input (n,).
        post0: RMSNorm weight before layer 0's MLP (n,).
        norm1: RMSNorm weight of layer 1's input (n,).
        eps: RMSNorm epsilon.
        wq, wk, wv, wo: attention projections of layer 0.
        gate, up, down: MLP projections of layer 0.
        n_heads, n_kv, head_dim: attention geometry (grouped-query attention).
        inv_freq: rotary inverse frequencies (head_dim / 2,).
    """

    embed: torch.Tensor
    norm0: torch.Tensor
    post0: torch.Tensor
    norm1: torch.Tensor
    eps: float
    wq: torch.Tensor
    wk: torch.Tensor
    wv: torch.Tensor
    wo: torch.Tensor
    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor
    n_heads: int
    n_kv: int
    head_dim: int
    inv_freq: torch.Tensor

    @classmethod
    def from_model(cls, model: Any, update: ObservedUpdate | None = None) -> DecoderView:
        """Read the public weights of a LLaMA-type decoder (plain, peft-wrapped or ``LoraModel``).

        Args:
            model: the attacker's copy of the public model.
            update: the observed update; for LoRA its layer-0 factors form the query weight.

        Raises:
            ValueError: on an architecture other than a LLaMA-type decoder with default RoPE.
        """
        net = unwrap(model)
        layers = _decoder_layers(net)
        cfg = _config(net)
        rope = getattr(cfg, "rope_parameters", None) or {}
        theta = rope.get("rope_theta", getattr(cfg, "rope_theta", None))
        if rope.get("rope_type", "default") != "default" or theta is None:
            raise ValueError(f"only default rotary embeddings are supported (got {rope})")
        l0 = layers[0]

        def w(mod: torch.nn.Module) -> torch.Tensor:
            base = getattr(mod, "base_layer", mod)
            return base.weight.detach().to(_DT).clone()

        wq = w(q_proj(net, 0))
        if update is not None and 0 in update.layers and update.layers[0].mode == "lora":
            lu = update.layers[0]
            wq = wq + lu.scaling * torch.from_numpy(lu.lora_b) @ torch.from_numpy(lu.lora_a)
        head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
        inv_freq = 1.0 / (float(theta) ** (torch.arange(0, head_dim, 2, dtype=_DT) / head_dim))
        embed = net.get_input_embeddings().weight.detach().to(_DT)
        return cls(
            embed=embed,
            norm0=l0.input_layernorm.weight.detach().to(_DT),
            post0=l0.post_attention_layernorm.weight.detach().to(_DT),
            norm1=layers[1].input_layernorm.weight.detach().to(_DT),
            eps=float(cfg.rms_norm_eps),
            wq=wq,
            wk=w(l0.self_attn.k_proj),
            wv=w(l0.self_attn.v_proj),
            wo=w(l0.self_attn.o_proj),
            gate=w(l0.mlp.gate_proj),
            up=w(l0.mlp.up_proj),
            down=w(l0.mlp.down_proj),
            n_heads=int(cfg.num_attention_heads),
            n_kv=int(cfg.num_key_value_heads),
            head_dim=head_dim,
            inv_freq=inv_freq,
        )

    @property
    def vocab_size(self) -> int:
        return int(self.embed.shape[0])

    def _rms(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * weight

    def first_layer_inputs(self, token_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Input of layer 0's ``q_proj`` for every token (or ``token_ids``): ``RMSNorm(e_v)``."""
        e = self.embed if token_ids is None else self.embed[token_ids]
        return self._rms(e, self.norm0)

    def _rope(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        # x (..., L, heads, hd); pos (L,)
        freqs = pos.to(_DT)[:, None] * self.inv_freq[None]
        emb = torch.cat([freqs, freqs], -1)
        cos, sin = emb.cos()[:, None, :], emb.sin()[:, None, :]
        half = self.head_dim // 2
        rot = torch.cat([-x[..., half:], x[..., :half]], -1)
        return x * cos + rot * sin

    def _heads(self, x: torch.Tensor, w: torch.Tensor, heads: int) -> torch.Tensor:
        return (x @ w.T).unflatten(-1, (heads, self.head_dim))

    def second_layer_inputs(self, prefixes: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Input of layer 1's ``q_proj`` at the position after each prefix, for each next token.

        Args:
            prefixes: token ids (P, i), all of the same length i >= 1.
            tokens: candidate next tokens (C,).

        Returns:
            (P, C, n) float64: ``RMSNorm_1(h)`` with ``h`` layer 0's output at position i of
            ``prefix + [token]``.
        """
        p, i = prefixes.shape
        rep = self.n_heads // self.n_kv
        xp = self._rms(self.embed[prefixes], self.norm0)  # (P, i, n)
        pos_p = torch.arange(i)
        kp = self._rope(self._heads(xp, self.wk, self.n_kv), pos_p)  # (P, i, kv, hd)
        vp = self._heads(xp, self.wv, self.n_kv)
        hc = self.embed[tokens]  # (C, n)
        xc = self._rms(hc, self.norm0)
        pos_c = torch.tensor([i])
        qc = self._rope(self._heads(xc, self.wq, self.n_heads)[:, None], pos_c)[:, 0]  # (C, H, hd)
        kc = self._rope(self._heads(xc, self.wk, self.n_kv)[:, None], pos_c)[:, 0]  # (C, kv, hd)
        vc = self._heads(xc, self.wv, self.n_kv)
        kp, vp = kp.repeat_interleave(rep, dim=2), vp.repeat_interleave(rep, dim=2)  # (P, i, H, hd)
        kc, vc = kc.repeat_interleave(rep, dim=1), vc.repeat_interleave(rep, dim=1)  # (C, H, hd)
        scale = 1.0 / math.sqrt(self.head_dim)
        s_prev = torch.einsum("chd,pjhd->pchj", qc, kp) * scale  # (P, C, H, i)
        s_self = (qc * kc).sum(-1)[None, :, :, None].expand(p, -1, -1, 1) * scale
        att = torch.softmax(torch.cat([s_prev, s_self], -1), -1)
        out = torch.einsum("pchj,pjhd->pchd", att[..., :i], vp) + att[..., i:] * vc[None]
        h = hc[None] + out.flatten(-2) @ self.wo.T  # (P, C, n)
        m = self._rms(h, self.post0)
        h = h + (torch.nn.functional.silu(m @ self.gate.T) * (m @ self.up.T)) @ self.down.T
        return self._rms(h, self.norm1)

    def sequence_inputs(self, ids: Sequence[int]) -> torch.Tensor:
        """Layer-1 ``q_proj`` inputs of every position >= 1 of one sequence, (L - 1, n)."""
        ids = torch.as_tensor(list(ids), dtype=torch.long)
        rows = [
            self.second_layer_inputs(ids[None, :i], ids[i : i + 1])[0, 0]
            for i in range(1, len(ids))
        ]
        return torch.stack(rows) if rows else torch.zeros(0, self.embed.shape[1], dtype=_DT)


def _config(net: torch.nn.Module) -> Any:
    cfg = getattr(net, "config", None)
    if cfg is None and hasattr(net, "get_base_model"):
        cfg = net.get_base_model().config
    return cfg


def _decoder_layers(net: torch.nn.Module) -> Sequence[torch.nn.Module]:
    for name, module in net.named_modules():
        if name.endswith("layers") and isinstance(module, torch.nn.ModuleList):
            if hasattr(module[0], "self_attn") and hasattr(module[0], "input_layernorm"):
                return module
    raise ValueError("no LLaMA-type decoder layers found (need self_attn and input_layernorm)")


# ---------------------------------------------------------------------------- spans
@dataclass
class RowSpan:
    """An orthonormal basis of the row space of an observed gradient.

    Attributes:
        basis: (p, d) orthonormal columns, p = number of tested coordinates.
        singular_values: all singular values of the gradient, descending.
        rank: d, the number of singular values above ``rank_tol`` times the largest.
    """

    basis: torch.Tensor
    singular_values: torch.Tensor
    rank: int

    def complement(self) -> torch.Tensor:
        """An orthonormal basis (p, p - d) of the orthogonal complement of the span."""
        p, d = self.basis.shape
        if d == 0:
            return torch.eye(p, dtype=_DT)
        q, _ = torch.linalg.qr(self.basis, mode="complete")
        return q[:, d:]


def row_span(
    grad: np.ndarray | torch.Tensor, *, rank_tol: float = 1e-5, max_rank: int | None = None
) -> RowSpan:
    """Row space of ``grad`` through an SVD in float64.

    Args:
        grad: (rows, p) gradient.
        rank_tol: singular values below ``rank_tol * s_max`` count as zero.
        max_rank: keep at most this many directions.

    Returns:
        The :class:`RowSpan` (rank 0 for an all-zero gradient).
    """
    if not rank_tol > 0:
        raise ValueError(f"rank_tol must be > 0 (got {rank_tol})")
    g = torch.as_tensor(np.asarray(grad) if not torch.is_tensor(grad) else grad).to(_DT)
    if g.ndim != 2:
        raise ValueError(f"grad must be a matrix, got shape {tuple(g.shape)}")
    _, s, vh = torch.linalg.svd(g, full_matrices=False)
    top = float(s[0]) if s.numel() else 0.0
    d = int((s > rank_tol * top).sum()) if top > 0 else 0
    if max_rank is not None:
        d = min(d, max_rank)
    return RowSpan(basis=vh[:d].T.contiguous(), singular_values=s, rank=d)


def span_distances(z: torch.Tensor, span: RowSpan, *, chunk: int = 8192) -> torch.Tensor:
    """Relative distance ``||z - P z|| / ||z||`` of every row of ``z`` to the span (float64)."""
    z = z.to(_DT)
    out = torch.empty(z.shape[0], dtype=_DT)
    for lo in range(0, z.shape[0], chunk):
        block = z[lo : lo + chunk]
        res = block - (block @ span.basis) @ span.basis.T
        out[lo : lo + chunk] = res.norm(dim=1) / block.norm(dim=1).clamp_min(1e-300)
    return out


class SpanCheck:
    """The span check of one observed layer, as a given attacker runs it.

    Args:
        update: the layer's observed update.
        attacker: ``"oblivious"`` or ``"adaptive"`` (see the module docstring).
        route: ``"grad_w"``, ``"grad_a"``, ``"grad_b"`` or ``"auto"`` (full: ``grad_w``; LoRA:
            ``grad_a`` when it is non-zero, else ``grad_b``).
        rank_tol: relative singular-value threshold of :func:`row_span`.

    Attributes:
        route: the route in use.
        span: the observed row span.
        hidden: hidden input columns the check accounts for (adaptive attacker only).
        offset: adaptive ``grad_b`` route: the fitted ``N = Q^T A[:, J]`` ((r - d) x k) or ``None``.
    """

    def __init__(
        self,
        update: LayerUpdate,
        *,
        attacker: str = "oblivious",
        route: str = "auto",
        rank_tol: float = 1e-5,
    ) -> None:
        _check_choice(attacker, ATTACKERS, "attacker")
        _check_choice(route, ROUTES, "route")
        if route == "auto":
            route = _auto_route(update)
        if route == "grad_w" and update.mode != "full":
            raise ValueError("route 'grad_w' needs a full fine-tuning update (grad_w is missing)")
        if route in ("grad_a", "grad_b") and update.mode != "lora":
            raise ValueError(f"route {route!r} needs a LoRA update; this one is full fine-tuning")
        self.update = update
        self.attacker = attacker
        self.route = route
        self.rank_tol = rank_tol
        n = update.width
        hidden = update.hidden if attacker == "adaptive" else np.zeros(0, np.int64)
        if route == "grad_b" and not update.a_hidden:
            hidden = np.zeros(0, np.int64)  # grad B is fully visible; with A known, nothing hides
        self.hidden = hidden
        self.visible = np.setdiff1d(np.arange(n), self.hidden)
        self.offset: torch.Tensor | None = None
        self._cov: torch.Tensor | None = None
        self._tol = 1e-3
        self.kappa = 3.0  # predictive interval width (in standard deviations) of the online check
        if route == "grad_b":
            self.a = torch.from_numpy(np.asarray(update.lora_a, np.float64))
            self.span = row_span(update.grad_b, rank_tol=rank_tol)
            self._q = self.span.complement() if self.hidden.size else None
        else:
            grad = update.grad_w if route == "grad_w" else update.grad_a
            self.span = row_span(np.asarray(grad)[:, self.visible], rank_tol=rank_tol)

    @property
    def rank(self) -> int:
        """Rank of the observed gradient (the number of distinct inputs it reveals)."""
        return self.span.rank

    @property
    def dimension(self) -> int:
        """Dimension of the space the check tests in (r for ``grad_b``, visible width else)."""
        return int(self.span.basis.shape[0])

    @property
    def vacuous(self) -> bool:
        """True when the observed span fills the tested space: every input passes the check."""
        return self.rank >= self.dimension

    def distances(self, x: torch.Tensor) -> torch.Tensor:
        """Relative distance of layer inputs ``x`` (N, n) to the observed span, (N,) float64."""
        x = x.to(_DT)
        if self.route != "grad_b":
            return span_distances(x[:, self.visible], self.span)
        y = x @ self.a.T  # A (hidden columns as the attacker knows them) times x
        if not self.hidden.size:
            return span_distances(y, self.span)
        c = y @ self._q  # (N, r - d): must equal -N x_J for the true inputs
        if self.offset is not None:
            c = c + x[:, self.hidden] @ self.offset.T
        ynorm = y.norm(dim=1).clamp_min(1e-300)
        rho = c.norm(dim=1) / ynorm
        if self._cov is None:
            return rho
        # posterior predictive: inflate the tolerance by the uncertainty left in N
        zt = x[:, self.hidden] / ynorm[:, None]
        spread = ((zt @ self._cov) * zt).sum(1) * c.shape[1]
        tol = self._tol
        return rho / torch.sqrt(1.0 + (self.kappa**2) * spread / tol**2)

    @property
    def online(self) -> bool:
        """Adaptive ``grad_b`` check with hidden columns: ``N`` must be learned from the inputs."""
        return self.route == "grad_b" and self.hidden.size > 0

    def fit_posterior(self, x: torch.Tensor, *, span_tol: float) -> None:
        """Adaptive ``grad_b`` route: Bayesian estimate of ``N`` from inputs believed true.

        Prior: the entries of ``N = Q^T A[:, J]`` are i.i.d. N(0, sigma^2), with sigma^2 the
        mean square of the visible entries of ``A`` (at round 1, ``A``'s public init
        distribution). Observations: ``Q^T A_vis x_vis = -N x_J`` up to noise of size
        ``span_tol`` (relative). The posterior mean becomes :attr:`offset`, and
        :meth:`distances` then divides by the predictive spread, so an input whose hidden
        features are not yet pinned down by the data is judged leniently and the check becomes
        the exact one once they are. ``x`` may be empty (prior only).
        """
        if not self.online:
            return
        vis = self.a[:, self.visible]
        sigma2 = float(vis.pow(2).mean()) if vis.numel() else 1.0
        dof = max(1, self._q.shape[1])
        tau2 = span_tol**2 / dof
        k = self.hidden.size
        x = x.to(_DT)
        prec = torch.eye(k, dtype=_DT) / sigma2
        rhs = torch.zeros(self._q.shape[1], k, dtype=_DT)
        if x.shape[0]:
            y = x @ self.a.T
            w = 1.0 / y.norm(dim=1).clamp_min(1e-300)
            z = x[:, self.hidden] * w[:, None]
            c = (y @ self._q) * w[:, None]
            prec = prec + z.T @ z / tau2
            rhs = -(c.T @ z) / tau2
        cov = torch.linalg.inv(prec)
        self.offset = rhs @ cov
        self._cov = cov
        self._tol = span_tol

    def clear_posterior(self) -> None:
        """Back to the plain check with the current point estimate of ``N``."""
        self._cov = None

    def fit_offset(
        self,
        x: torch.Tensor,
        *,
        inliers: int,
        iterations: int = 30,
        ridge: float = 1e-9,
        exact_tol: float = 1e-4,
    ) -> None:
        """Adaptive ``grad_b`` route: fit ``N = Q^T A[:, J]`` by trimmed least squares.

        Concentration steps (Rousseeuw and Van Driessen's FAST-LTS "C-steps"): take the
        ``inliers`` inputs with the smallest residual, refit ``N`` by least squares on them,
        repeat until the inlier set stops changing. Starts: ``N = 0`` (the oblivious view) and
        least squares over the h/4, h/2, 2h and 4h closest (h = ``inliers``). The steps run on a
        pool of candidates (the closest under ``N = 0``, grown by the closest under every fit,
        since true inputs can lie far out while ``N`` is unknown); the last ones on all of ``x``.
        The true ``N`` fits the true inputs exactly, so a fit whose inliers are not all within
        ``exact_tol`` still holds an impostor: then every refit leaving out one (or, for up to
        40 inliers, two) of its inliers is tried as a start.

        Args:
            x: candidate layer inputs (N, n) (the whole vocabulary in layer 1).
            inliers: how many inputs are true (the rank of the observed gradient); must exceed
                the number of hidden columns k for the fit to mean anything.
            iterations: maximum concentration steps per start.
            ridge: Tikhonov term relative to the trace of ``Z^T Z``.
            exact_tol: residual (relative) below which an inlier counts as exactly fitted.
        """
        if not self.online:
            return
        x = x.to(_DT)
        y = x @ self.a.T
        w_all = 1.0 / y.norm(dim=1).clamp_min(1e-300)
        c_all = (y @ self._q) * w_all[:, None]
        z_all = x[:, self.hidden] * w_all[:, None]
        h = max(1, min(int(inliers), x.shape[0]))
        k = z_all.shape[1]
        eye = torch.eye(k, dtype=_DT)

        def solve(c: torch.Tensor, z: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
            zz, cc = z[idx], c[idx]
            gram = zz.T @ zz
            gram = gram + ridge * max(float(gram.trace()), 1e-300) * eye
            return -torch.linalg.solve(gram, zz.T @ cc).T  # (r - d, k)

        def residual(c: torch.Tensor, z: torch.Tensor, n_: torch.Tensor) -> torch.Tensor:
            return (c + z @ n_.T).norm(dim=1)

        def csteps(c: torch.Tensor, z: torch.Tensor, n_: torch.Tensor):
            prev = None
            for _ in range(iterations):
                idx = torch.sort(torch.argsort(residual(c, z, n_))[:h]).values
                if prev is not None and torch.equal(idx, prev):
                    break
                prev = idx
                n_ = solve(c, z, idx)
            res = torch.sort(residual(c, z, n_)).values[:h]
            return n_, float(res.pow(2).sum()), float(res.max())

        zero = torch.zeros(c_all.shape[1], k, dtype=_DT)
        base = residual(c_all, z_all, zero)
        pool = torch.argsort(base)[: min(x.shape[0], max(4 * h, h + 200))]
        sizes = sorted({max(k + 1, int(f * h)) for f in (0.25, 0.5, 2, 4)})
        c, z = c_all[pool], z_all[pool]
        starts = [zero] + [solve(c, z, torch.arange(min(m, len(pool)))) for m in sizes]
        for _ in range(3):  # true inputs may lie outside the pool: widen it with each fit's best
            c, z = c_all[pool], z_all[pool]
            fits = [csteps(c, z, n_) for n_ in starts]
            grown = set(pool.tolist())
            for n_, _, _ in fits:
                grown |= set(torch.argsort(residual(c_all, z_all, n_))[: 2 * h].tolist())
            if len(grown) == len(pool):
                break
            pool = torch.tensor(sorted(grown))
            starts = [f[0] for f in fits]
        best = min(fits, key=lambda t: t[1])
        if best[2] > exact_tol and h > k + 1:
            best = self._drop_search(c, z, best, h, k, solve, residual, csteps, exact_tol)
        self.offset = csteps(c_all, z_all, best[0])[0]

    @staticmethod
    def _drop_search(c, z, best, h, k, solve, residual, csteps, exact_tol):
        """Refit without one (or, for up to 40 inliers, two) of the best fit's inliers."""
        inl = torch.argsort(residual(c, z, best[0]))[:h]
        drops = [[i] for i in range(h)]
        if h <= 40:
            drops += [[i, j] for i in range(h) for j in range(i + 1, h)]
        for drop in drops:
            keep = torch.ones(h, dtype=torch.bool)
            keep[drop] = False
            if int(keep.sum()) <= k:
                continue
            trial = csteps(c, z, solve(c, z, inl[keep]))
            if trial[1] < best[1]:
                best = trial
            if best[2] <= exact_tol:
                break
        return best


def _auto_route(update: LayerUpdate) -> str:
    """``grad_w`` for full fine-tuning; for LoRA ``grad_b`` when the broadcast ``B`` is zero
    (round 1: ``grad A = s B^T grad W`` carries nothing but noise), else ``grad_a``."""
    if update.mode == "full":
        return "grad_w"
    if update.lora_b is None or not np.any(update.lora_b):
        return "grad_b"
    return "grad_a"


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


# ---------------------------------------------------------------------------- metrics
def token_set_scores(predicted: Sequence[int], true: Sequence[int]) -> tuple[float, float]:
    """Precision and recall of a recovered token set against the true one.

    Returns:
        ``(precision, recall)``; precision is 0 for an empty prediction, recall is 1 for an empty
        truth.
    """
    p, t = {int(v) for v in predicted}, {int(v) for v in true}
    precision = len(p & t) / len(p) if p else 0.0
    recall = len(p & t) / len(t) if t else 1.0
    return precision, recall


def match_sentences(predictions: Sequence[str], references: Sequence[str]) -> list[str]:
    """Pair reconstructions with references (optimal assignment on ROUGE-1 F), one per reference.

    A batch's sentences come back in no particular order; DAGER's evaluation matches them to the
    references before scoring. Missing reconstructions become empty strings.
    """
    from rouge_score import rouge_scorer
    from scipy.optimize import linear_sum_assignment

    refs = list(references)
    preds = list(predictions)
    out = [""] * len(refs)
    if not preds or not refs:
        return out
    scorer = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=False)
    gain = np.array([[scorer.score(r, p)["rouge1"].fmeasure for p in preds] for r in refs])
    rows, cols = linear_sum_assignment(-gain)
    for r, c in zip(rows, cols, strict=True):
        out[r] = preds[c]
    return out


def score_reconstruction(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """ROUGE-1/2/L of matched reconstructions (:func:`match_sentences`) via ``rouge_scores``."""
    from ..metrics import rouge_scores

    return rouge_scores(match_sentences(predictions, references), list(references))


# ---------------------------------------------------------------------------- column choice
def sensitive_columns(
    model: Any, batch: Mapping[str, torch.Tensor], k: int, *, layers: Sequence[int] = (0, 1)
) -> dict[int, np.ndarray]:
    """The ``k`` input columns of ``q_proj`` SHE-LoRA would encrypt, per layer.

    Scores columns like :func:`shelora_core.sensitivity.column_scores` (``sum_k |A_kj| *
    ||X_j||``, activation norms over the client's own batch); without LoRA the activation norms
    alone (the ``A`` factor is then constant).
    """
    from ..sensitivity import column_scores, propose

    net = unwrap(model)
    norms: dict[int, torch.Tensor] = {}
    mask = batch["attention_mask"].bool()

    def hook(idx: int):
        def fn(_mod, args, _out):
            x = args[0].detach()[mask].double()
            norms[idx] = x.pow(2).sum(0).sqrt()

        return fn

    handles = [q_proj(net, i).register_forward_hook(hook(i)) for i in layers]
    try:
        with torch.no_grad():
            net(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    finally:
        for h in handles:
            h.remove()
    out = {}
    for i in layers:
        mod = q_proj(net, i)
        name = _active_adapter(mod)
        if name is not None:
            a = mod.lora_A[name].weight.detach().double().numpy()
        else:
            a = np.ones((1, norms[i].shape[0]))
        out[i] = propose(column_scores(a, norms[i].numpy()), k)
    return out


# ---------------------------------------------------------------------------- driver
@functools.lru_cache(maxsize=2)
def _victim(model_name: str, lora_rank: int | None, alpha: float):
    """A classifier (full fine-tuning) or ``LoraModel`` (q_proj adapters) for the attacked client.

    Cached (two entries): building one costs a model load; every run sets the adapter explicitly.
    """
    from ..assets import load_classifier, load_tokenizer
    from ..lora import LoraModel

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

    victim, tok = _victim(model_name, lora_rank, float(lora_alpha))
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
