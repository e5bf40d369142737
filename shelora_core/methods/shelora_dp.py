"""``shelora-dp``: SHE-LoRA whose plaintext part carries local differential privacy (ours).

SHE-LoRA (:class:`~shelora_core.methods.SHELoRA`, ``delta`` mode) sends a client's ``B``, the
columns of ``A`` outside its protected prefix ``J_i = G[:k_i]`` and the head in plaintext, and the
protected columns of its update encrypted. ``shelora-dp`` changes only the plaintext part:

* **What is clipped.** One vector per client and round: the client's update of everything the
  server reads in plaintext, ``(B - B0, (A - A0)[:, visible], head - head0)`` over every layer,
  where ``(B0, A0, head0)`` is the adapter the client started the round from and ``visible``
  the columns outside ``J_i``. It is clipped jointly to L2 norm ``C = cfg.dp_clip`` and
  ``N(0, (sigma C)^2)`` is added to each of its coordinates (:func:`shelora_core.privacy.privatize`);
  the upload's plaintext is the start plus that noisy update, the protected columns of ``A``
  still zero. ``sigma`` is :func:`shelora_core.accounting.dp_noise_multiplier` (a fixed multiplier,
  a target epsilon over the run, or the per-round analytic calibration), as for ``flexlora-dp``.
* **The encrypted columns are exact**: ``n_i s_i B_i A_i[:, J_i]`` is computed from the trained,
  un-noised ``B_i`` and ``A_i`` and encrypted as SHE-LoRA does; the server only adds them.
* **Sensitivity.** ``C`` for add/remove adjacency of one client's round update (``2C`` under
  substitution); the accountant (:mod:`shelora_core.accounting`) composes the rounds, and every
  round record and the summary say what the run spent (client-level, the unit is a client's
  whole plaintext update of a round).

**What the guarantee covers, and what it does not.**

* It covers what the server sees in plaintext from one round's training, given the adapter the
  client started from: B, the visible columns of A and the head of its upload.
* It does not cover the encrypted columns. They are hidden from the server by CKKS, not by DP:
  they are exact, and their decrypted aggregate reaches every client (who holds the secret key),
  so DP says nothing about what one client (or a client colluding with the server: docs/design.md,
  "Threat model") learns about another, nor about the released global model, whose protected
  columns are the exact aggregate.
* It is conditional on the starting adapter. From round 2 on, a client's start is the rank-r
  truncation of the fused broadcast ``P + D E_G^T``, so it mixes the decrypted (exact) column
  aggregate ``D`` of the previous round into ``B0`` and into every column of ``A0``; the start is
  not public, and the plaintext upload ``start + noisy update`` therefore also carries a function
  of earlier exact encrypted aggregates that DP does not bound (plain SHE-LoRA leaks the same
  function, without noise). In round 1 the start is the initial adapter and the guarantee is
  unconditional.
* The accounted ``epsilon`` with the sampling rate assumes an observer who does not know which
  clients were sampled; against the server use ``epsilon_server`` (:func:`~shelora_core.accounting.run_privacy`).

Only the ``delta`` cipher mode is supported (``paper`` mode multiplies the encrypted columns by the
plaintext ``p_i s_i B_i``, which would carry the noise into the encrypted part), and only
``shelora_protect="encrypt"``. To the server a ``shelora-dp`` upload is a SHE-LoRA upload: it
checks and aggregates it exactly as SHE-LoRA's.
"""

from __future__ import annotations

import numpy as np

from ..accounting import dp_noise_multiplier
from ..adapters import AdapterWeights
from ..config import FederatedConfig
from ..errors import ConfigError
from ..messages import Message
from ..privacy import privatize
from .base import UploadArgs
from .dp import check_same_adapter
from .shelora import SHELoRA
from .wire import SEP

__all__ = ["SHELoRADP", "privatize_plain_part"]


def privatize_plain_part(
    trained: AdapterWeights,
    start: AdapterWeights,
    protected: dict[str, list[int]],
    *,
    clip: float,
    noise_multiplier: float,
    seed: int = 0,
) -> AdapterWeights:
    """``start + clip-and-noise(trained - start)`` on the plaintext part only.

    The vector clipped (jointly, to ``clip``) is every layer's ``B`` update (layers in order),
    then every layer's ``A`` update restricted to the columns outside ``protected[layer]``, then
    the head's update; noise of std ``noise_multiplier * clip`` is drawn in that order from
    ``numpy.random.default_rng([seed, 0xD9, 1])``. The protected columns of the returned ``A``
    are zero (they travel encrypted).
    """
    check_same_adapter(trained, start)
    layers = list(trained.factors)
    visible = {}
    for k in layers:
        n = trained.factors[k][1].shape[1]
        hidden = set(int(c) for c in protected.get(k, ()))
        visible[k] = np.array([c for c in range(n) if c not in hidden], dtype=np.int64)
    f64 = np.float64
    upd = {f"{k}{SEP}B": trained.factors[k][0].astype(f64) - start.factors[k][0] for k in layers}
    upd |= {
        f"{k}{SEP}A": (trained.factors[k][1].astype(f64) - start.factors[k][1])[:, visible[k]]
        for k in layers
    }
    upd |= {f"head{SEP}{k}": trained.head[k].astype(f64) - start.head[k] for k in trained.head}
    rng = np.random.default_rng([seed, 0xD9, 1])
    noisy = privatize(upd, max_norm=clip, sigma=noise_multiplier, rng=rng)
    factors = {}
    for k in layers:
        b0, a0 = start.factors[k]
        a = np.zeros_like(a0, dtype=f64)
        a[:, visible[k]] = a0[:, visible[k]] + noisy[f"{k}{SEP}A"]
        factors[k] = ((b0 + noisy[f"{k}{SEP}B"]).astype(np.float32), a.astype(np.float32))
    head = {k: (start.head[k] + noisy[f"head{SEP}{k}"]).astype(np.float32) for k in trained.head}
    return AdapterWeights(trained.rank, trained.alpha, factors, head)


class SHELoRADP(SHELoRA):
    """SHE-LoRA (delta mode) with local DP on the plaintext part (see the module docstring)."""

    name = "shelora-dp"

    def __init__(self, cfg: FederatedConfig | None = None) -> None:
        super().__init__(cfg)
        if self.mode != "delta" or self.withhold:
            raise ConfigError(
                f"{self.name} runs SHE-LoRA's delta mode with encrypted columns (got cipher_mode="
                f"{self.mode!r}, shelora_protect={self.cfg.shelora_protect!r}): set "
                "cipher_mode='delta' and shelora_protect='encrypt'"
            )

    def _upload(self, weights: AdapterWeights, req: UploadArgs) -> Message:
        start, columns = req.start, req.columns
        if start is None:
            raise ValueError(
                f"{self.name} privatizes the round's update: pass start= (the adapter the client "
                "started the round from)"
            )
        # SHE-LoRA's exact upload: its ciphertexts hold the exact protected columns
        msg = super()._upload(weights, req)
        k = self.cfg.client_budget(req.client_id)
        protected = {layer: list(columns[layer])[:k] for layer in weights.factors}
        noisy = privatize_plain_part(
            weights,
            start,
            protected,
            clip=self.cfg.dp_clip,
            noise_multiplier=dp_noise_multiplier(self.cfg),
            seed=req.seed,
        )
        for layer, (b, a) in noisy.factors.items():  # only the plaintext tensors change
            msg.tensors[f"{layer}{SEP}B"] = b
            msg.tensors[f"{layer}{SEP}A"] = a
        for key, v in noisy.head.items():
            msg.tensors[f"head{SEP}{key}"] = v
        return msg
