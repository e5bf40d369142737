"""The threat model: what the server receives from one client, and DAGER on it.

The attacker is the server, honest-but-curious (docs/design.md, "Threat model"): it reads the
upload bytes, the PUBLIC CKKS context, its own broadcast and the protocol, nothing else. Every
function here reads only that.

Notes
-----
- **Server view** (:func:`server_view`): decodes the upload bytes with the public context only (it
  cannot decrypt; :func:`try_decrypt` shows it) and keeps the plaintext part. What it knows besides
  the bytes is its own broadcast and the protocol (:class:`ServerKnowledge`).
- **Attacker** (:func:`attack_upload`): the update is ``(broadcast - upload) / lr`` on the
  plaintext entries (one SGD step: the gradient, up to float32 rounding of the uploaded weights);
  entries the upload does not carry in plaintext are unknown. DAGER
  (:func:`~shelora_core.attacks.dager.dager_attack`) runs on layers 0 and 1:

  - ``"oblivious"``: DAGER as written, unknown entries read as zeros;
  - ``"adaptive"``: knows which entries are unknown (SHE-LoRA's column list travels in the
    upload header, MaskCrypt's mask in the consensus the server itself broadcast) and checks only
    what it sees (visible coordinates of ``grad A``; rows of ``grad B`` without unknown entries;
    a fitted offset for unknown columns of the broadcast ``A``);
  - ``"b-channel"``: the adaptive attacker restricted to the update of ``B``, which SHE-LoRA
    never encrypts. ``grad B = s grad W A^T`` has its rows in ``span{A x_t}`` (in R^r), so with
    the broadcast ``A`` the server tests ``A x`` of every candidate input against that span
    (DAGER's ``grad_b`` route, :class:`~shelora_core.attacks.span.SpanCheck`), in both rounds; it
    separates tokens only while the batch has fewer distinct inputs than r. Columns of ``A`` the
    broadcast carried encrypted (SHE-LoRA's ``J`` in a later round) enter as an unknown offset
    fitted from the vocabulary, as for the adaptive ``grad_b`` route. In round 1 (``B = 0``,
    ``grad A = 0``) every attacker already reads ``B`` only; in later rounds the other two read
    ``grad A``.

- **Methods** (:data:`METHODS`): ``flexlora`` (plaintext), ``flexlora-dp`` (local DP, clip +
  Gaussian noise, :mod:`shelora_core.privacy`), ``maskcrypt`` (the same HE budget in values),
  ``shelora`` (negotiated columns, budgets in columns per layer), ``shelora+first-layers`` (ours,
  :mod:`~shelora_core.attacks.protection`), ``shelora-dp`` (ours: SHE-LoRA with local DP on its
  plaintext part, :mod:`shelora_core.methods.shelora_dp`), ``fedshield`` and ``full_he``
  (ciphertext only).
- **The broadcast** (the ``A`` and ``B`` at which the gradient is taken): round 1 the server knows
  everything (the init is a public function of the seed); a later round everything except what
  the previous broadcast carried encrypted: SHE-LoRA's columns ``J`` of ``A`` (the encrypted ``D``
  columns of the fused update), MaskCrypt's masked entries (taken to be this round's mask).
  Simplification, in the attacker's favour: in a real later SHE-LoRA round the client's start is
  the SVD of ``P + D E_J^T``, so the server knows the visible columns of ``A`` only up to the row
  space of the plaintext part ``P`` it aggregated (which it can project out); here it knows them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..adapters import AdapterWeights, layer_index
from ..ckks import ServerCrypto
from ..messages import decode
from .dager import AttackResult, dager_attack
from .gradients import LayerUpdate, ObservedUpdate
from .options import ATTACKERS, _check_choice

__all__ = [
    "CIPHERTEXT_ONLY",
    "METHODS",
    "SHELORA_VIEW",
    "THREAT_ATTACKERS",
    "ServerKnowledge",
    "ServerView",
    "attack_upload",
    "observed_update",
    "server_knowledge",
    "server_view",
    "try_decrypt",
]

#: methods of the grid (server views built from real upload bytes)
METHODS: tuple[str, ...] = (
    "flexlora",
    "flexlora-dp",
    "maskcrypt",
    "shelora",
    "shelora+first-layers",
    "shelora-dp",
    "fedshield",
    "full_he",
)
#: methods whose upload carries no plaintext LoRA factor the attack could read
CIPHERTEXT_ONLY = ("fedshield", "full_he")
#: methods whose upload is SHE-LoRA's on the wire (column list in the header, G[:k] encrypted)
SHELORA_VIEW = ("shelora", "shelora+first-layers", "shelora-dp")
#: attackers of the grid: DAGER's two (:data:`~shelora_core.attacks.options.ATTACKERS`) and the
#: one that reads only the update of B
THREAT_ATTACKERS: tuple[str, ...] = (*ATTACKERS, "b-channel")


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
    Later rounds (``"later"``, ``"multistep"``, ``"multistep-sgd"``): everything but the entries
    the method encrypts in its broadcast (see the module docstring).
    """
    unknown_a: dict[str, np.ndarray] = {}
    unknown_b: dict[str, np.ndarray] = {}
    hide = update != "round1"
    if hide and method in SHELORA_VIEW and budget > 0:
        for name, (_b, a) in start.factors.items():
            mask = np.zeros(a.shape, bool)
            mask[:, list(columns[name])[:budget]] = True
            unknown_a[name] = mask
    if update != "round1-secret-a" and hide and method == "maskcrypt" and consensus is not None:
        unknown_b, unknown_a = _mask_entries(start, _consensus_mask(consensus))
    if hide and method in ("shelora+first-layers",) + CIPHERTEXT_ONLY:
        for name, (b, a) in start.factors.items():
            if method in CIPHERTEXT_ONLY or layer_index(name) in protected_layers:
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
    from ..methods.packing import FactorLayout

    shapes = weights.shapes
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
    from ..methods.wire import split_ciphertexts, upload_to_adapter

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
    if method in SHELORA_VIEW:
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
    the adaptive attacker (every full row still lies in the span DAGER tests). The
    ``"b-channel"`` attacker reads what the adaptive one reads with ``grad A`` set to zero: only
    the update of ``B`` and the broadcast factors remain.
    """
    _check_choice(attacker, THREAT_ATTACKERS, "attacker")
    if view.after is None:
        return None
    names = {layer_index(n): n for n in view.after.factors}
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
        if attacker != "oblivious" and ub.any():
            gb = gb[~ub.any(axis=1)]
        if attacker == "b-channel":
            ga = np.zeros_like(ga)
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

    ``attacker``: one of :data:`THREAT_ATTACKERS`; ``"b-channel"`` runs the adaptive span check on
    the ``grad_b`` route (``dager_kwargs`` may not set another route).

    Returns:
        ``(result, view)``; ``result`` is ``None`` when the plaintext part holds no update of
        layers 0 and 1 (ciphertext-only methods, the protected layers of ``shelora+first-layers``).
    """
    view = server_view(
        upload, method=method, server_crypto=server_crypto, consensus=knowledge.consensus
    )
    _check_choice(attacker, THREAT_ATTACKERS, "attacker")
    obs = observed_update(view, knowledge, attacker=attacker)
    if obs is None:
        return None, view
    if attacker == "b-channel":
        if dager_kwargs.get("route", "grad_b") != "grad_b":
            raise ValueError(
                f"the b-channel attacker reads only grad B (route 'grad_b'); got route="
                f"{dager_kwargs['route']!r}: drop it or use attacker 'adaptive'"
            )
        dager_kwargs = {**dager_kwargs, "route": "grad_b"}
        return dager_attack(public_model, obs, attacker="adaptive", **dager_kwargs), view
    return dager_attack(public_model, obs, attacker=attacker, **dager_kwargs), view
