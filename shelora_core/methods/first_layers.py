"""``shelora+first-layers``: SHE-LoRA plus full encryption of the layers DAGER reads (ours).

DAGER (Petrov et al., NeurIPS 2024) inverts the update of the *first two* decoder layers: layer 0's
inputs are one vector per vocabulary token (token filtering), layer 1's are computable for every
prefix (sentence search). SHE-LoRA leaves ``B`` in plaintext and hides only a few columns of
``A``; in round 1 (``B = 0``, ``A`` the public seeded init) the whole gradient is in ``B``, and an
attacker who knows the hidden columns checks the visible coordinates of ``grad A`` in later
rounds. The cheapest change that takes those layers away from the attacker is to send *nothing*
of them in plaintext:

* ``encrypt="dw"`` (default): the client encrypts its weighted update of each protected layer,
  ``n_i s_i B_i A_i`` (m x n values, the quantity SHE-LoRA's ``delta`` mode encrypts for its
  columns, here for every column). The server adds the ciphertexts slot-wise (equal layouts
  whatever the client's rank), every client decrypts ``sum_i n_i s_i B_i A_i``, divides by the
  total sample count and truncates it to its rank by SVD: FlexLoRA's aggregate of those layers,
  exactly (up to CKKS error). The other layers are aggregated by SHE-LoRA as before. Cost:
  ``m x n`` values per protected layer, whatever the rank.
* ``encrypt="factors"``: the client encrypts ``B_i`` and ``A_i`` themselves (``r_i (m + n)``
  values per layer, fewer for small ranks). The server could then only average factors (biased,
  and heterogeneous ranks need zero padding): measured for its upload cost only; a server asked to
  aggregate such uploads refuses.

The other layers travel exactly as SHE-LoRA sends them (:class:`~shelora_core.methods.SHELoRA`'s
own ``make_upload``, header ``method`` included); the protected layers' ciphertexts follow
SHE-LoRA's in the same message, with their count in ``header["first_layers"]``.

**What it does not stop.** With every layer's ``B = 0`` in round 1 the server still computes every
layer's input exactly for any candidate prefix, so DAGER's sentence search can run at a deeper
plaintext layer with the whole vocabulary as candidates (no layer-0 token filter): far more
expensive, not ruled out (:func:`shelora_core.attacks.protection.deep_layer_probe`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..adapters import AdapterWeights, fit_rank, layer_index
from ..aggregation import SVDFactors, flexlora_redistribute, lora_scaling
from ..ckks import ClientCrypto, check_fingerprint
from ..config import FederatedConfig
from ..errors import ProtocolError
from ..messages import Message, MessageError, require
from .base import AggregateArgs, Method, ReceiveArgs, UploadArgs
from .packing import ENCRYPT_MODES, first_layers_layout
from .shelora import SHELoRA
from .wire import SEP, attach_ciphertexts, split_ciphertexts

__all__ = ["ENCRYPT_MODES", "FirstLayersSHELoRA"]


class FirstLayersSHELoRA(Method):
    """SHE-LoRA with the LoRA update of ``protected`` layers fully encrypted (ours).

    Args:
        cfg: the configuration (budgets, cipher mode ``delta``; ``first_layers`` and
            ``first_layers_encrypt`` give the defaults of the two settings below).
        protected: layer indices (the ``i`` of ``layers.<i>.`` / ``layer.<i>.`` in the adapted
            module's name) sent only as ciphertexts. Defaults to ``cfg.first_layers``, ``(0, 1)``:
            the two layers DAGER reads.
        encrypt: ``"dw"`` or ``"factors"`` (see the module docstring).
    """

    name = "shelora+first-layers"
    needs_crypto = True

    def __init__(
        self,
        cfg: FederatedConfig | None = None,
        *,
        protected: Sequence[int] | None = None,
        encrypt: str | None = None,
    ) -> None:
        super().__init__(cfg)
        if self.cfg.cipher_mode != "delta":
            raise ValueError(
                f"{self.name} is built on SHE-LoRA's delta mode (got cipher_mode="
                f"{self.cfg.cipher_mode!r}); set cipher_mode='delta'"
            )
        encrypt = self.cfg.first_layers_encrypt if encrypt is None else encrypt
        if encrypt not in ENCRYPT_MODES:
            raise ValueError(f"unknown encrypt mode {encrypt!r}; choose one of {ENCRYPT_MODES}")
        protected = self.cfg.first_layers if protected is None else protected
        self.protected = tuple(sorted({int(i) for i in protected}))
        self.encrypt = encrypt
        self.shelora = SHELoRA(self.cfg.replace(method="shelora"))

    def split_layers(self, names: Sequence[str]) -> tuple[list[str], list[str]]:
        """``(protected layer names, the others)``."""
        prot = [n for n in names if layer_index(n) in self.protected]
        return prot, [n for n in names if n not in prot]

    adds_preweighted = True  # type: ignore[assignment]  # dW * n_i * s, summed by the server

    # ------------------------------------------------------------------ client: upload
    def _upload(self, weights: AdapterWeights, req: UploadArgs) -> Message:
        """SHE-LoRA's upload of the other layers, then the protected layers' ciphertexts."""
        round_, client_id, num_examples, crypto, columns, _, _ = req
        self._need_crypto(crypto, "upload")
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
        shapes = {k: v for k, v in weights.shapes.items() if k in prot}
        layout = first_layers_layout(shapes, crypto.slots, encrypt=self.encrypt, rank=weights.rank)
        s = lora_scaling(weights.alpha, weights.rank)
        arrays = {}
        for k in prot:
            b, a = (np.asarray(x, np.float64) for x in weights.factors[k])
            if self.encrypt == "dw":
                arrays[f"{k}{SEP}dW"] = (num_examples * s * (b @ a)).ravel()
            else:
                arrays[f"{k}{SEP}B"], arrays[f"{k}{SEP}A"] = b.ravel(), a.ravel()
        blobs = self._encrypt_summed(crypto, layout.pack(arrays))
        _, before = split_ciphertexts(msg)
        attach_ciphertexts(msg.tensors, list(before) + blobs)
        msg.header["ciphertexts"] = len(before) + len(blobs)
        msg.header["method"] = self.name
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
        """``(the SHE-LoRA part of a message, the protected layers' ciphertexts)``."""
        require(msg.header, "first_layers", "ciphertexts")
        c = int(msg.header["first_layers"]["ciphertexts"])
        plain, blobs = split_ciphertexts(msg)
        if not 0 <= c <= len(blobs):
            raise MessageError(
                f"the header promises {c} first-layer ciphertexts, the message holds {len(blobs)}"
            )
        head = blobs[: len(blobs) - c]
        she = Message(msg.kind, dict(msg.header), dict(plain.tensors))
        attach_ciphertexts(she.tensors, head)
        she.header["ciphertexts"] = len(head)
        she.header.pop("first_layers")
        she.header["method"] = "shelora"
        return she, blobs[len(blobs) - c :]

    # ------------------------------------------------------------------ server: checks
    def upload_geometry(self, upload: Message) -> dict[str, tuple[int, int]]:
        """The plaintext (SHE-LoRA) layers' shapes and the protected layers' declared shapes."""
        out = super().upload_geometry(upload)
        fl = upload.header.get("first_layers")
        cid = upload.header.get("client_id")
        try:
            prot = {str(k): (int(v[0]), int(v[1])) for k, v in fl["shapes"].items()}
        except (KeyError, TypeError, ValueError, IndexError):
            raise ProtocolError(
                f"upload from client {cid}: header 'first_layers' = {fl!r:.80} does not declare "
                "the protected layers' shapes",
                client_id=cid,
                reason="header",
            ) from None
        if set(prot) & set(out):
            raise ProtocolError(
                f"upload from client {cid} sends protected layers {sorted(set(prot) & set(out))} "
                "in plaintext too",
                client_id=cid,
                reason="shape",
            )
        return {**out, **prot}

    def agreement(self, upload: Message) -> Any:
        return self.shelora.agreement(upload)

    def check_upload(self, upload: Message, ctx: Any) -> None:
        """The protected layers are exactly the configured blocks, sent as ``dw`` in the
        ciphertext count their shapes need; the rest is a SHE-LoRA upload."""
        h = upload.header
        cid = int(h["client_id"])
        fl = h["first_layers"]
        geometry = self.upload_geometry(upload)
        prot, _ = self.split_layers(list(geometry))

        def bad(text: str, reason: str) -> ProtocolError:
            return ProtocolError(f"upload from client {cid}: {text}", client_id=cid, reason=reason)

        if fl.get("encrypt") != "dw":
            raise bad(
                f"protected layers encrypted as {fl.get('encrypt')!r}; only 'dw' uploads add up "
                "across ranks (set first_layers_encrypt='dw')",
                "mode",
            )
        if set(fl["shapes"]) != set(prot) or set(fl.get("layers", ())) != set(prot):
            raise bad(
                f"protects layers {sorted(fl['shapes'])[:3]}...; blocks {list(self.protected)} "
                f"are {sorted(prot)[:3]}...",
                "shape",
            )
        shapes = {k: geometry[k] for k in prot}
        slots = ctx.crypto.slots if ctx.crypto is not None else 1
        need = -(-first_layers_layout(shapes, slots).total // slots)
        if fl.get("ciphertexts") != need:
            raise bad(
                f"{fl.get('ciphertexts')!r} first-layer ciphertexts; its protected layers need "
                f"{need}",
                "ciphertexts",
            )
        try:
            she, blobs = self.split_upload(upload)
        except MessageError as exc:
            raise bad(str(exc), "ciphertexts") from exc
        self.shelora.check_upload(she, ctx)
        rest = Message(she.kind, {**she.header, "ciphertexts": len(blobs)}, {})
        attach_ciphertexts(rest.tensors, blobs)
        self._check_ciphertexts(rest, ctx, need, "its protected layers")

    # ------------------------------------------------------------------ server
    def _aggregate(self, uploads: Sequence[Message], req: AggregateArgs) -> Message:
        """SHE-LoRA's aggregate of the other layers; the slot-wise sum of the protected ones."""
        round_, max_rank, crypto, _ = req
        self._need_crypto(crypto, "server")
        parts, lists = [], []
        for u in uploads:
            require(u.header, "first_layers", "fingerprint")
            check_fingerprint(crypto.fingerprint, u.header["fingerprint"])
            fl = u.header["first_layers"]
            if fl.get("encrypt") != "dw":
                raise MessageError(
                    f"client {u.header.get('client_id')} encrypted its protected layers as "
                    f"{fl.get('encrypt')!r}; only 'dw' uploads add up across ranks "
                    "(set first_layers_encrypt='dw')"
                )
            first = uploads[0].header["first_layers"].get("shapes")
            if fl.get("shapes") != first:
                raise MessageError(
                    f"client {u.header.get('client_id')} protected layers {fl.get('shapes')}, "
                    f"client {uploads[0].header.get('client_id')} protected {first}: every client "
                    "must protect the same layers (the same first_layers setting)"
                )
            shapes = {k: tuple(v) for k, v in fl["shapes"].items()}
            expected = -(-first_layers_layout(shapes, crypto.slots).total // crypto.slots)
            if int(fl.get("ciphertexts", -1)) != expected:
                raise MessageError(
                    f"client {u.header.get('client_id')} sent {fl.get('ciphertexts')} first-layer "
                    f"ciphertexts; its protected layers {fl['shapes']} need {expected}"
                )
            she, blobs = self.split_upload(u)
            parts.append(she)
            lists.append(blobs)
        bc = self.shelora.server_aggregate(parts, round_=round_, max_rank=max_rank, crypto=crypto)
        summed = crypto.add(lists)
        _, before = split_ciphertexts(bc)
        attach_ciphertexts(bc.tensors, list(before) + summed)
        fl0 = uploads[0].header["first_layers"]
        bc.header.update(
            method=self.name,
            ciphertexts=len(before) + len(summed),
            first_layers={
                "layers": fl0["layers"],
                "shapes": fl0["shapes"],
                "encrypt": "dw",
                "ciphertexts": len(summed),
            },
        )
        return bc

    # ------------------------------------------------------------------ client: new adapter
    def _receive(self, broadcast: Message, req: ReceiveArgs) -> AdapterWeights:
        rank, alpha, seed, crypto = req
        self._need_crypto(crypto, "client")
        require(broadcast.header, "first_layers", "total_examples", "fingerprint")
        check_fingerprint(crypto.fingerprint, broadcast.header["fingerprint"])
        she, blobs = self.split_upload(broadcast)
        out = self.shelora.client_weights(she, rank=rank, alpha=alpha, seed=seed, crypto=crypto)
        dws = self.client_decrypt(
            blobs, broadcast.header, crypto, int(broadcast.header["total_examples"])
        )
        scaling = lora_scaling(alpha, rank)
        for layer, dw in dws.items():
            u, s, vt = np.linalg.svd(dw, full_matrices=False)
            k = min(rank, s.shape[0])
            b, a = flexlora_redistribute(SVDFactors(u=u, s=s, vt=vt), k, scaling)
            out.factors[layer] = fit_rank(b, a, rank, seed=seed)
        out.factors = dict(sorted(out.factors.items()))
        return out

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
