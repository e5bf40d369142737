"""Plaintext baselines: FedAvg of LoRA factors and FlexLoRA.

* **FedAvg** (McMahan et al., 2017) averages A and B separately; heterogeneous ranks are
  zero-padded to the largest rank (HetLoRA, Cho et al., 2024) and each client keeps the first r_i
  components. Averaging factors is biased: mean(B) mean(A) != mean(B A).
* **FlexLoRA** (Bai et al., NeurIPS 2024) aggregates the products, dW = sum_i p_i s_i B_i A_i,
  takes its SVD (computed from the stacked low-rank factors, never densely) and each client
  truncates it to its own rank: B_i = U_r S_r / s_i, A_i = V_r^T.

The FlexLoRA broadcast carries the top ``r_max`` singular triplets per layer: exactly what every
client needs (the best rank-r approximation of dW for any r <= r_max), and smaller than dW itself.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..adapters import AdapterWeights, fit_rank, revive_missing
from ..aggregation import (
    fedavg_factors,
    fedavg_truncate,
    flexlora_aggregate,
    flexlora_redistribute,
    lora_scaling,
)
from ..messages import Message, MessageError, require
from .base import AggregateArgs, Method, ReceiveArgs
from .wire import SEP, put_svd, read_svd

__all__ = ["FedAvg", "FlexLoRA"]


def _check_broadcast(msg: Message, method: str) -> None:
    require(msg.header, "method", "round", "max_rank")
    if msg.header["method"] != method:
        raise MessageError(f"broadcast is for method {msg.header['method']!r}, not {method!r}")


class FedAvg(Method):
    name = "fedavg"

    def _aggregate(self, uploads: Sequence[Message], req: AggregateArgs) -> Message:
        round_, max_rank, _, _ = req
        headers, weights, p, r_max = self._decode_uploads(uploads, max_rank)
        live = max(w.rank for w in weights)
        tensors: dict[str, np.ndarray] = {}
        for layer in weights[0].factors:
            b, a = fedavg_factors([w.factors[layer] for w in weights], p)
            # zero-pad to the federation's max rank; components no answering client had come
            # back from the round's shared seed
            b, a = revive_missing(b, a, live_rank=live, round_=round_, rank=r_max)
            tensors[f"{layer}{SEP}B"] = b
            tensors[f"{layer}{SEP}A"] = a
        return self._broadcast(tensors, weights, p, headers, round_=round_, r_max=r_max)

    def _receive(self, broadcast: Message, req: ReceiveArgs) -> AdapterWeights:
        rank, alpha, seed, _ = req
        _check_broadcast(broadcast, self.name)
        layers, head = self._split(broadcast)
        factors = {}
        for layer, t in layers.items():
            b, a = fedavg_truncate(t["B"], t["A"], min(rank, t["B"].shape[1]))
            factors[layer] = fit_rank(b, a, rank, seed=seed)
        return AdapterWeights(rank=rank, alpha=alpha, factors=factors, head=dict(head))


class FlexLoRA(Method):
    name = "flexlora"

    def _aggregate(self, uploads: Sequence[Message], req: AggregateArgs) -> Message:
        round_, max_rank, _, _ = req
        headers, weights, p, r_max = self._decode_uploads(uploads, max_rank)
        scalings = [lora_scaling(w.alpha, w.rank) for w in weights]
        tensors: dict[str, np.ndarray] = {}
        for layer in weights[0].factors:
            svd = flexlora_aggregate(
                [w.factors[layer] for w in weights], p, scalings, max_rank=r_max
            )
            put_svd(tensors, layer, svd)
        return self._broadcast(tensors, weights, p, headers, round_=round_, r_max=r_max)

    def _receive(self, broadcast: Message, req: ReceiveArgs) -> AdapterWeights:
        rank, alpha, seed, _ = req
        _check_broadcast(broadcast, self.name)
        layers, head = self._split(broadcast)
        scaling = lora_scaling(alpha, rank)
        factors = {}
        for layer, t in layers.items():
            svd = read_svd(t)
            # the stacked update may have fewer components than this client's rank (sum of the
            # answering clients' ranks < r): keep them all; fit_rank revives the missing ones
            b, a = flexlora_redistribute(svd, min(rank, svd.s.shape[0]), scaling)
            factors[layer] = fit_rank(b, a, rank, seed=seed)
        return AdapterWeights(rank=rank, alpha=alpha, factors=factors, head=dict(head))
