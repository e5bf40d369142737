"""What the ``shelora+first-layers`` defence costs, and what it leaves open (ours).

The defence itself is a registered method (:class:`shelora_core.methods.FirstLayersSHELoRA`):
SHE-LoRA plus the LoRA update of the first two layers (the ones DAGER reads) sent only as
ciphertexts. This module measures its upload cost through the round engine
(:func:`protection_cost`) and probes the attack it does not rule out: DAGER's sentence search
at a deeper plaintext layer (:func:`deep_layer_probe`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ..config import FederatedConfig
from ..messages import decode
from ..methods.first_layers import ENCRYPT_MODES
from .gradients import LayerUpdate

__all__ = ["ENCRYPT_MODES", "deep_layer_probe", "protection_cost"]


def protection_cost(
    *,
    ranks: Sequence[int] = (8, 16, 32),
    budgets: Sequence[int] = (2, 4, 8),
    layers: int = 30,
    width: int = 576,
    protected: Sequence[int] = (0, 1),
    methods: Sequence[str] = ("flexlora", "shelora", "shelora+first-layers", "full_he"),
    encrypt_modes: Sequence[str] = ENCRYPT_MODES,
    seed: int = 0,
    keys: Mapping[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Measured upload bytes and client encryption seconds per client-round, SmolLM2 ``q_proj``.

    One client per (rank, budget) pair (``ranks[i]`` with ``budgets[i]``), synthetic LoRA-like
    factors of SmolLM2's exact shapes (``layers`` x (width x width)); bytes are ``len()`` of the
    serialized upload message (real CKKS ciphertexts), seconds wall-clock for the round engine's
    upload step (encryption plus serialization). Rows are per client.

    Args:
        ranks, budgets: the clients' LoRA ranks and SHE-LoRA budgets (paired).
        layers, width: the model's adapted layers (SmolLM2-135M: 30 ``q_proj`` of 576 x 576).
        protected: layers the variant encrypts fully.
        methods: any of ``flexlora``, ``shelora``, ``shelora+first-layers``, ``full_he``.
        encrypt_modes: variants of ``shelora+first-layers`` to measure.
        seed: seeds the synthetic factors.
        keys: ``{"add_only": KeyHolder, "fedshield": KeyHolder}`` to reuse.

    Returns:
        One dict per (method, mode, client): ``method``, ``rank``, ``budget``, ``upload_bytes``,
        ``ciphertexts``, ``encrypted_values``, ``encrypt_seconds``.
    """
    from ..ckks import KeyHolder
    from ..client import upload
    from ..he_cost import synthetic_adapter

    if len(ranks) != len(budgets):
        raise ValueError(f"pair every rank with a budget (got {len(ranks)} and {len(budgets)})")
    keys = dict(keys or {})
    for p in ("add_only", "fedshield"):
        keys.setdefault(p, KeyHolder.generate(p))
    shapes = {f"model.layers.{i}.self_attn.q_proj": (width, width) for i in range(layers)}
    rng = np.random.default_rng(seed)
    order = list(np.random.default_rng([seed, 7]).permutation(width)[: max(budgets)])
    columns = {k: [int(c) for c in order] for k in shapes}
    rows: list[dict[str, Any]] = []
    for r, k in zip(ranks, budgets, strict=True):
        w = synthetic_adapter(shapes, r, rng, head={"weight": np.zeros((2, width), np.float32)})
        cfg = FederatedConfig(
            method="shelora", model="smollm2", num_clients=1, ranks=(r,), he_budgets=(k,)
        )
        variants: list[tuple[str, FederatedConfig, str | None, str | None]] = []
        for m_name in methods:
            if m_name == "shelora+first-layers":
                variants += [
                    (
                        m_name,
                        cfg.replace(method=m_name, first_layers=protected, first_layers_encrypt=e),
                        "add_only",
                        e,
                    )
                    for e in encrypt_modes
                ]
            elif m_name in ("shelora", "flexlora", "full_he", "fedshield"):
                params = {"shelora": "add_only", "flexlora": None}.get(m_name, "fedshield")
                variants.append((m_name, cfg.replace(method=m_name), params, None))
            else:
                raise ValueError(f"unknown method {m_name!r} for protection_cost")
        for name, m_cfg, params, mode in variants:
            crypto = keys[params].client() if params else None
            t0 = time.perf_counter()
            data = upload(
                m_cfg,
                w,
                round_=1,
                client_id=0,
                num_examples=100,
                crypto=crypto,
                columns=columns if m_cfg.uses_columns else None,
            )
            secs = time.perf_counter() - t0
            header = decode(data, expect_kind="upload").header
            fl = header.get("first_layers", {})
            rows.append(
                {
                    "method": name if mode is None else f"{name}({mode})",
                    "rank": r,
                    "budget": k if name.startswith("shelora") else None,
                    "upload_bytes": len(data),
                    "ciphertexts": int(header.get("ciphertexts", 0)),
                    "first_layer_ciphertexts": int(fl.get("ciphertexts", 0)),
                    "first_layer_values": int(fl.get("values", 0)),
                    "ckks_params": params,
                    "encrypt_seconds": secs,
                }
            )
    return rows


class _Stop(Exception):
    """Raised by the probe's hook: the rest of the forward pass is not needed."""


@torch.no_grad()
def deep_layer_probe(
    public_model: Any,
    update: LayerUpdate,
    *,
    bos_id: int,
    candidates: Sequence[int] | None = None,
    chunk: int = 1024,
    rank_tol: float = 1e-5,
) -> np.ndarray:
    """First step of DAGER's sentence search at a deeper layer, without any layer-0 token filter.

    For every candidate token ``v`` the input of layer ``update.layer``'s ``q_proj`` at position 1
    of ``[BOS, v]`` is computed with the public model (exact in round 1, where every adapter has
    ``B = 0``), and tested against the span of that layer's observed update
    (:class:`~shelora_core.attacks.dager.SpanCheck`). The first token of every sentence lies in
    the span; so does each later token given its prefix, which is how the search continues (one
    vocabulary-sized forward pass per live prefix and position).

    Args:
        public_model: the attacker's copy of the pretrained model (no adapter).
        update: the server's view of the deeper layer's update.
        bos_id: the BOS token.
        candidates: token ids to test (default: the whole vocabulary).
        chunk: sequences per forward pass.
        rank_tol: singular-value threshold of the span.

    Returns:
        Relative span distance per candidate, float64.
    """
    from .dager import SpanCheck
    from .gradients import q_proj, unwrap

    net = unwrap(public_model)
    mod = q_proj(net, update.layer)
    if hasattr(mod, "lora_A"):
        raise ValueError("pass the plain public model: the probe assumes round 1 (B = 0)")
    vocab = net.get_input_embeddings().weight.shape[0]
    cand = torch.arange(vocab) if candidates is None else torch.as_tensor(list(candidates))
    got: list[torch.Tensor] = []

    def hook(_m, args):
        got.append(args[0][:, 1].double())
        raise _Stop

    handle = mod.register_forward_pre_hook(hook)
    try:
        for lo in range(0, cand.numel(), chunk):
            c = cand[lo : lo + chunk]
            ids = torch.stack([torch.full_like(c, int(bos_id)), c], dim=1)
            try:
                net(input_ids=ids, attention_mask=torch.ones_like(ids))
            except _Stop:
                pass
    finally:
        handle.remove()
    check = SpanCheck(update, rank_tol=rank_tol)
    return check.distances(torch.cat(got)).numpy()
