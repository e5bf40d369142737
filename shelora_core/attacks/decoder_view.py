"""The public weights DAGER reads, and the exact layer inputs computed from them.

:class:`DecoderView` holds the embeddings and the first decoder layer of a LLaMA-type model
(SmolLM2-135M here) in float64 and recomputes the inputs of the first two layers' ``q_proj``: the
candidate vectors of DAGER's span checks (Petrov et al., "DAGER: Exact Gradient Inversion for
Large Language Models", NeurIPS 2024). In a LLaMA decoder the first layer's ``q_proj`` input is
``RMSNorm(e_v)`` (rotary embedding is applied after the projection), so every vocabulary token has
one candidate; the second layer's input at position i depends only on tokens <= i (causal
attention), so it is computed exactly for every prefix and next token.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .gradients import ObservedUpdate, q_proj, unwrap

__all__ = ["DecoderView"]

_DT = torch.float64


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
