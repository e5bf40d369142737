"""The contract every method fulfils (the tensor names of the wire are in :mod:`.wire`).

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

from ..adapters import AdapterWeights
from ..aggregation import normalize_weights, weighted_mean
from ..config import FederatedConfig
from ..messages import Message, MessageError
from .wire import SEP, adapter_to_upload, split_ciphertexts, upload_to_adapter

__all__ = ["AggregateArgs", "Method", "ReceiveArgs", "UploadArgs"]


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


class AggregateArgs(NamedTuple):
    """What the server's aggregation step knows besides the uploads (:meth:`Method.server_aggregate`)."""

    round_: int
    max_rank: int | None = None
    crypto: Any = None
    consensus: Message | None = None


class Method(ABC):
    """One aggregation method (server side and client side)."""

    name: str = ""
    #: whether the method needs CKKS contexts (clients: secret, server: public)
    needs_crypto: bool = False
    #: whether a round has a proposal -> consensus exchange before the upload (MaskCrypt)
    needs_consensus: bool = False

    def __init__(self, cfg: Any = None) -> None:
        #: the run's public configuration (a default one when none is given)
        self.cfg = cfg if cfg is not None else FederatedConfig(method=self.name)

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

    def server_aggregate(
        self,
        uploads: Sequence[Message],
        *,
        round_: int,
        max_rank: int | None = None,
        crypto: Any = None,
        consensus: Message | None = None,
    ) -> Message:
        """Combine the round's uploads into the broadcast.

        ``max_rank`` is the largest rank of any client in the federation (public), so clients
        that did not answer this round still find enough components in the broadcast. ``crypto``
        is the server's PUBLIC CKKS context; ``consensus`` MaskCrypt's decoded mask consensus.
        """
        return self._aggregate(uploads, AggregateArgs(round_, max_rank, crypto, consensus))

    @abstractmethod
    def _aggregate(self, uploads: Sequence[Message], req: AggregateArgs) -> Message:
        """A method's aggregation (see :meth:`server_aggregate`)."""

    def _need_crypto(self, crypto: Any, role: str) -> None:
        """A clear error when an encrypted method's step lacks its CKKS context."""
        if crypto is None:
            raise ValueError(
                {
                    "server": f"the {self.name} server needs the public CKKS context",
                    "upload": f"{self.name} uploads need the client's CKKS context",
                    "client": f"a {self.name} client needs its CKKS context to read the broadcast",
                }[role]
            )

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
        uploads: Sequence[Message], max_rank: int | None = None
    ) -> tuple[list[dict], list[AdapterWeights], np.ndarray, int]:
        """``(headers, adapters, p, r_max)`` of the plaintext uploads: weights ``p_i`` by sample
        count over the clients that answered; ``r_max`` the largest rank of the answering clients
        and of the federation (``max_rank``)."""
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
        return headers, weights, p, max([w.rank for w in weights] + [max_rank or 0])

    @staticmethod
    def _split_encrypted(upload: Message, expected: int, need: str) -> tuple[Message, list[bytes]]:
        """``(plaintext part, ciphertexts)`` of an upload that must carry ``expected``
        ciphertexts (``need`` says what sets that number, for the error)."""
        h = upload.header
        if h["ciphertexts"] != expected:
            raise MessageError(
                f"client {h.get('client_id')} sent {h['ciphertexts']} ciphertexts; {need} need "
                f"{expected}"
            )
        return split_ciphertexts(upload)

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
