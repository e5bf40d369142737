"""The attack grid, fed from the bytes the server really receives.

For every method the victim client runs its real client-side code and the attacker reads only
what crosses the wire (docs/design.md, "Threat model"):

1. **Client** (:class:`Victim`): starts from the adapter the server broadcast (round 1: the
   package's public seeded init, ``B = 0``; a later round: ``B != 0``), takes one plain-SGD step on
   one batch (FedSGD, DAGER's threat model; learning rate ``lr = 1e3`` for the LoRA factors, whose
   gradients are ~1e-7 per entry, so the step clears the float32 rounding of the uploaded weights
   and stays below one AdamW step of the training loop; ``1e-3`` for the head) or runs the
   training loop's own ``local_train`` (several AdamW steps), and builds its upload with the
   method's own client step of the round engine (:func:`client_upload`), as bytes.
2. **Server** (:func:`server_view`): decodes those bytes with the PUBLIC CKKS context only (it
   cannot decrypt; :func:`try_decrypt` shows it) and keeps the plaintext part. What it knows
   besides the bytes is its own broadcast and the protocol (:class:`ServerKnowledge`).
3. **Attacker** (:func:`attack_upload`): the update is ``(broadcast - upload) / lr`` on the
   plaintext entries (one SGD step: the gradient, up to float32 rounding of the uploaded weights);
   entries the upload does not carry in plaintext are unknown. DAGER
   (:func:`~shelora_core.attacks.dager.dager_attack`) runs on layers 0 and 1:

   - ``"oblivious"``: DAGER as written, unknown entries read as zeros;
   - ``"adaptive"``: knows which entries are unknown (SHE-LoRA's column list travels in the
     upload header, MaskCrypt's mask in the consensus the server itself broadcast) and checks only
     what it sees (visible coordinates of ``grad A``; rows of ``grad B`` without unknown entries;
     a fitted offset for unknown columns of the broadcast ``A``).

Methods (:data:`METHODS`): ``flexlora`` (plaintext), ``flexlora-dp`` (local DP, clip + Gaussian
noise, :mod:`shelora_core.privacy`), ``maskcrypt`` (the same HE budget in values), ``shelora``
(negotiated columns, budgets in columns per layer), ``shelora+first-layers`` (ours,
:mod:`~shelora_core.attacks.protection`), ``fedshield`` and ``full_he`` (ciphertext only).

What the server knows of the broadcast (the ``A`` and ``B`` at which the gradient is taken):
round 1 everything (the init is a public function of the seed); a later round everything except
what the previous broadcast carried encrypted: SHE-LoRA's columns ``J`` of ``A`` (the encrypted
``D`` columns of the fused update), MaskCrypt's masked entries (taken to be this round's mask).
Simplification, in the attacker's favour: in a real later SHE-LoRA round the client's start is the
SVD of ``P + D E_J^T``, so the server knows the visible columns of ``A`` only up to the row space
of the plaintext part ``P`` it aggregated (which it can project out); here it knows them.

Rows (:func:`run_grid`) are written per (cell, batch) to a JSONL checkpoint, so an interrupted grid
resumes; :func:`summarize` averages them into the table rows.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..adapters import AdapterWeights
from ..ckks import ClientCrypto, KeyHolder, ServerCrypto
from ..config import FederatedConfig
from ..lora import LoraModel
from ..messages import decode
from .dager import AttackResult, dager_attack, match_sentences, score_reconstruction
from .dager import token_set_scores as _token_scores
from .gradients import LayerUpdate, ObservedUpdate, _layer_index, encode_batch

__all__ = [
    "METHODS",
    "PAPER_ROUGE1",
    "Cell",
    "ServerKnowledge",
    "ServerView",
    "Victim",
    "apply_overrides",
    "attack_plan",
    "attack_upload",
    "client_upload",
    "observed_update",
    "run_grid",
    "server_knowledge",
    "server_view",
    "summarize",
    "try_decrypt",
]

#: methods of the grid (server views built from real upload bytes)
METHODS: tuple[str, ...] = (
    "flexlora",
    "flexlora-dp",
    "maskcrypt",
    "shelora",
    "shelora+first-layers",
    "fedshield",
    "full_he",
)
#: methods whose upload carries no plaintext LoRA factor the attack could read
CIPHERTEXT_ONLY = ("fedshield", "full_he")
#: CKKS parameter set per encrypting method
_PARAMS = {
    "maskcrypt": "add_only",
    "shelora": "add_only",
    "shelora+first-layers": "add_only",
    "fedshield": "fedshield",
    "full_he": "fedshield",
}

#: SHE-LoRA paper (Liu et al., ICLR 2026), DAGER ROUGE-1 (%) on SST-2, batch 4 / 8 / 16
PAPER_ROUGE1: dict[str, dict[int, float]] = {
    "flexlora": {4: 95.18, 8: 61.14, 16: 10.27},
    "shelora": {4: 0.72, 8: 0.98, 16: 0.0},
    "flexlora-dp": {4: 86.25, 8: 80.28, 16: 68.62},
    "maskcrypt": {4: 89.16, 8: 61.49, 16: 10.91},
}


# ---------------------------------------------------------------------------- server knowledge
@dataclass
class ServerKnowledge:
    """What the server knows besides the upload bytes: its broadcast and the protocol.

    Attributes:
        start: the adapter the client started from, as the server knows it (entries it does not
            know are zero).
        unknown_a: layer -> bool (r, n): entries of the start ``A`` the server does not know.
        unknown_b: layer -> bool (m, r): entries of the start ``B`` the server does not know.
        lr: the FedSGD learning rate (public protocol; the span check does not depend on it).
        bos_id: the BOS token the clients prepend (public).
        batch_size: sentences behind one update (DAGER assumes the server knows it).
        consensus: MaskCrypt: the mask consensus bytes the server itself broadcast this round.
    """

    start: AdapterWeights
    unknown_a: dict[str, np.ndarray] = field(default_factory=dict)
    unknown_b: dict[str, np.ndarray] = field(default_factory=dict)
    lr: float = 1.0
    bos_id: int = 1
    batch_size: int = 1
    consensus: bytes | None = None


def server_knowledge(
    method: str,
    start: AdapterWeights,
    *,
    update: str,
    lr: float,
    bos_id: int,
    batch_size: int,
    columns: Mapping[str, Sequence[int]] | None = None,
    budget: int = 0,
    consensus: bytes | None = None,
    protected_layers: Sequence[int] = (0, 1),
) -> ServerKnowledge:
    """The server's knowledge of the client's start for ``method`` and ``update``.

    Round 1 (``"round1"``): everything (the public seeded init). ``"round1-secret-a"``: as round 1
    but the hidden columns of ``A`` are secret (what SHE-LoRA would need for round 1 to hide
    anything; the package's init is public, so this is the pessimistic case for the attacker).
    Later rounds (``"later"``, ``"multistep"``): everything but the entries the method encrypts
    in its broadcast (see the module docstring).
    """
    unknown_a: dict[str, np.ndarray] = {}
    unknown_b: dict[str, np.ndarray] = {}
    hide = update != "round1"
    if hide and method in ("shelora", "shelora+first-layers") and budget > 0:
        for name, (_b, a) in start.factors.items():
            mask = np.zeros(a.shape, bool)
            mask[:, list(columns[name])[:budget]] = True
            unknown_a[name] = mask
    if update != "round1-secret-a" and hide and method == "maskcrypt" and consensus is not None:
        unknown_b, unknown_a = _mask_entries(start, _consensus_mask(consensus))
    if hide and method in ("shelora+first-layers",) + CIPHERTEXT_ONLY:
        for name, (b, a) in start.factors.items():
            if method in CIPHERTEXT_ONLY or _layer_index(name) in protected_layers:
                unknown_a[name] = np.ones(a.shape, bool)
                unknown_b[name] = np.ones(b.shape, bool)
    known = AdapterWeights(
        start.rank,
        start.alpha,
        {
            name: (
                np.where(unknown_b.get(name, False), 0.0, b).astype(np.float32),
                np.where(unknown_a.get(name, False), 0.0, a).astype(np.float32),
            )
            for name, (b, a) in start.factors.items()
        },
        dict(start.head),
    )
    return ServerKnowledge(
        start=known,
        unknown_a=unknown_a,
        unknown_b=unknown_b,
        lr=float(lr),
        bos_id=int(bos_id),
        batch_size=int(batch_size),
        consensus=consensus,
    )


def _consensus_mask(consensus: bytes) -> np.ndarray:
    """MaskCrypt: the flat indices of the consensus the server broadcast."""
    from ..methods.maskcrypt import MASK

    return np.asarray(decode(consensus, expect_kind="mask_consensus").tensors[MASK], np.int64)


def _mask_entries(
    weights: AdapterWeights, mask: np.ndarray
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """MaskCrypt: flat layout indices ``mask`` as bool masks ``(B masks, A masks)`` per layer."""
    from ..methods.maskcrypt import FactorLayout

    shapes = {k: (b.shape[0], a.shape[1]) for k, (b, a) in weights.factors.items()}
    layout = FactorLayout.build(shapes, weights.rank)
    flat = np.zeros(layout.size)
    flat[mask] = 1.0
    parts = layout.unflatten(flat)
    return (
        {k: b[:, : weights.rank] > 0 for k, (b, _a) in parts.items()},
        {k: a[: weights.rank] > 0 for k, (_b, a) in parts.items()},
    )


# ---------------------------------------------------------------------------- server view
@dataclass
class ServerView:
    """The plaintext part of one upload, decoded by the server from bytes alone.

    Attributes:
        method: the method the upload claims (header).
        after: the plaintext LoRA factors and head the upload carries (``None``: none at all).
        unknown_a: layer -> bool mask of ``A`` entries not sent in plaintext.
        unknown_b: layer -> bool mask of ``B`` entries not sent in plaintext.
        ciphertexts: serialized ciphertexts the upload carries (opaque to the server).
        upload_bytes: length of the upload.
        note: what the server could and could not read.
    """

    method: str
    after: AdapterWeights | None
    unknown_a: dict[str, np.ndarray]
    unknown_b: dict[str, np.ndarray]
    ciphertexts: list[bytes]
    upload_bytes: int
    note: str = ""


def try_decrypt(crypto: ServerCrypto, blobs: Sequence[bytes]) -> str | None:
    """Try to read ciphertexts with the server's context; the error message (``None`` = it could).

    Both ways are tried: the package's API (:meth:`ServerCrypto.decrypt`, which refuses) and
    TenSEAL directly on the deserialized vector (which needs the secret key the context lacks).
    """
    if not blobs:
        return "no ciphertext"
    errors = []
    try:
        crypto.decrypt(list(blobs[:1]), crypto.slots)
    except PermissionError as exc:
        errors.append(f"ServerCrypto.decrypt: {exc}")
    else:
        return None
    try:
        crypto.load(blobs[0]).decrypt()
    except Exception as exc:  # TenSEAL raises ValueError without a secret key
        errors.append(f"TenSEAL: {exc}")
    else:
        return None
    return " | ".join(errors)


def server_view(
    upload: bytes,
    *,
    method: str,
    server_crypto: ServerCrypto | None = None,
    consensus: bytes | None = None,
) -> ServerView:
    """Decode one upload as the server does: bytes plus the public CKKS context, nothing else.

    Args:
        upload: the client's upload message, serialized.
        method: which method's decoder to use (one of :data:`METHODS`).
        server_crypto: the server's PUBLIC context (encrypted methods); checked to be public.
        consensus: MaskCrypt: the consensus bytes the server broadcast this round.

    Returns:
        The :class:`ServerView`.
    """
    from ..methods.base import split_ciphertexts, upload_to_adapter

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {list(METHODS)}")
    if server_crypto is not None and server_crypto.context.is_private():
        raise ValueError("the server's context holds a secret key; give it the public context")
    msg = decode(upload, expect_kind="upload")
    n = len(upload)
    if method in ("flexlora", "flexlora-dp"):
        _, after = upload_to_adapter(msg)
        return ServerView(method, after, {}, {}, [], n, "plaintext: every factor visible")
    if method in CIPHERTEXT_ONLY:
        _, blobs = split_ciphertexts(msg)
        return ServerView(
            method,
            None,
            {},
            {},
            blobs,
            n,
            "every LoRA factor travels as CKKS ciphertext; only the classification head is "
            "plaintext: DAGER has no q_proj update to read",
        )
    plain, blobs = split_ciphertexts(msg)
    header, after = upload_to_adapter(plain)
    unknown_a: dict[str, np.ndarray] = {}
    unknown_b: dict[str, np.ndarray] = {}
    if method in ("shelora", "shelora+first-layers"):
        k = int(header["budget"])
        for name, (_b, a) in after.factors.items():
            mask = np.zeros(a.shape, bool)
            mask[:, list(header["columns"][name])[:k]] = True  # G[:k] travels in the header
            unknown_a[name] = mask
        note = f"A columns G[:{k}] of every layer encrypted; B and the other columns plaintext"
        if method == "shelora+first-layers":
            fl = header["first_layers"]
            note += f"; layers {fl['layers']} sent only as {fl['ciphertexts']} ciphertexts"
    else:  # maskcrypt
        if consensus is None:
            raise ValueError("the MaskCrypt server view needs the consensus it broadcast")
        used = int(header["encrypted_values"])
        unknown_b, unknown_a = _mask_entries(after, _consensus_mask(consensus)[:used])
        note = f"{used} entries of the factors (the consensus mask) encrypted"
    return ServerView(method, after, unknown_a, unknown_b, blobs, n, note)


def observed_update(
    view: ServerView,
    knowledge: ServerKnowledge,
    *,
    attacker: str = "oblivious",
    layers: Sequence[int] = (0, 1),
) -> ObservedUpdate | None:
    """The update DAGER reads, from the server's view and knowledge (``None``: nothing to read).

    ``grad = (start - after) / lr`` on entries known on both sides; every other entry is zero and
    recorded: its columns in ``LayerUpdate.hidden`` (the adaptive attacker then checks only the
    visible coordinates of ``grad A``); rows of ``grad B`` holding an unknown entry are dropped for
    the adaptive attacker (every full row still lies in the span DAGER tests).
    """
    if view.after is None:
        return None
    names = {_layer_index(n): n for n in view.after.factors}
    if any(i not in names for i in layers):
        return None
    out: dict[int, LayerUpdate] = {}
    lr = knowledge.lr
    scaling = view.after.alpha / view.after.rank
    total = 0.0
    for i in layers:
        name = names[i]
        b1, a1 = (np.asarray(x, np.float64) for x in view.after.factors[name])
        b0, a0 = (np.asarray(x, np.float64) for x in knowledge.start.factors[name])
        start_ua = knowledge.unknown_a.get(name, np.zeros(a0.shape, bool))
        start_ub = knowledge.unknown_b.get(name, np.zeros(b0.shape, bool))
        ua = view.unknown_a.get(name, np.zeros(a1.shape, bool)) | start_ua
        ub = view.unknown_b.get(name, np.zeros(b1.shape, bool)) | start_ub
        ga = np.where(ua, 0.0, (a0 - a1) / lr)
        gb = np.where(ub, 0.0, (b0 - b1) / lr)
        total += float(np.sum(ga**2) + np.sum(gb**2))
        if attacker == "adaptive" and ub.any():
            gb = gb[~ub.any(axis=1)]
        out[i] = LayerUpdate(
            layer=i,
            grad_a=ga,
            grad_b=gb,
            lora_a=np.where(start_ua, 0.0, a0),
            lora_b=np.where(start_ub, 0.0, b0),
            scaling=scaling,
            hidden=np.flatnonzero(ua.any(axis=0)).astype(np.int64),
            a_hidden=bool(start_ua.any()),
        )
    return ObservedUpdate(
        layers=out,
        total_norm=math.sqrt(total),
        kind="gradient",
        batch_size=knowledge.batch_size,
        bos_id=knowledge.bos_id,
    )


def attack_upload(
    upload: bytes,
    *,
    method: str,
    knowledge: ServerKnowledge,
    public_model: Any,
    server_crypto: ServerCrypto | None = None,
    attacker: str = "oblivious",
    **dager_kwargs: Any,
) -> tuple[AttackResult | None, ServerView]:
    """DAGER on one upload, from its bytes, the server's knowledge and the public model only.

    Returns:
        ``(result, view)``; ``result`` is ``None`` when the plaintext part holds no update of
        layers 0 and 1 (ciphertext-only methods, the protected layers of ``shelora+first-layers``).
    """
    view = server_view(
        upload, method=method, server_crypto=server_crypto, consensus=knowledge.consensus
    )
    obs = observed_update(view, knowledge, attacker=attacker)
    if obs is None:
        return None, view
    return dager_attack(public_model, obs, attacker=attacker, **dager_kwargs), view


# ---------------------------------------------------------------------------- client side
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
        if update in ("later", "multistep"):
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
        """The client's local training from ``start``: one SGD step, or ``local_train`` (AdamW).

        The SGD step uses ``lr`` for the LoRA factors and ``head_lr`` for the classification head:
        the head's gradient is about a million times larger than the adapter's, and one learning
        rate for both would move the head by thousands and saturate the classifier.
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

    def columns(self, rank: int, k_max: int, calibration: Sequence[Sequence[str]]) -> dict:
        """SHE-LoRA's column list G, negotiated over the wire (OPE) by the given clients' data.

        ``calibration``: one list of sentences per client (the victim's first). Every client
        scores its initial adapter of ``rank`` on its own sentences; cached per (rank, k_max).
        """
        key = (rank, k_max)
        if key not in self._columns:
            from ..client import negotiated_columns, negotiation_proposal
            from ..data import ClientData
            from ..ope import ColumnOPE, OPEKey
            from ..server import server_negotiate

            cfg = FederatedConfig(
                method="shelora",
                model="smollm2",
                num_clients=len(calibration),
                ranks=(rank,),
                he_budgets=(k_max,),
                seed=self.seed,
                calibration_examples=max(len(c) for c in calibration),
            )
            ope = ColumnOPE(OPEKey.generate())  # the clients' shared key; never sent
            props = []
            for i, texts in enumerate(calibration):
                b = self.batch(list(texts), max_length=64)
                y = torch.zeros(len(texts), dtype=torch.long)  # unused by the scores
                data = ClientData(b["input_ids"], b["attention_mask"], y)
                props.append(negotiation_proposal(cfg, self.model, data, client_id=i, ope=ope))
            down, _ = server_negotiate(cfg, props)
            self._columns[key] = negotiated_columns(down, ope)
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
    if method == "flexlora-dp":  # the update's bound is dp_clip * lr: the gradient's is dp_clip
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
        keep = {k: v for k, v in after.factors.items() if _layer_index(k) in attacked_layers}
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


# ---------------------------------------------------------------------------- the grid
@dataclass(frozen=True)
class Cell:
    """One row of the attack table (averaged over ``n_batches`` batches)."""

    method: str
    attacker: str
    batch_size: int
    rank: int
    update: str
    budget: int | None = None
    dp_sigma: float | None = None
    dp_epsilon: float | None = None
    lr: float = 1e3

    @property
    def key(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @property
    def group(self) -> tuple[int, str, int, float]:
        """Cells sharing one local training per batch."""
        return (self.rank, self.update, self.batch_size, self.lr)


def attack_plan(profile: str) -> dict[str, Any]:
    """The grid of a profile: its cells and data settings.

    ``quick``: short sentences at rank 128, batch 1 and 2 in round 1 and batch 1 in a later round,
    every method, budget 4: well under a minute at one thread. ``paper``: batch 1/2/4/8, ranks 256
    (where the unprotected attack works), 64/128 (FlexLoRA only) and 8/16/32 (training ranks),
    round 1 / later / multi-step, budgets 1/2/4/8/16, DP at epsilon 10 plus a noise sweep, a secret
    round-1 ``A``, the learning-rate (float32) sweep: ~45 minutes at one thread.
    """
    if profile == "quick":
        settings = dict(
            n_batches=1,
            max_tokens=14,
            negotiation_clients=2,
            calibration_examples=8,
            dp_sigmas=(),
            local_steps=5,
            local_lr=1e-3,
            head_lr=1e-3,
        )
        cells = _cells(
            batch_sizes=(1, 2), ranks=(128,), updates=("round1",), budgets=(4,), dp_sigmas=()
        )
        cells += _cells(
            batch_sizes=(1,), ranks=(128,), updates=("later",), budgets=(4,), dp_sigmas=()
        )
    elif profile == "paper":
        settings = dict(
            n_batches=3,
            max_tokens=24,
            negotiation_clients=3,
            calibration_examples=32,
            dp_sigmas=(1e-4, 1e-6, 1e-8, 1e-10, 1e-11, 1e-12),
            local_steps=5,
            local_lr=1e-3,
            head_lr=1e-3,
        )
        cells = _cells(
            batch_sizes=(1, 2, 4, 8),
            ranks=(256,),
            updates=("round1", "later"),
            budgets=(1, 2, 4, 8, 16),
            dp_sigmas=settings["dp_sigmas"],
        )
        # training ranks: the unprotected attack and SHE-LoRA / MaskCrypt at budget 8
        cells += _cells(
            batch_sizes=(1, 2, 4),
            ranks=(8, 16, 32),
            updates=("round1", "later"),
            budgets=(8,),
            dp_sigmas=(),
            methods=("flexlora", "maskcrypt", "shelora", "fedshield"),
        )
        # where the unprotected attack stops working: ranks 64 and 128 at every batch size
        cells += _cells(
            batch_sizes=(1, 2, 4, 8),
            ranks=(64, 128),
            updates=("round1",),
            budgets=(),
            dp_sigmas=(),
            methods=("flexlora",),
        )
        # the real multi-step local update (AdamW): unprotected and SHE-LoRA
        cells += _cells(
            batch_sizes=(1, 4),
            ranks=(256, 32),
            updates=("multistep",),
            budgets=(4,),
            dp_sigmas=(),
            methods=("flexlora", "shelora"),
        )
        # what SHE-LoRA would need round 1 to hide anything: a secret initial A (pessimistic)
        cells += [
            Cell("shelora", a, bs, 256, "round1-secret-a", budget=k)
            for bs in (1, 2, 4)
            for k in (1, 4, 16)
            for a in ("oblivious", "adaptive")
        ]
        # float32 uploads: one SGD step is seen through rounded weights; smaller lr, more noise
        cells += [
            Cell("flexlora", "oblivious", bs, 256, "later", lr=lr)
            for bs in (1, 4)
            for lr in (1.0, 10.0, 100.0)
        ]
    else:
        raise ValueError(f"unknown profile {profile!r}; choose 'quick' or 'paper'")
    return {"profile": profile, "cells": cells, **settings}


def _cells(
    *,
    batch_sizes: Sequence[int],
    ranks: Sequence[int],
    updates: Sequence[str],
    budgets: Sequence[int],
    dp_sigmas: Sequence[float],
    methods: Sequence[str] = METHODS,
) -> list[Cell]:
    out: list[Cell] = []
    for r in ranks:
        for upd in updates:
            for bs in batch_sizes:
                for m in methods:
                    if m in ("flexlora", "fedshield", "full_he"):
                        out.append(Cell(m, "oblivious", bs, r, upd))
                    elif m == "flexlora-dp":
                        out.append(Cell(m, "oblivious", bs, r, upd, dp_epsilon=10.0))
                        out += [Cell(m, "oblivious", bs, r, upd, dp_sigma=s) for s in dp_sigmas]
                    elif m == "shelora+first-layers":
                        out += [
                            Cell(m, a, bs, r, upd, budget=max(budgets))
                            for a in ("oblivious", "adaptive")
                        ]
                    else:
                        out += [
                            Cell(m, a, bs, r, upd, budget=k)
                            for k in budgets
                            for a in ("oblivious", "adaptive")
                        ]
    return out


def sample_sentences(
    n: int, *, max_tokens: int, seed: int = 0, exclude: Sequence[str] = ()
) -> tuple[list[str], list[int]]:
    """``n`` Rotten Tomatoes training snippets of at most ``max_tokens`` SmolLM2 tokens, seeded,
    with their labels."""
    from ..assets import load_tokenizer
    from ..data import load_dataset

    if n <= 0:
        return [], []
    train, _ = load_dataset("rotten_tomatoes", seed=0)
    tok = load_tokenizer("smollm2")
    order = np.random.default_rng([seed, 0x5E7]).permutation(len(train))
    skip = set(exclude)
    texts, labels = [], []
    for i in order:
        t = train.texts[int(i)]
        if t in skip or len(tok(t, add_special_tokens=False)["input_ids"]) > max_tokens:
            continue
        texts.append(t)
        labels.append(int(train.labels[int(i)]))
        if len(texts) == n:
            break
    return texts, labels


def run_grid(
    plan: Mapping[str, Any],
    *,
    checkpoint: str | Path,
    victim: Victim | None = None,
    public_model: Any = None,
    progress: bool | None = None,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Run (or resume) the cells of ``plan``; returns the per-(cell, batch) records.

    Each record is appended to ``checkpoint`` (JSONL) as soon as it is measured; records already
    there are not recomputed.
    """
    from tqdm.auto import tqdm

    from ..assets import load_classifier
    from ..federation import quiet

    cells: list[Cell] = list(plan["cells"])
    n_batches = int(plan["n_batches"])
    max_batch = max(c.batch_size for c in cells)
    path = Path(checkpoint)
    path.parent.mkdir(parents=True, exist_ok=True)
    done: dict[tuple[str, int], dict[str, Any]] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                done[(rec["key"], rec["batch"])] = rec
    todo = [(c, b) for c in cells for b in range(n_batches) if (c.key, b) not in done]
    bar = tqdm(
        total=len(cells) * n_batches,
        initial=len(cells) * n_batches - len(todo),
        desc="attack grid",
        disable=quiet() if progress is None else not progress,
    )
    if todo:
        victim = victim or Victim(sorted({c.rank for c in cells}), seed=seed)
        public_model = public_model or load_classifier("smollm2", num_labels=2, seed=seed)
        pool, labels = sample_sentences(
            n_batches * max_batch, max_tokens=int(plan["max_tokens"]), seed=seed
        )
        others, _ = sample_sentences(
            (plan["negotiation_clients"] - 1) * plan["calibration_examples"],
            max_tokens=64,
            seed=seed + 1,
            exclude=pool,
        )
        calib = [pool[: plan["calibration_examples"]]] + [
            others[i : i + plan["calibration_examples"]]
            for i in range(0, len(others), plan["calibration_examples"])
        ]
        k_max = max([c.budget or 1 for c in cells if c.method.startswith("shelora")] or [1])
        groups: dict[tuple, list[tuple[Cell, int]]] = {}
        for c, b in todo:
            groups.setdefault((*c.group, b), []).append((c, b))
        with path.open("a") as fh:
            for (rank, update, bs, lr, b), items in groups.items():
                texts = pool[b * bs : (b + 1) * bs]
                y = labels[b * bs : (b + 1) * bs]
                batch = victim.batch(texts, max_length=int(plan["max_tokens"]) + 1)
                start = victim.start(rank, update)
                after = victim.train(
                    start,
                    batch,
                    y,
                    update=update,
                    lr=lr,
                    head_lr=float(plan.get("head_lr", 1e-3)),
                    local_steps=int(plan.get("local_steps", 5)),
                    local_lr=float(plan.get("local_lr", 1e-3)),
                    seed=seed,
                )
                step_lr = float(plan.get("local_lr", 1e-3)) if update == "multistep" else lr
                uploads: dict[tuple, tuple[bytes, bytes | None, float]] = {}
                for cell, _ in items:
                    rec = _measure(
                        cell,
                        b,
                        victim=victim,
                        public_model=public_model,
                        start=start,
                        after=after,
                        batch=batch,
                        texts=texts,
                        labels=y,
                        step_lr=step_lr,
                        columns=_columns_for(cell, victim, calib, k_max),
                        uploads=uploads,
                        seed=seed,
                    )
                    line = json.dumps(rec)
                    fh.write(line + "\n")
                    fh.flush()
                    done[(cell.key, b)] = json.loads(line)  # as a resumed run reads it
                    bar.update(1)
    bar.close()
    return [done[(c.key, b)] for c in cells for b in range(n_batches) if (c.key, b) in done]


def _columns_for(cell: Cell, victim: Victim, calib: Sequence[Sequence[str]], k_max: int):
    if not cell.method.startswith("shelora"):
        return None
    return victim.columns(cell.rank, k_max, calib)


def _measure(
    cell: Cell,
    b: int,
    *,
    victim: Victim,
    public_model: Any,
    start: AdapterWeights,
    after: AdapterWeights,
    batch: Mapping[str, torch.Tensor],
    texts: Sequence[str],
    labels: Sequence[int],
    step_lr: float,
    columns: Mapping[str, Sequence[int]] | None,
    uploads: dict,
    seed: int,
) -> dict[str, Any]:
    """Upload (cached per method variant and batch), server view, attack, scores: one record."""
    t0 = time.perf_counter()
    ukey = (cell.method, cell.budget, cell.dp_sigma, cell.dp_epsilon)
    if ukey not in uploads:
        uploads[ukey] = client_upload(
            cell.method,
            victim,
            after,
            start,
            batch=batch,
            labels=labels,
            budget=cell.budget or 0,
            columns=columns,
            dp_sigma=cell.dp_sigma,
            dp_epsilon=cell.dp_epsilon,
            lr=step_lr,
            seed=seed + b,
        )
    data, consensus, client_s = uploads[ukey]
    knowledge = server_knowledge(
        cell.method,
        start,
        update=cell.update,
        lr=step_lr,
        bos_id=int(victim.tokenizer.bos_token_id),
        batch_size=cell.batch_size,
        columns=columns,
        budget=cell.budget or 0,
        consensus=consensus,
    )
    server_crypto = victim.server_crypto(cell.method)
    res, view = attack_upload(
        data,
        method=cell.method,
        knowledge=knowledge,
        public_model=public_model,
        server_crypto=server_crypto,
        attacker=cell.attacker,
        max_length=int(batch["input_ids"].shape[1]) + 1,
    )
    tok = victim.tokenizer
    refs = list(texts)
    ids = batch["input_ids"][batch["attention_mask"].bool()].tolist()
    true_tokens = set(ids) - {tok.bos_token_id}
    rec: dict[str, Any] = {"key": cell.key, "batch": b, **asdict(cell)}
    hidden: dict[int, int] = {}
    rec["note"] = view.note
    rec["decrypt_error"] = (
        try_decrypt(server_crypto, view.ciphertexts) if view.ciphertexts else None
    )
    if res is None:
        recon: list[str] = []
        rouge = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
        prec = recall = 0.0
        r1 = r2 = None
    else:
        recon = [tok.decode(s) for s in res.sequences]
        rouge = score_reconstruction(recon, refs)
        prec, recall = _token_scores(res.tokens, true_tokens)
        r1, r2 = res.rank_layer1, res.rank_layer2
        rec["route"] = res.route
        obs_hidden = observed_update(view, knowledge, attacker=cell.attacker)
        hidden = {i: int(lu.hidden.size) for i, lu in obs_hidden.layers.items()}
        names = {_layer_index(n): n for n in view.after.factors}
        rec["unknown_entries"] = {
            i: int(
                np.sum(view.unknown_a.get(names[i], 0))
                + np.sum(view.unknown_b.get(names[i], 0))
                + np.sum(knowledge.unknown_a.get(names[i], 0))
            )
            for i in (0, 1)
        }
    rec.update(
        rouge1=rouge["rouge1"],
        rouge2=rouge["rouge2"],
        rougeL=rouge["rougeL"],
        token_precision=prec,
        token_recall=recall,
        rank_layer1=r1,
        rank_layer2=r2,
        hidden_columns=hidden,
        upload_bytes=view.upload_bytes,
        ciphertexts=len(view.ciphertexts),
        client_seconds=client_s,
        distinct_tokens=len(true_tokens),
        examples=[
            {"reference": r, "reconstruction": p}
            for r, p in zip(refs, match_sentences(recon, refs), strict=True)
        ],
        seconds=time.perf_counter() - t0,
    )
    return rec


def summarize(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Average per-batch records into table rows (one per cell), in first-seen order."""
    by: dict[str, list[Mapping[str, Any]]] = {}
    for r in records:
        by.setdefault(r["key"], []).append(r)
    rows = []
    for recs in by.values():
        r0 = recs[0]
        row = {
            k: r0[k]
            for k in (
                "method",
                "attacker",
                "batch_size",
                "rank",
                "budget",
                "update",
                "dp_sigma",
                "dp_epsilon",
                "lr",
            )
        }
        for k in ("rouge1", "rouge2", "rougeL", "token_precision", "token_recall"):
            row[k] = float(np.mean([r[k] for r in recs]))
        row["n_batches"] = len(recs)
        row["upload_bytes"] = float(np.mean([r["upload_bytes"] for r in recs]))
        row["ciphertexts"] = int(r0["ciphertexts"])
        row["client_seconds"] = float(np.mean([r["client_seconds"] for r in recs]))
        row["attack_seconds"] = float(np.mean([r["seconds"] for r in recs]))
        row["note"] = r0.get("note", "")
        if r0.get("decrypt_error"):
            row["decrypt_error"] = r0["decrypt_error"]
        row["examples"] = r0["examples"]
        rows.append(row)
    return rows


#: plan settings a notebook override may replace, and the cell fields it may filter on
_SETTINGS = ("n_batches", "max_tokens", "negotiation_clients", "calibration_examples")
_FILTERS = {"batch_sizes": "batch_size", "ranks": "rank", "updates": "update", "methods": "method"}


def apply_overrides(
    plan: Mapping[str, Any], overrides: Mapping[str, Any]
) -> tuple[dict[str, Any], list[str]]:
    """``plan`` with ``overrides`` applied, and the override keys it does not know.

    Settings (``n_batches``, ``max_tokens``, ``negotiation_clients``, ``calibration_examples``) are
    replaced; ``batch_sizes``, ``ranks``, ``updates`` and ``methods`` keep only the matching
    cells (e.g. ``{"batch_sizes": [1]}`` for a smoke test).
    """
    out = dict(plan)
    ignored = []
    for key, value in overrides.items():
        if key in _SETTINGS:
            out[key] = int(value)
        elif key in _FILTERS:
            keep = set(value if isinstance(value, (list, tuple)) else [value])
            out["cells"] = [c for c in out["cells"] if getattr(c, _FILTERS[key]) in keep]
        else:
            ignored.append(key)
    if not out["cells"]:
        raise ValueError(f"the overrides {dict(overrides)} leave no cell of the attack grid")
    return out, ignored
