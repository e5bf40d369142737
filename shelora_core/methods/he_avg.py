"""Encrypt everything: FedShield-LLM and the full-HE baseline.

FedShield-LLM (Mia & Amini, 2025) prunes the LoRA weights by magnitude (see
:mod:`shelora_core.pruning`), encrypts *all* of A and B with CKKS (their defaults: N=8192,
[60, 40, 40, 60], scale 2^40) and the server averages the ciphertexts homomorphically (a weighted
mean by sample count here; the authors' unweighted mean is selectable). Clients decrypt the
average and keep the first r_i components (factor-wise FedAvg with zero padding for heterogeneous
ranks). Full HE is the same without pruning: the reference for the paper's reduction percentages.

Each client encrypts its factors at its own rank: the layout is component-major
(:class:`~shelora_core.methods.packing.ComponentLayout`), so a rank-r client's values are a prefix
and it sends only the ciphertexts that prefix fills; the server adds ciphertext c over the clients
that sent it. (Before results version 4 every client encrypted its factors zero-padded to the
federation's largest rank, 1.71x the values at ranks 8/16/32: an inflated baseline.)

Their code encrypts the pruned zeros too, and so do we: sending only the surviving weights would
put every client's values in different slots, so ciphertexts could no longer be added slot-wise
(and the bitmap would reveal the magnitude pattern). The classification head is averaged in
plaintext as in every method here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..adapters import AdapterWeights, fit_rank, revive_missing
from ..aggregation import normalize_weights, weighted_mean
from ..ckks import check_fingerprint
from ..errors import ProtocolError
from ..messages import Message, MessageError, require
from ..pruning import l1_unstructured, prune_ratio
from .base import AggregateArgs, Method, ReceiveArgs, UploadArgs
from .packing import ComponentLayout
from .wire import SEP, attach_ciphertexts, is_ciphertext, split_ciphertexts

__all__ = ["FedShield", "FullHE"]


class FedShield(Method):
    name = "fedshield"
    needs_crypto = True
    prune = True

    def ratio(self, round_: int) -> float:
        """The pruned fraction in ``round_``: the paper's schedule, laid over
        ``cfg.prune_schedule_rounds`` rounds when set (0 for full HE or ``prune=False``)."""
        if not (self.prune and self.cfg.prune):
            return 0.0
        return prune_ratio(round_, schedule_rounds=self.cfg.prune_schedule_rounds)

    def _upload(self, weights: AdapterWeights, req: UploadArgs) -> Message:
        round_, client_id, num_examples, crypto, _, _, _ = req
        self._need_crypto(crypto, "upload")
        r_max = max(self.cfg.client_ranks)
        ratio = self.ratio(round_)
        shapes = weights.shapes
        pruned = {
            layer: (l1_unstructured(b, ratio), l1_unstructured(a, ratio))
            for layer, (b, a) in weights.factors.items()
        }
        # component-major: the client's own rank is a prefix, sent without zero padding
        flat = ComponentLayout.build(shapes, r_max).flatten(pruned)
        n_ct = crypto.num_ciphertexts(flat.size)  # the last one zero-padded: sums are slot-wise
        blobs = self._encrypt(
            crypto, np.concatenate([flat, np.zeros(n_ct * crypto.slots - flat.size)])
        )
        tensors: dict[str, np.ndarray] = {}
        attach_ciphertexts(tensors, blobs)
        for k, v in weights.head.items():
            tensors[f"head{SEP}{k}"] = np.asarray(v, np.float32)
        header = {
            "method": self.name,
            "round": round_,
            "client_id": client_id,
            "num_examples": int(num_examples),
            "rank": weights.rank,
            "alpha": float(weights.alpha),
            "fingerprint": crypto.fingerprint,
            "shapes": {k: list(v) for k, v in shapes.items()},
            "r_max": r_max,
            "ciphertexts": len(blobs),
            "prune_ratio": ratio,
        }
        return Message("upload", header, tensors)

    def upload_geometry(self, upload: Message) -> dict[str, tuple[int, int]]:
        """The layer shapes the header declares (the factors travel only as ciphertexts)."""
        cid = upload.header.get("client_id")
        shapes = upload.header.get("shapes")
        try:
            out = {str(k): (int(v[0]), int(v[1])) for k, v in shapes.items() if len(v) == 2}
            if len(out) != len(shapes) or not out or min(min(v) for v in out.values()) < 1:
                raise ValueError
        except (AttributeError, TypeError, ValueError):
            raise ProtocolError(
                f"upload from client {cid}: header 'shapes' = {shapes!r:.80} is not a map of "
                "layer -> [m, n]",
                client_id=cid,
                reason="shape",
            ) from None
        for name in upload.tensors:
            if not (name.startswith(f"head{SEP}") or is_ciphertext(name)):
                raise ProtocolError(
                    f"upload from client {cid}: unexpected plaintext tensor {name!r} (this method "
                    "sends its factors only as ciphertexts)",
                    client_id=cid,
                    reason="shape",
                )
        return out

    def check_upload(self, upload: Message, ctx: Any) -> None:
        """The federation's ``r_max`` (not the client's word for it), the head within the value
        bound, and the ciphertext count the padded factor layout needs."""
        from ..validation import check_plain_values

        h = upload.header
        cid = h.get("client_id")
        r_max = max(self.cfg.client_ranks)
        if h.get("r_max") != r_max:
            raise ProtocolError(
                f"upload from client {cid} declares r_max {h.get('r_max')!r}; the federation's "
                f"largest rank is {r_max}",
                client_id=cid,
                reason="rank",
            )
        check_plain_values(upload, skip=is_ciphertext)
        rank = self.cfg.client_rank(int(h["client_id"]))
        size = ComponentLayout.build(self.upload_geometry(upload), r_max).prefix(rank)
        slots = ctx.crypto.slots if ctx.crypto is not None else 1
        self._check_ciphertexts(upload, ctx, -(-size // slots), f"factors of rank {rank}")

    def _aggregate(self, uploads: Sequence[Message], req: AggregateArgs) -> Message:
        round_, max_rank, crypto, _ = req
        self._need_crypto(crypto, "server")
        blobs, sizes = [], []
        for u in uploads:
            require(
                u.header, "fingerprint", "ciphertexts", "num_examples", "shapes", "r_max", "rank"
            )
            check_fingerprint(crypto.fingerprint, u.header["fingerprint"])
            blobs.append(split_ciphertexts(u)[1])
            sizes.append(u.header["num_examples"])
        if any(u.header["shapes"] != uploads[0].header["shapes"] for u in uploads):
            raise MessageError("clients uploaded different layer shapes")
        p = (
            normalize_weights(sizes)
            if self.cfg.fedshield_weighted
            else np.full(len(sizes), 1.0 / len(sizes))
        )
        # ciphertext c summed over the clients whose rank reaches it (a missing entry is a zero
        # of the zero-padded factors: the weighted mean over every answering client)
        summed = []
        for c in range(max(len(b) for b in blobs)):
            senders = [i for i, b in enumerate(blobs) if len(b) > c]
            summed += crypto.weighted_sum(
                [[blobs[i][c]] for i in senders], [float(p[i]) for i in senders]
            )
        tensors = {}
        attach_ciphertexts(tensors, summed)
        heads = [self._split(u)[1] for u in uploads]
        for k in heads[0]:
            tensors[f"head{SEP}{k}"] = weighted_mean([h[k] for h in heads], p).astype(np.float32)
        h0 = uploads[0].header
        header = {
            "method": self.name,
            "round": round_,
            "max_rank": max(self.cfg.client_ranks),  # the federation's, not a client's word
            # the largest rank that answered: components beyond it are empty (zero-padded)
            "live_rank": max(int(u.header["rank"]) for u in uploads),
            "shapes": h0["shapes"],
            "ciphertexts": len(summed),
            "fingerprint": crypto.fingerprint,
            "clients": [u.header["client_id"] for u in uploads],
        }
        return Message("broadcast", header, tensors)

    def _receive(self, broadcast: Message, req: ReceiveArgs) -> AdapterWeights:
        rank, alpha, seed, crypto = req
        self._need_crypto(crypto, "client")
        h = broadcast.header
        require(h, "round", "shapes", "max_rank", "live_rank", "ciphertexts", "fingerprint")
        check_fingerprint(crypto.fingerprint, h["fingerprint"])
        shapes = {k: tuple(v) for k, v in h["shapes"].items()}
        r_max = int(h["max_rank"])
        layout = ComponentLayout.build(shapes, r_max)
        plain, blobs = split_ciphertexts(broadcast)
        flat = crypto.decrypt(blobs, len(blobs) * crypto.slots)[: layout.size]
        parts = layout.unflatten(flat)
        factors = {}
        for layer in shapes:  # the uploads' layer order
            b, a = parts[layer]
            # empty components revive from the round's shared seed, as FedAvg's server does
            b, a = revive_missing(b, a, live_rank=int(h["live_rank"]), round_=int(h["round"]))
            factors[layer] = fit_rank(b[:, :rank], a[:rank], rank, seed=seed)
        _, head = self._split(plain)
        return AdapterWeights(rank=rank, alpha=alpha, factors=factors, head=head)


class FullHE(FedShield):
    """Every LoRA parameter encrypted, no pruning: the reference for reduction percentages."""

    name = "full_he"
    prune = False
