"""``shelora+first-layers``: SHE-LoRA plus full encryption of the layers DAGER reads (ours).

DAGER (Petrov et al., NeurIPS 2024) inverts the update of the *first two* decoder layers: layer 0's
inputs are one vector per vocabulary token (token filtering), layer 1's are computable for every
prefix (sentence search). SHE-LoRA leaves ``B`` in plaintext and hides only a few columns of
``A``; in round 1 (``B = 0``, ``A`` the public seeded init) the whole gradient is in ``B``, and an
attacker who knows the hidden columns checks the visible coordinates of ``grad A`` in later
rounds (:mod:`shelora_core.attacks.evaluate` measures both). The cheapest change that takes those
two layers away from the attacker is to send *nothing* of them in plaintext:

* ``encrypt="dw"`` (default): the client encrypts its weighted update of each protected layer,
  ``n_i s_i B_i A_i`` (m x n values, the same quantity SHE-LoRA's ``delta`` mode encrypts for
  its columns, here for every column). The server adds the ciphertexts slot-wise (equal layouts
  whatever the client's rank), every client decrypts ``sum_i n_i s_i B_i A_i`` and divides by the
  total sample count: FlexLoRA's aggregate of those layers, exactly (up to CKKS error), with the
  other layers aggregated by SHE-LoRA as before. Cost: ``m x n`` values per protected layer,
  whatever the rank.
* ``encrypt="factors"``: the client encrypts ``B_i`` and ``A_i`` themselves (``r_i (m + n)``
  values per layer, fewer for small ranks). The server can then only average factors
  (FedAvg of ``B`` and of ``A``, biased, and heterogeneous ranks need zero padding): measured for
  its cost only, its aggregation is not built.

The other layers travel exactly as SHE-LoRA sends them (:class:`~shelora_core.methods.SHELoRA`'s
own ``make_upload``); the protected layers' ciphertexts follow SHE-LoRA's in the same message,
with their count in ``header["first_layers"]``.

**What it does not stop.** With every layer's ``B = 0`` in round 1 the server still computes every
layer's input exactly for any candidate prefix, so DAGER's sentence search can run at a deeper
plaintext layer with the whole vocabulary as candidates (no layer-0 token filter): far more
expensive, not ruled out. :func:`deep_layer_probe` measures its first step.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ..aggregation import lora_scaling
from ..ckks import ClientCrypto, PackingLayout, ServerCrypto
from ..config import FederatedConfig
from ..lora import AdapterWeights
from ..messages import Message, MessageError, require
from ..methods.base import SEP, attach_ciphertexts, split_ciphertexts
from ..methods.shelora import SHELoRA
from .gradients import LayerUpdate, _layer_index

__all__ = [
    "ENCRYPT_MODES",
    "FirstLayersSHELoRA",
    "deep_layer_probe",
    "first_layers_layout",
    "protection_cost",
]

#: what the protected layers encrypt: the weighted update (exact FlexLoRA aggregate) or the factors
ENCRYPT_MODES: tuple[str, ...] = ("dw", "factors")


def first_layers_layout(
    shapes: Mapping[str, tuple[int, int]], slots: int, *, encrypt: str = "dw", rank: int = 0
) -> PackingLayout:
    """Dense packing of the protected layers: per layer (sorted) ``dW`` (m x n), or ``B`` then ``A``."""
    if encrypt not in ENCRYPT_MODES:
        raise ValueError(f"unknown encrypt mode {encrypt!r}; choose one of {list(ENCRYPT_MODES)}")
    segs: list[tuple[str, int]] = []
    for layer, (m, n) in sorted(shapes.items()):
        if encrypt == "dw":
            segs.append((f"{layer}{SEP}dW", m * n))
        else:
            segs += [(f"{layer}{SEP}B", m * rank), (f"{layer}{SEP}A", rank * n)]
    return PackingLayout.build(segs, slots)


class FirstLayersSHELoRA:
    """SHE-LoRA with the LoRA update of ``protected`` decoder layers fully encrypted (ours).

    Args:
        cfg: the SHE-LoRA configuration (budgets, cipher mode ``delta``).
        protected: decoder layer indices sent only as ciphertexts. Defaults to ``(0, 1)``, the
            two layers DAGER reads.
        encrypt: ``"dw"`` or ``"factors"`` (see the module docstring).
    """

    name = "shelora+first-layers"
    needs_crypto = True

    def __init__(
        self,
        cfg: FederatedConfig | None = None,
        *,
        protected: Sequence[int] = (0, 1),
        encrypt: str = "dw",
    ) -> None:
        self.cfg = cfg or FederatedConfig(method="shelora")
        if self.cfg.cipher_mode != "delta":
            raise ValueError(
                f"{self.name} is built on SHE-LoRA's delta mode (got cipher_mode="
                f"{self.cfg.cipher_mode!r}); set cipher_mode='delta'"
            )
        if encrypt not in ENCRYPT_MODES:
            raise ValueError(f"unknown encrypt mode {encrypt!r}; choose one of {ENCRYPT_MODES}")
        self.protected = tuple(sorted({int(i) for i in protected}))
        self.encrypt = encrypt
        self.shelora = SHELoRA(self.cfg)

    def split_layers(self, names: Sequence[str]) -> tuple[list[str], list[str]]:
        """``(protected layer names, the others)``."""
        prot = [n for n in names if _layer_index(n) in self.protected]
        return prot, [n for n in names if n not in prot]

    def make_upload(
        self,
        weights: AdapterWeights,
        *,
        round_: int,
        client_id: int,
        num_examples: int,
        crypto: ClientCrypto | None = None,
        columns: Mapping[str, Sequence[int]] | None = None,
    ) -> Message:
        """SHE-LoRA's upload of the other layers, then the protected layers' ciphertexts."""
        if crypto is None:
            raise ValueError(f"{self.name} uploads need the client's CKKS context")
        prot, rest = self.split_layers(list(weights.factors))
        if not prot:
            raise ValueError(
                f"none of the adapted layers is a protected layer {self.protected}: "
                f"got {sorted(weights.factors)[:3]}..."
            )
        others = AdapterWeights(
            weights.rank, weights.alpha, {k: weights.factors[k] for k in rest}, weights.head
        )
        msg = self.shelora.make_upload(
            others,
            round_=round_,
            client_id=client_id,
            num_examples=num_examples,
            crypto=crypto,
            columns={k: columns[k] for k in rest} if columns is not None else None,
        )
        shapes = {k: (weights.factors[k][0].shape[0], weights.factors[k][1].shape[1]) for k in prot}
        layout = first_layers_layout(shapes, crypto.slots, encrypt=self.encrypt, rank=weights.rank)
        s = lora_scaling(weights.alpha, weights.rank)
        arrays = {}
        for k in prot:
            b, a = (np.asarray(x, np.float64) for x in weights.factors[k])
            if self.encrypt == "dw":
                arrays[f"{k}{SEP}dW"] = (num_examples * s * (b @ a)).ravel()
            else:
                arrays[f"{k}{SEP}B"], arrays[f"{k}{SEP}A"] = b.ravel(), a.ravel()
        blobs = crypto.encrypt(layout.pack(arrays))
        _, before = split_ciphertexts(msg)
        attach_ciphertexts(msg.tensors, list(before) + blobs)
        msg.header["ciphertexts"] = len(before) + len(blobs)
        msg.header["first_layers"] = {
            "layers": prot,
            "shapes": {k: list(v) for k, v in shapes.items()},
            "encrypt": self.encrypt,
            "ciphertexts": len(blobs),
            "values": layout.total,
        }
        return msg

    @staticmethod
    def split_upload(msg: Message) -> tuple[Message, list[bytes]]:
        """``(the SHE-LoRA part of the upload, the protected layers' ciphertexts)``."""
        require(msg.header, "first_layers", "ciphertexts")
        c = int(msg.header["first_layers"]["ciphertexts"])
        plain, blobs = split_ciphertexts(msg)
        head = blobs[: len(blobs) - c]
        she = Message(msg.kind, dict(msg.header), dict(plain.tensors))
        attach_ciphertexts(she.tensors, head)
        she.header["ciphertexts"] = len(head)
        she.header.pop("first_layers")
        return she, blobs[len(blobs) - c :]

    def server_sum(self, uploads: Sequence[Message], crypto: ServerCrypto) -> list[bytes]:
        """The server's part for the protected layers (``dw``): slot-wise sum over the clients.

        The SHE-LoRA part of each upload (:meth:`split_upload`) goes to SHE-LoRA's own
        ``server_aggregate``; only ``encrypt="dw"`` layouts add up across ranks.
        """
        lists = []
        for u in uploads:
            fl = u.header.get("first_layers", {})
            if fl.get("encrypt") != "dw":
                raise MessageError("only 'dw' uploads can be summed by the server")
            lists.append(self.split_upload(u)[1])
        return crypto.add(lists)

    @staticmethod
    def client_decrypt(
        summed: Sequence[bytes],
        header: Mapping[str, Any],
        crypto: ClientCrypto,
        total_examples: int,
    ) -> dict[str, np.ndarray]:
        """A client's view of the summed protected layers: ``dW`` per layer (m x n)."""
        fl = header["first_layers"]
        shapes = {k: tuple(v) for k, v in fl["shapes"].items()}
        layout = first_layers_layout(shapes, crypto.slots, encrypt="dw")
        flat = crypto.decrypt(summed, layout.total)
        parts = layout.unpack(flat)
        return {k: parts[f"{k}{SEP}dW"].reshape(shapes[k]) / float(total_examples) for k in shapes}


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
    serialized upload message (real CKKS ciphertexts), seconds wall-clock for ``make_upload`` plus
    serialization. Rows are per client.

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
    from ..he_cost import synthetic_adapter
    from ..messages import encode
    from ..methods import get_method

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
        variants: list[tuple[str, Any, str | None, str | None]] = []
        for m_name in methods:
            if m_name == "shelora+first-layers":
                variants += [
                    (m_name, FirstLayersSHELoRA(cfg, protected=protected, encrypt=e), "add_only", e)
                    for e in encrypt_modes
                ]
            elif m_name == "shelora":
                variants.append((m_name, get_method("shelora", cfg), "add_only", None))
            elif m_name in ("full_he", "fedshield"):
                variants.append(
                    (m_name, get_method(m_name, cfg.replace(method=m_name)), "fedshield", None)
                )
            elif m_name == "flexlora":
                variants.append((m_name, get_method("flexlora", cfg), None, None))
            else:
                raise ValueError(f"unknown method {m_name!r} for protection_cost")
        for name, method, params, mode in variants:
            crypto = keys[params].client() if params else None
            t0 = time.perf_counter()
            msg = method.make_upload(
                w, round_=1, client_id=0, num_examples=100, crypto=crypto, columns=columns
            )
            data = encode(msg)
            secs = time.perf_counter() - t0
            fl = msg.header.get("first_layers", {})
            rows.append(
                {
                    "method": name if mode is None else f"{name}({mode})",
                    "rank": r,
                    "budget": k if name.startswith("shelora") else None,
                    "upload_bytes": len(data),
                    "ciphertexts": int(msg.header.get("ciphertexts", 0)),
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
