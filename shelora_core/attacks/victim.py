"""The attacked client: its model, keys and local training, and the upload bytes it sends.

:class:`Victim` starts from the adapter the server broadcast (round 1: the package's public
seeded init, ``B = 0``; a later round: ``B != 0``) and trains it; :func:`client_upload` builds its
upload with the method's own client step of the round engine (:mod:`shelora_core.client`), as
bytes. The server's side of the attack (:mod:`~shelora_core.attacks.threat`) reads only those.

Notes
-----
The local training is one plain-SGD step on one batch (FedSGD, DAGER's threat model; learning
rate ``lr = 1e3`` for the LoRA factors, whose gradients are ~1e-7 per entry, so the step clears
the float32 rounding of the uploaded weights and stays below one AdamW step of the training loop;
``1e-3`` for the head), several plain-SGD steps on that batch at the same rates
(``"multistep-sgd"``: DAGER's FedAvg setting, ``torch.optim.SGD`` without momentum), or the
training loop's own ``local_train`` (``"multistep"``: several AdamW steps).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ..adapters import AdapterWeights, layer_index
from ..ckks import ClientCrypto, KeyHolder, ServerCrypto
from ..config import FederatedConfig
from ..lora import LoraModel
from .gradients import encode_batch
from .threat import CIPHERTEXT_ONLY, METHODS

__all__ = ["Victim", "client_upload"]

#: CKKS parameter set per encrypting method
_PARAMS = {
    "maskcrypt": "add_only",
    "shelora": "add_only",
    "shelora+first-layers": "add_only",
    "shelora-dp": "add_only",
    "fedshield": "fedshield",
    "full_he": "fedshield",
}


class Victim:
    """The attacked client: SmolLM2 with LoRA on every ``q_proj``, its keys, its column list.

    Args:
        ranks: every LoRA rank the grid uses (one adapter slot each).
        alpha: LoRA alpha.
        seed: the public configuration seed (initial adapter, later-round ``B``).
        later_b_std: std of the broadcast ``B`` of a later round.
    """

    def __init__(
        self,
        ranks: Iterable[int],
        *,
        alpha: float = 16.0,
        seed: int = 0,
        later_b_std: float = 0.01,
        model: LoraModel | None = None,
    ) -> None:
        from ..assets import load_tokenizer

        self.model = model or LoraModel(
            "smollm2", num_labels=2, ranks=tuple(ranks), alpha=alpha, target_modules=("q_proj",)
        )
        self.tokenizer = load_tokenizer("smollm2")
        self.seed = seed
        self.alpha = alpha
        self.later_b_std = later_b_std
        self._keys: dict[str, KeyHolder] = {}
        self._columns: dict[tuple[int, int], dict[str, list[int]]] = {}

    # keys: the client holds the secret context; the server only ever gets public bytes
    def keys(self, params: str) -> KeyHolder:
        if params not in self._keys:
            self._keys[params] = KeyHolder.generate(params, seed=self.seed)
        return self._keys[params]

    def client_crypto(self, method: str) -> ClientCrypto | None:
        p = _PARAMS.get(method)
        return ClientCrypto(self.keys(p).secret_bytes()) if p else None

    def server_crypto(self, method: str) -> ServerCrypto | None:
        p = _PARAMS.get(method)
        return ServerCrypto(self.keys(p).public_bytes()) if p else None

    def start(self, rank: int, update: str) -> AdapterWeights:
        """The broadcast adapter the client starts from (round 1: the public init)."""
        w = self.model.init_weights(rank, seed=self.seed)
        if update in ("later", "multistep", "multistep-sgd"):
            rng = np.random.default_rng([self.seed, rank, 0x1A7E])
            w.factors = {
                k: (rng.normal(0.0, self.later_b_std, size=b.shape).astype(np.float32), a)
                for k, (b, a) in sorted(w.factors.items())
            }
        return w

    def batch(self, sentences: Sequence[str], max_length: int) -> dict[str, torch.Tensor]:
        return encode_batch(self.tokenizer, sentences, max_length=max_length)

    def train(
        self,
        start: AdapterWeights,
        batch: Mapping[str, torch.Tensor],
        labels: Sequence[int],
        *,
        update: str,
        lr: float,
        head_lr: float = 1e-3,
        local_steps: int = 5,
        local_lr: float = 1e-3,
        seed: int = 0,
    ) -> AdapterWeights:
        """The client's local training from ``start``.

        ``update``: ``"multistep"`` runs ``local_train`` (``local_steps`` AdamW steps at
        ``local_lr``); ``"multistep-sgd"`` runs ``local_steps`` plain-SGD steps
        (``torch.optim.SGD``, no momentum) on the batch; anything else one plain-SGD step. SGD uses
        ``lr`` for the LoRA factors and ``head_lr`` for the classification head: the head's
        gradient is about a million times larger than the adapter's, and one learning rate for
        both would move the head by thousands and saturate the classifier.
        """
        from ..client import batch_loss, local_train
        from ..data import ClientData

        m = self.model
        m.load(start)
        y = torch.as_tensor(list(labels), dtype=torch.long)
        if update == "multistep":
            data = ClientData(batch["input_ids"], batch["attention_mask"], y)
            local_train(
                m,
                data,
                steps=local_steps,
                batch_size=len(y),
                lr=local_lr,
                weight_decay=0.0,
                seed=seed,
            )
            return m.read()
        if update == "multistep-sgd":
            if local_steps < 1:
                raise ValueError(f"local_steps must be >= 1 (got {local_steps})")
            groups = [
                {"params": m.adapter_parameters(), "lr": lr},
                {"params": m.head_parameters(), "lr": head_lr},
            ]
            opt = torch.optim.SGD(groups, lr=lr, momentum=0.0)
            m.model.eval()  # no dropout: the attacked steps are deterministic
            for _ in range(local_steps):
                opt.zero_grad(set_to_none=True)
                batch_loss(m.logits(batch["input_ids"], batch["attention_mask"]), y).backward()
                opt.step()
            opt.zero_grad(set_to_none=True)
            return m.read()
        groups = [(m.adapter_parameters(), lr), (m.head_parameters(), head_lr)]
        m.model.eval()
        for params, _ in groups:
            for p in params:
                p.grad = None
        batch_loss(m.logits(batch["input_ids"], batch["attention_mask"]), y).backward()
        with torch.no_grad():
            for params, step in groups:
                for p in params:
                    p -= step * p.grad  # plain SGD, float32, as the client's optimizer would
                    p.grad = None
        return m.read()

    @torch.no_grad()
    def loss(
        self, weights: AdapterWeights, batch: Mapping[str, torch.Tensor], labels: Sequence[int]
    ) -> float:
        """The training loss (mean cross-entropy) of ``weights`` on ``batch``, in eval mode.

        The attack grid compares it before and after the local steps: a local SGD that raised
        the loss on the very batch it trained on has diverged.
        """
        from ..client import batch_loss

        self.model.load(weights)
        self.model.model.eval()
        y = torch.as_tensor(list(labels), dtype=torch.long)
        logits = self.model.logits(batch["input_ids"], batch["attention_mask"])
        return float(batch_loss(logits, y))

    def columns(self, rank: int, k_max: int, calibration: Sequence[Sequence[str]]) -> dict:
        """SHE-LoRA's column list G, negotiated over the wire (OPE) by the given clients' data.

        ``calibration``: one list of sentences per client (the victim's first). Every client
        scores its initial adapter of ``rank`` on its own sentences; cached per (rank, k_max).
        """
        key = (rank, k_max)
        if key not in self._columns:
            from ..data import ClientData
            from ..engine import run_negotiation
            from ..ope import ColumnOPE, OPEKey

            cfg = FederatedConfig(
                method="shelora",
                model="smollm2",
                num_clients=len(calibration),
                ranks=(rank,),
                he_budgets=(k_max,),
                seed=self.seed,
                calibration_examples=max(len(c) for c in calibration),
            )
            datas = []
            for texts in calibration:
                b = self.batch(list(texts), max_length=64)
                y = torch.zeros(len(texts), dtype=torch.long)  # unused by the scores
                datas.append(ClientData(b["input_ids"], b["attention_mask"], y))
            ope = ColumnOPE(OPEKey.generate())  # the clients' shared key; never sent
            self._columns[key] = run_negotiation(cfg, self.model, datas, ope=ope).columns
        return self._columns[key]


def client_upload(
    method: str,
    victim: Victim,
    after: AdapterWeights,
    start: AdapterWeights,
    *,
    batch: Mapping[str, torch.Tensor],
    labels: Sequence[int],
    budget: int = 0,
    columns: Mapping[str, Sequence[int]] | None = None,
    dp_sigma: float | None = None,
    dp_epsilon: float | None = None,
    dp_delta: float = 1e-5,
    dp_clip: float = 1.0,
    lr: float = 1.0,
    seed: int = 0,
    attacked_layers: Sequence[int] = (0, 1),
) -> tuple[bytes, bytes | None, float]:
    """The victim's upload bytes for ``method`` (its own client-side code), and MaskCrypt's consensus.

    ``flexlora-dp``: the client privatizes its update ``after - start`` (every LoRA factor and the
    head, clipped jointly to ``dp_clip * lr``, i.e. the adapter's gradient to norm ``dp_clip``;
    noise ``sigma * dp_clip * lr`` per coordinate, ``sigma`` per coordinate of the gradient) with
    :func:`shelora_core.privacy.privatize` at ``(dp_epsilon, dp_delta)``, or with noise multiplier
    ``dp_sigma`` (the sweep), and uploads ``start + noisy update`` as FlexLoRA does.
    ``shelora-dp``: the same clip and noise on the plaintext part only (``B``, the columns of ``A``
    outside ``G[:budget]``, the head; :mod:`shelora_core.methods.shelora_dp`), the encrypted
    columns exact.
    ``fedshield`` / ``full_he`` upload only ``attacked_layers`` (the bytes of the other layers are
    ciphertexts of the same kind; the attack reads none of them).

    Returns:
        ``(upload bytes, consensus bytes or None, client seconds)``.
    """
    from ..client import local_gradient, propose_masks, upload
    from ..data import ClientData
    from ..server import server_consensus

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {list(METHODS)}")
    n = len(labels)
    dp: dict[str, Any] = {}
    # the update's bound is dp_clip * lr: the gradient's is dp_clip
    if method in ("flexlora-dp", "shelora-dp"):
        dp = {"dp_clip": dp_clip * lr, "dp_delta": dp_delta, "dp_epsilon": dp_epsilon}
        if dp_epsilon is None:
            dp["dp_noise_multiplier"] = float(dp_sigma or 0.0)
    cfg = FederatedConfig(
        method=method,
        model="smollm2",
        num_clients=1,
        ranks=(after.rank,),
        he_budgets=(max(budget, 1),),
        lora_alpha=after.alpha,
        seed=victim.seed,
        calibration_examples=n,
        first_layers=tuple(attacked_layers),
        **dp,
    )
    crypto = victim.client_crypto(method)
    t0 = time.perf_counter()
    consensus = None
    if method == "maskcrypt":  # the mask exchange of this round (one client: its own mask)
        data = ClientData(
            batch["input_ids"], batch["attention_mask"], torch.as_tensor(list(labels))
        )
        victim.model.load(after)
        grads = local_gradient(victim.model, data, num_examples=n, batch_size=n, seed=seed)
        proposal = propose_masks(cfg, after, start, grads, round_=1, client_id=0)
        consensus = server_consensus(cfg, [proposal], round_=1)
    if method in CIPHERTEXT_ONLY:  # only the attacked layers (the others: more of the same)
        keep = {k: v for k, v in after.factors.items() if layer_index(k) in attacked_layers}
        after = AdapterWeights(after.rank, after.alpha, keep, after.head)
    data_bytes = upload(
        cfg,
        after,
        round_=1,
        client_id=0,
        num_examples=n,
        crypto=crypto,
        columns=columns,
        consensus=consensus,
        start=start,
        seed=seed,
    )
    return data_bytes, consensus, time.perf_counter() - t0
