"""MaskCrypt baseline: selective CKKS encryption of individual weights, with a mask consensus.

Hu and Li, "MaskCrypt: Federated Learning with Selective Homomorphic Encryption", IEEE TDSC.
One round, four messages (all :class:`~shelora_core.messages.Message` bytes):

1. **Proposal** (client -> server, ``mask_proposal``). The client trains from the last broadcast,
   then scores every weight ``w`` it uploads by the first-order change of its own loss if an
   adversary replaced the weight by its estimate ``w_est``::

       score = |g * (w_est - w)|,   g = d loss / d w at the trained weights (client's data).

   *The adversary's estimate* is the weight the server expects this client to hold when it does
   not see it: the client's starting adapter of the round, i.e. the previous global model
   reparameterized to the client's rank (the server computes it from its own broadcast and the
   public rank; in round 1 the common initial adapter). So the score is the magnitude of the
   first-order loss change along the client's own update: the weights whose update says most
   about the client's data. The gradient is taken over ``cfg.calibration_examples`` of the
   client's examples (:func:`shelora_core.client.local_gradient`). The client proposes its
   ``E_i`` best-scored weights, ranked (its mask).
2. **Consensus** (server -> clients, ``mask_consensus``). The union of the masks (so every weight
   some client finds sensitive is protected for everyone, as ciphertexts only add slot-wise when
   all clients encrypt the same positions), ordered by rank: round-robin over the clients' ranked
   proposals, duplicates dropped (the order the MaskCrypt example of the Plato framework builds),
   then cut to ``E_max``, the largest budget of the round. The header records the union's size,
   so a reader sees when the cut bites (union larger than ``E_max``).
3. **Upload** (client -> server). Client i encrypts its weights at the consensus prefix
   ``J_i = consensus[:E_i]`` (prefixes nest, as SHE-LoRA's column lists do) and sends the rest
   in plaintext with those entries zeroed.
4. **Aggregation** (server, public context only): the hybrid weighted FedAvg
   ``sum_i p_i w_i = sum_i p_i w_i^plain + sum_i p_i Enc(w_i[J_i])`` (plaintext sum plus
   slot-wise ciphertext sum); clients decrypt the encrypted entries and add them in place. With
   the same inputs the result equals plaintext FedAvg up to CKKS error (the test).

**Heterogeneous ranks.** MaskCrypt is a per-parameter scheme over what the clients upload, and a
LoRA client uploads its factors A_i and B_i. The weights are therefore the entries of the
*zero-padded* factors (B_i padded to m x r_max, A_i to r_max x n, flattened layer by layer in a
public layout), and the aggregate is FedAvg with HetLoRA zero padding (each client keeps the
first r_i components): the only per-weight average of LoRA factors that is defined across ranks.
The alternative, MaskCrypt on FlexLoRA's dW = s B A, would make every client upload a dense
m x n matrix in plaintext (n / (2 r) times the factors' size; masking entries of dW also destroys
its low rank), so it was not chosen. The price: MaskCrypt inherits FedAvg's bias
(mean(B) mean(A) != mean(B A)); its plaintext reference is FedAvg, while SHE-LoRA's is FlexLoRA.
Entries beyond a client's rank hold no weight of it and score nothing; it encrypts zeros there
if the consensus (from higher-rank clients) puts them in its prefix.

**Budget.** Client i encrypts ``E_i`` values, the number SHE-LoRA encrypts at the same
``he_budgets`` and ``cipher_mode`` (:func:`~shelora_core.methods.budget.encrypted_values`): ``sum_layers k_i m``
in ``delta`` mode, ``k_i r_i x layers`` in ``paper`` mode. The selection is global over all
layers, as MaskCrypt ranks the whole flattened model. Cipher modes: ``delta`` clients pre-weight
their values by their sample count and the server only adds (``add_only`` CKKS, 32 B/value, as
SHE-LoRA delta); ``paper`` clients encrypt raw values and the server multiplies each by p_i
(``fedshield`` CKKS: N=8192, MaskCrypt's own TenSEAL setting).

Deviations from the Plato MaskCrypt example code, on purpose: it ranks by the *signed* product
``(w_est - w) * g`` (descending), we by its magnitude (a negative first-order change says as much
about the data as a positive one); it alternates training rounds and mask rounds, we exchange
the mask inside the round (same messages; their costs are recorded separately as
``consensus_*``); it keeps the adversary's estimate in a file updated from what was exposed, we
take the start-of-round adapter, which the server can always compute. The masks travel in
plaintext, as in MaskCrypt: the server learns which weights each client finds sensitive. The
classification head is averaged in plaintext, as in every method here.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..adapters import AdapterWeights, fit_rank
from ..aggregation import fedavg_truncate
from ..ckks import check_fingerprint
from ..config import FederatedConfig
from ..errors import ProtocolError
from ..messages import Message, MessageError, require
from .base import AggregateArgs, Method, ReceiveArgs, UploadArgs
from .budget import encrypted_values
from .packing import FactorLayout
from .wire import SEP, adapter_to_upload, attach_ciphertexts, split_ciphertexts, upload_to_adapter

__all__ = [
    "MaskCrypt",
    "consensus_mask",
    "maskcrypt_budget",
    "propose_mask",
    "weight_scores",
]

#: tensor name of a mask (proposal, consensus, broadcast)
MASK = "mask"


def maskcrypt_budget(
    cfg: FederatedConfig, client_id: int, shapes: Mapping[str, tuple[int, int]]
) -> int:
    """``E_i``: the values MaskCrypt client ``client_id`` encrypts per round.

    Exactly SHE-LoRA's count at the same ``he_budgets`` and ``cipher_mode``
    (:func:`~shelora_core.methods.budget.encrypted_values`): delta ``sum_l k_i m_l``,
    paper ``k_i r_i x layers``.
    """
    return encrypted_values(cfg, client_id, shapes)


def weight_scores(
    trained: AdapterWeights,
    start: AdapterWeights,
    grads: Mapping[str, tuple[np.ndarray, np.ndarray]],
    layout: FactorLayout,
) -> np.ndarray:
    """``|g * (w_est - w)|`` per entry of ``layout``; ``-inf`` outside the client's rank.

    Args:
        trained: the client's weights ``w`` after local training.
        start: the adversary's estimate ``w_est``: the adapter the client started the round from.
        grads: ``(dL/dB, dL/dA)`` per layer at ``trained``.
        layout: the public padded layout.
    """
    if start.rank != trained.rank:
        raise ValueError(f"start rank {start.rank} != trained rank {trained.rank}")
    w = layout.flatten(trained.factors)
    est = layout.flatten(start.factors)
    g = layout.flatten({k: (np.asarray(gb), np.asarray(ga)) for k, (gb, ga) in grads.items()})
    score = np.abs(g * (est - w))
    score[~layout.own_entries(trained.rank)] = -np.inf
    return score


def propose_mask(scores: np.ndarray, budget: int) -> np.ndarray:
    """The ``budget`` best-scored entries (finite scores only), best first; ties by index."""
    if budget < 0:
        raise ValueError(f"budget must be >= 0 (got {budget})")
    cand = np.flatnonzero(np.isfinite(scores))
    if budget == 0:
        return np.zeros(0, np.int64)
    if budget < cand.size:
        s = scores[cand]
        thresh = -np.partition(-s, budget - 1)[budget - 1]  # the budget-th largest score
        above = cand[s > thresh]
        at = cand[s == thresh][: budget - above.size]  # ties at the threshold: lowest index
        cand = np.concatenate([above, at])
    order = np.lexsort((cand, -scores[cand]))  # by score descending, then index ascending
    return cand[order].astype(np.int64)


def consensus_mask(proposals: Sequence[np.ndarray], limit: int) -> tuple[np.ndarray, int]:
    """``(ordered union cut to limit, size of the full union)``.

    Round-robin over the ranked proposals (rank 1 of every client, then rank 2, ...), first
    occurrence kept.
    """
    if not proposals:
        return np.zeros(0, np.int64), 0
    width = max(len(p) for p in proposals)
    grid = np.full((len(proposals), width), -1, np.int64)
    for i, p in enumerate(proposals):
        grid[i, : len(p)] = p
    seq = grid.T.ravel()
    seq = seq[seq >= 0]
    _, first = np.unique(seq, return_index=True)
    union = seq[np.sort(first)]
    return union[: max(0, int(limit))], int(union.size)


def _digest(mask: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(mask, np.int64).tobytes()).hexdigest()[:16]


def _index_dtype(size: int) -> type:
    return np.int32 if size < 2**31 else np.int64


class MaskCrypt(Method):
    """MaskCrypt's client and server steps (see the module docstring)."""

    name = "maskcrypt"
    needs_crypto = True
    needs_consensus = True

    def __init__(self, cfg: FederatedConfig | None = None) -> None:
        super().__init__(cfg)
        self.mode = self.cfg.cipher_mode

    @property
    def r_max(self) -> int:
        return max(self.cfg.client_ranks)

    def layout(self, shapes: Mapping[str, tuple[int, int]]) -> FactorLayout:
        return FactorLayout.build(shapes, self.r_max)

    # ------------------------------------------------------------------ phase 1: proposal
    def make_proposal(
        self,
        trained: AdapterWeights,
        start: AdapterWeights,
        grads: Mapping[str, tuple[np.ndarray, np.ndarray]],
        *,
        round_: int,
        client_id: int,
    ) -> Message:
        """The client's ranked mask: its ``E_i`` most sensitive weights (flat layout indices)."""
        shapes = trained.shapes
        layout = self.layout(shapes)
        budget = maskcrypt_budget(self.cfg, client_id, shapes)
        mask = propose_mask(weight_scores(trained, start, grads, layout), budget)
        own = trained.rank * sum(m + n for m, n in shapes.values())
        header = {
            "method": self.name,
            "round": int(round_),
            "client_id": int(client_id),
            "budget": int(budget),
            "size": layout.size,
            "rank": int(trained.rank),
            "encrypt_ratio": float(budget / own),
        }
        return Message("mask_proposal", header, {MASK: mask.astype(_index_dtype(layout.size))})

    def server_consensus(self, proposals: Sequence[Message], *, round_: int) -> Message:
        """The union of the round's masks, ordered by rank and cut to the largest budget."""
        if not proposals:
            raise ValueError("no mask proposals: at least one client must answer a round")
        for msg in proposals:
            require(msg.header, "method", "round", "client_id", "budget", "size")
            if msg.header["round"] != round_:
                raise MessageError(
                    f"mask proposal from client {msg.header['client_id']} is for round "
                    f"{msg.header['round']}, not {round_}"
                )
        ordered = sorted(proposals, key=lambda m: int(m.header["client_id"]))
        size = int(ordered[0].header["size"])
        masks = []
        for msg in ordered:
            mask = np.asarray(msg.tensors.get(MASK, np.zeros(0)), np.int64)
            if int(msg.header["size"]) != size or (
                mask.size and not 0 <= mask.min() <= mask.max() < size
            ):
                raise MessageError(
                    f"mask proposal from client {msg.header['client_id']} does not fit the "
                    f"layout of {size} weights"
                )
            masks.append(mask)
        limit = max(int(m.header["budget"]) for m in ordered)
        mask, union = consensus_mask(masks, limit)
        header = {
            "method": self.name,
            "round": int(round_),
            "size": size,
            "union_size": union,
            "budgets": {str(m.header["client_id"]): int(m.header["budget"]) for m in ordered},
            "digest": _digest(mask),
        }
        return Message("mask_consensus", header, {MASK: mask.astype(_index_dtype(size))})

    @property
    def adds_preweighted(self) -> bool:
        return self.mode == "delta"

    # ------------------------------------------------------------------ phase 2: upload
    def _upload(self, weights: AdapterWeights, req: UploadArgs) -> Message:
        """The upload; ``columns`` is this round's decoded ``mask_consensus`` message."""
        round_, client_id, num_examples, crypto, columns, _, _ = req
        if crypto is None or columns is None:
            raise ValueError("MaskCrypt uploads need the client's CKKS context and the consensus")
        require(columns.header, "round", "digest", "size")
        if columns.header["round"] != round_:
            raise MessageError(
                f"the mask consensus is for round {columns.header['round']}, not {round_}"
            )
        shapes = weights.shapes
        layout = self.layout(shapes)
        consensus = np.asarray(columns.tensors[MASK], np.int64)
        if layout.size != int(columns.header["size"]):
            raise MessageError(
                f"the consensus is for {columns.header['size']} weights, this client's layout "
                f"holds {layout.size}"
            )
        budget = maskcrypt_budget(self.cfg, client_id, shapes)
        mine = consensus[:budget]
        flat = layout.flatten(weights.factors)
        values = flat[mine] * (float(num_examples) if self.mode == "delta" else 1.0)
        flat[mine] = 0.0
        padded = layout.unflatten(flat)
        r = weights.rank
        plain = AdapterWeights(
            r,
            weights.alpha,
            {
                k: (b[:, :r].astype(np.float32), a[:r].astype(np.float32))
                for k, (b, a) in padded.items()
            },
            weights.head,
        )
        msg = adapter_to_upload(
            plain, method=self.name, round_=round_, client_id=client_id, num_examples=num_examples
        )
        blobs: list[bytes] = []
        if mine.size:
            n_ct = crypto.num_ciphertexts(mine.size)
            padded = np.concatenate([values, np.zeros(n_ct * crypto.slots - mine.size)])
            blobs = (
                self._encrypt_summed(crypto, padded)
                if self.adds_preweighted
                else self._encrypt(crypto, padded)
            )
        attach_ciphertexts(msg.tensors, blobs)
        msg.header.update(
            budget=int(budget),
            encrypted_values=int(mine.size),
            cipher_mode=self.mode,
            fingerprint=crypto.fingerprint,
            mask_digest=columns.header["digest"],
            r_max=self.r_max,
            ciphertexts=len(blobs),
        )
        return msg

    # ------------------------------------------------------------------ server: checks
    def check_upload(self, upload: Message, ctx: Any) -> None:
        """Cipher mode, this round's mask digest, the federation's ``r_max``, the encrypted-value
        count of the client's budget and its ciphertexts; then the plaintext checks."""
        h = upload.header
        cid = int(h["client_id"])
        cons = ctx.consensus
        if cons is None:
            raise ValueError("the MaskCrypt server checks uploads against this round's consensus")

        def bad(text: str, reason: str) -> ProtocolError:
            return ProtocolError(f"upload from client {cid}: {text}", client_id=cid, reason=reason)

        if h.get("cipher_mode") != self.mode:
            raise bad(
                f"cipher mode {h.get('cipher_mode')!r}, the server runs {self.mode!r}", "mode"
            )
        if h.get("mask_digest") != cons.header.get("digest"):
            raise bad("encrypted another mask than this round's consensus", "mask")
        if h.get("r_max") != self.r_max:
            raise bad(f"r_max {h.get('r_max')!r}, the federation's is {self.r_max}", "rank")
        geometry = self.upload_geometry(upload)
        want = min(maskcrypt_budget(self.cfg, cid, geometry), int(cons.header.get("size", 0)))
        if h.get("encrypted_values") != want:
            raise bad(
                f"{h.get('encrypted_values')!r} encrypted values; its budget gives {want}", "budget"
            )
        self._check_factors(upload, ctx)
        slots = ctx.crypto.slots if ctx.crypto is not None else 1
        self._check_ciphertexts(upload, ctx, -(-want // slots), f"{want} encrypted values")

    # ------------------------------------------------------------------ server
    def _aggregate(self, uploads: Sequence[Message], req: AggregateArgs) -> Message:
        round_, max_rank, crypto, consensus = req
        self._need_crypto(crypto, "server")
        if consensus is None:
            raise ValueError("the MaskCrypt server aggregates with this round's mask consensus")
        require(consensus.header, "digest")
        mask = np.asarray(consensus.tensors[MASK], np.int64)
        plain_msgs, blobs = [], []
        for u in uploads:
            require(
                u.header,
                "fingerprint",
                "ciphertexts",
                "cipher_mode",
                "mask_digest",
                "encrypted_values",
                "r_max",
            )
            h = u.header
            check_fingerprint(crypto.fingerprint, h["fingerprint"])
            if h["cipher_mode"] != self.mode:
                raise MessageError(
                    f"client {h.get('client_id')} used cipher mode {h['cipher_mode']!r}, the "
                    f"server runs {self.mode!r}"
                )
            if h["mask_digest"] != consensus.header["digest"]:
                raise MessageError(
                    f"client {h.get('client_id')} encrypted another mask than this round's "
                    "consensus"
                )
            if h["r_max"] != self.r_max or h["encrypted_values"] > mask.size:
                raise MessageError(
                    f"client {h.get('client_id')}: r_max {h['r_max']} / {h['encrypted_values']} "
                    f"encrypted values do not fit r_max {self.r_max} / consensus of {mask.size}"
                )
            expected = -(-int(h["encrypted_values"]) // crypto.slots)
            need = f"{h['encrypted_values']} encrypted values"
            plain, enc = self._split_encrypted(u, expected, need)
            plain_msgs.append(plain)
            blobs.append(enc)
        headers, weights, p, _ = self._decode_uploads(plain_msgs)
        r_max = self.r_max
        shapes = weights[0].shapes
        layout = self.layout(shapes)
        total = np.zeros(layout.size)
        for pi, w in zip(p, weights, strict=True):  # plaintext part: sum_i p_i w_i^plain
            total += pi * layout.flatten(w.factors)
        tensors: dict[str, np.ndarray] = {}
        for layer, (b, a) in layout.unflatten(total).items():
            tensors[f"{layer}{SEP}B"] = b.astype(np.float32)
            tensors[f"{layer}{SEP}A"] = a.astype(np.float32)
        summed: list[bytes] = []
        for c in range(max((len(b) for b in blobs), default=0)):
            senders = [i for i, b in enumerate(blobs) if len(b) > c]
            lists = [[blobs[i][c]] for i in senders]
            if self.mode == "delta":  # pre-weighted by n_i: the server only adds
                summed += crypto.add(lists)
            else:  # MaskCrypt's own protocol: the server weighs by p_i
                summed += crypto.weighted_sum(lists, [float(p[i]) for i in senders])
        used = max(int(h["encrypted_values"]) for h in headers)
        tensors[MASK] = mask[:used].astype(_index_dtype(layout.size))
        attach_ciphertexts(tensors, summed)
        return self._broadcast(
            tensors,
            weights,
            p,
            headers,
            round_=round_,
            r_max=max(r_max, max_rank or 0),
            ciphertexts=len(summed),
            encrypted_values=used,
            total_examples=int(sum(h["num_examples"] for h in headers)),
            fingerprint=crypto.fingerprint,
            cipher_mode=self.mode,
            layout_r_max=r_max,
        )

    # ------------------------------------------------------------------ client: new adapter
    def _receive(self, broadcast: Message, req: ReceiveArgs) -> AdapterWeights:
        rank, alpha, seed, crypto = req
        self._need_crypto(crypto, "client")
        h = broadcast.header
        require(h, "round", "ciphertexts", "encrypted_values", "total_examples", "fingerprint")
        require(h, "layout_r_max")
        check_fingerprint(crypto.fingerprint, h["fingerprint"])
        plain, blobs = split_ciphertexts(broadcast)
        mask = np.asarray(plain.tensors.pop(MASK), np.int64)
        layers, head = self._split(plain)
        r_max = int(h["layout_r_max"])
        shapes = {k: (t["B"].shape[0], t["A"].shape[1]) for k, t in layers.items()}
        layout = FactorLayout.build(shapes, r_max)
        flat = layout.flatten({k: (t["B"], t["A"]) for k, t in layers.items()})
        used = int(h["encrypted_values"])
        if used:
            dec = crypto.decrypt(blobs, len(blobs) * crypto.slots)[:used]
            if self.mode == "delta":
                dec = dec / float(h["total_examples"])
            flat[mask[:used]] += dec
        factors = {}
        for layer, (b, a) in layout.unflatten(flat).items():
            b, a = fit_rank(b, a, r_max, seed=int(h["round"]))  # as FedAvg's server does
            b, a = fedavg_truncate(b, a, min(rank, r_max))
            factors[layer] = fit_rank(b, a, rank, seed=seed)
        return AdapterWeights(rank=rank, alpha=alpha, factors=factors, head=dict(head))


def decode_upload(msg: Message):
    """The plaintext part of an upload (what an attacker reads), without the ciphertexts."""
    return upload_to_adapter(split_ciphertexts(msg)[0])
