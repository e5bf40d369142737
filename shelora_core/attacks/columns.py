"""Which ``q_proj`` input columns a SHE-LoRA client hides, for the attack's threat model.

:func:`sensitive_columns` picks them from the client's own batch the way SHE-LoRA's column
sensitivity does (:mod:`shelora_core.sensitivity`); the picked columns are what
:func:`~shelora_core.attacks.gradients.hide_columns` removes from the server's view before DAGER
runs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from .gradients import _active_adapter, q_proj, unwrap

__all__ = ["sensitive_columns"]


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
