"""The contract every method fulfils, and the plaintext wire encoding of a client upload.

A method has two sides that never share a Python object:

* ``client_weights(broadcast, ...)`` runs on a client: from the server's broadcast (bytes, decoded)
  it produces the client's starting adapter for the round.
* ``server_aggregate(uploads, ...)`` runs on the server: from the clients' uploads (bytes, decoded)
  it produces the broadcast.

Uploads and broadcasts are :class:`shelora_core.messages.Message` objects; the driver moves only
their bytes.

A method with ``needs_consensus`` (MaskCrypt) adds an exchange inside the round: after training the
client sends ``make_proposal(...)``, the server answers ``server_consensus(...)``, and the client's
``make_upload`` and the server's ``server_aggregate`` both take that consensus.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from ..adapters import AdapterWeights, fit_rank
from ..aggregation import normalize_weights, weighted_mean
from ..messages import Message, MessageError, require

__all__ = [
    "Method",
    "ReceiveArgs",
    "UploadArgs",
    "adapter_to_upload",
    "attach_ciphertexts",
    "fit_rank",
    "is_ciphertext",
    "split_ciphertexts",
    "upload_to_adapter",
]

SEP = "|"
#: tensor-name prefix of serialized CKKS ciphertexts inside a message (``enc|0``, ``enc|1``, ...)
ENC = "enc"


def is_ciphertext(tensor_name: str) -> bool:
    """Whether a message tensor holds a serialized ciphertext (``enc|<c>``)."""
    return tensor_name.startswith(ENC + SEP)


def attach_ciphertexts(tensors: dict[str, np.ndarray], blobs: Sequence[bytes]) -> None:
    """Store serialized ciphertexts in a message's tensors as uint8 arrays ``enc|c``."""
    for c, blob in enumerate(blobs):
        tensors[f"{ENC}{SEP}{c}"] = np.frombuffer(blob, dtype=np.uint8)


def split_ciphertexts(msg: Message) -> tuple[Message, list[bytes]]:
    """``(msg without its ciphertexts, the ciphertexts in order)``; the count is in the header."""
    require(msg.header, "ciphertexts")
    blobs = [msg.tensors[f"{ENC}{SEP}{c}"].tobytes() for c in range(msg.header["ciphertexts"])]
    rest = {k: v for k, v in msg.tensors.items() if not k.startswith(ENC + SEP)}
    return Message(msg.kind, dict(msg.header), rest), blobs


def adapter_to_upload(
    weights: AdapterWeights, *, method: str, round_: int, client_id: int, num_examples: int
) -> Message:
    """A client's plaintext upload: every layer's B and A, and the head."""
    tensors: dict[str, np.ndarray] = {}
    for layer, (b, a) in weights.factors.items():
        tensors[f"{layer}{SEP}B"] = np.asarray(b, np.float32)
        tensors[f"{layer}{SEP}A"] = np.asarray(a, np.float32)
    for k, v in weights.head.items():
        tensors[f"head{SEP}{k}"] = np.asarray(v, np.float32)
    header = {
        "method": method,
        "round": int(round_),
        "client_id": int(client_id),
        "num_examples": int(num_examples),
        "rank": int(weights.rank),
        "alpha": float(weights.alpha),
    }
    return Message("upload", header, tensors)


def upload_to_adapter(msg: Message) -> tuple[dict, AdapterWeights]:
    """Inverse of :func:`adapter_to_upload`; checks that every layer has a B and an A of rank r."""
    require(msg.header, "method", "round", "client_id", "num_examples", "rank", "alpha")
    h = msg.header
    rank = int(h["rank"])
    parts: dict[str, dict[str, np.ndarray]] = {}
    head: dict[str, np.ndarray] = {}
    for name, arr in msg.tensors.items():
        owner, _, key = name.rpartition(SEP)
        if owner == "head":
            head[key] = arr
        elif key in ("A", "B"):
            parts.setdefault(owner, {})[key] = arr
        else:
            raise MessageError(f"upload tensor {name!r} is neither a LoRA factor nor the head")
    factors = {}
    for layer, ab in parts.items():
        if set(ab) != {"A", "B"}:
            raise MessageError(f"upload for layer {layer!r} lacks { ({'A', 'B'} - set(ab)) }")
        b, a = ab["B"], ab["A"]
        if b.ndim != 2 or a.ndim != 2 or b.shape[1] != rank or a.shape[0] != rank:
            raise MessageError(
                f"upload layer {layer!r}: B {b.shape} and A {a.shape} do not match rank {rank}"
            )
        factors[layer] = (b, a)
    return h, AdapterWeights(rank=rank, alpha=float(h["alpha"]), factors=factors, head=head)


class UploadArgs(NamedTuple):
    """What a client's upload step knows besides its adapter (see :meth:`Method.make_upload`)."""

    round_: int
    client_id: int
    num_examples: int
    crypto: Any = None
    columns: Any = None
    start: AdapterWeights | None = None
    seed: int = 0


class ReceiveArgs(NamedTuple):
    """What a client's receive step knows besides the broadcast (:meth:`Method.client_weights`)."""

    rank: int
    alpha: float
    seed: int = 0
    crypto: Any = None


class Method(ABC):
    """One aggregation method (server side and client side)."""

    name: str = ""
    #: whether the method needs CKKS contexts (clients: secret, server: public)
    needs_crypto: bool = False
    #: whether a round has a proposal -> consensus exchange before the upload (MaskCrypt)
    needs_consensus: bool = False

    def __init__(self, cfg: Any = None) -> None:
        self.cfg = cfg

    def make_upload(
        self,
        weights: AdapterWeights,
        *,
        round_: int,
        client_id: int,
        num_examples: int,
        crypto: Any = None,
        columns: Any = None,
        start: AdapterWeights | None = None,
        seed: int = 0,
    ) -> Message:
        """The client's upload after local training.

        Args:
            weights: the client's trained adapter.
            round_, client_id, num_examples: who uploads, for which round, with what weight.
            crypto: the client's secret CKKS context (encrypted methods).
            columns: SHE-LoRA's ordered column list G per layer; MaskCrypt's decoded consensus.
            start: the adapter the client started the round from (local DP privatizes the update).
            seed: seeds any randomness of the upload (DP noise).
        """
        return self._upload(
            weights,
            UploadArgs(round_, client_id, num_examples, crypto, columns, start, seed),
        )

    def _upload(self, weights: AdapterWeights, req: UploadArgs) -> Message:
        """A method's upload (plaintext factors and head by default)."""
        return adapter_to_upload(
            weights,
            method=self.name,
            round_=req.round_,
            client_id=req.client_id,
            num_examples=req.num_examples,
        )

    @abstractmethod
    def server_aggregate(
        self,
        uploads: Sequence[Message],
        *,
        round_: int,
        max_rank: int | None = None,
        crypto: Any = None,
    ) -> Message:
        """Combine the round's uploads into the broadcast.

        ``max_rank`` is the largest rank of any client in the federation (public), so clients
        that did not answer this round still find enough components in the broadcast.
        """

    def client_weights(
        self, broadcast: Message, *, rank: int, alpha: float, seed: int = 0, crypto: Any = None
    ) -> AdapterWeights:
        """The client's starting adapter (of its own rank) for the next round.

        ``seed`` seeds the components the client must re-initialise; ``crypto`` is its secret
        CKKS context (encrypted methods).
        """
        return self._receive(broadcast, ReceiveArgs(rank, alpha, seed, crypto))

    @abstractmethod
    def _receive(self, broadcast: Message, req: ReceiveArgs) -> AdapterWeights:
        """A method's reading of its broadcast (see :meth:`client_weights`)."""

    # shared helpers ---------------------------------------------------------------
    @staticmethod
    def _decode_uploads(
        uploads: Sequence[Message],
    ) -> tuple[list[dict], list[AdapterWeights], np.ndarray]:
        if not uploads:
            raise ValueError("no uploads to aggregate: at least one client must answer a round")
        decoded = [upload_to_adapter(u) for u in uploads]
        headers = [h for h, _ in decoded]
        weights = [w for _, w in decoded]
        layers = set(weights[0].factors)
        for h, w in decoded[1:]:
            if set(w.factors) != layers:
                raise MessageError(
                    f"client {h['client_id']} uploaded other layers than client "
                    f"{headers[0]['client_id']}"
                )
        # p_i by sample count over the clients that answered (re-normalised on dropouts)
        p = normalize_weights([h["num_examples"] for h in headers])
        return headers, weights, p

    def _broadcast(
        self,
        tensors: dict[str, np.ndarray],
        weights: Sequence[AdapterWeights],
        p: np.ndarray,
        headers: Sequence[dict],
        *,
        round_: int,
        r_max: int,
        **extra: Any,
    ) -> Message:
        """The broadcast: ``tensors`` plus the plaintext-averaged head, and the common header."""
        for k, v in self._mean_head(weights, p).items():
            tensors[f"head{SEP}{k}"] = v
        header = {
            "method": self.name,
            "round": round_,
            "max_rank": r_max,
            **extra,
            "clients": [h["client_id"] for h in headers],
        }
        return Message("broadcast", header, tensors)

    @staticmethod
    def _mean_head(weights: Sequence[AdapterWeights], p: np.ndarray) -> dict[str, np.ndarray]:
        return {
            k: weighted_mean([w.head[k] for w in weights], p).astype(np.float32)
            for k in weights[0].head
        }

    @staticmethod
    def _split(msg: Message) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, np.ndarray]]:
        layers: dict[str, dict[str, np.ndarray]] = {}
        head: dict[str, np.ndarray] = {}
        for name, arr in msg.tensors.items():
            owner, _, key = name.rpartition(SEP)
            (head if owner == "head" else layers.setdefault(owner, {}))[key] = arr
        return layers, head
