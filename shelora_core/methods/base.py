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
from ..ckks.errors import CKKSError
from ..config import FederatedConfig
from ..errors import ConfigError, ProtocolError, SheloraError
from ..messages import Message, MessageError
from .wire import ENC, SEP, adapter_to_upload, is_ciphertext, split_ciphertexts, upload_to_adapter

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
    #: the method named in upload headers (``name`` unless uploads are another method's)
    wire_name: str = ""

    def __init__(self, cfg: Any = None) -> None:
        #: the run's public configuration (a default one when none is given)
        self.cfg = cfg if cfg is not None else FederatedConfig(method=self.name)
        self.wire_name = self.wire_name or self.name

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
        try:
            return self._receive(broadcast, ReceiveArgs(rank, alpha, seed, crypto))
        except SheloraError:
            raise
        except (KeyError, IndexError, TypeError, ValueError) as exc:  # a layout it cannot read
            raise MessageError(
                f"the {self.name} broadcast of round {broadcast.header.get('round')} is "
                f"malformed ({type(exc).__name__}: {exc}); the client does not use it"
            ) from exc

    @abstractmethod
    def _receive(self, broadcast: Message, req: ReceiveArgs) -> AdapterWeights:
        """A method's reading of its broadcast (see :meth:`client_weights`)."""

    # clients: encrypted sums that stay representable ------------------------------
    #: the stated bound on the entries a client pre-weights and encrypts for an add-only sum
    #: (SHE-LoRA's dW columns, MaskCrypt's factor entries): honest LoRA updates are far below
    UPDATE_BOUND = 1.0

    @property
    def adds_preweighted(self) -> bool:
        """Whether clients multiply their encrypted values by their sample count and the server
        only adds them, so the decrypted sum grows with the clients and their data."""
        return False

    def check_sum_range(self, max_examples: int, max_abs: float) -> None:
        """Refuse a setup whose encrypted sums could leave the range CKKS represents.

        The server adds up to ``clients_per_round`` ciphertexts holding ``n_i * x`` with
        ``|x| <= UPDATE_BOUND``; ``clients_per_round * max_examples * UPDATE_BOUND`` must stay
        below ``max_abs`` (:attr:`~shelora_core.ckks.ClientCrypto.max_abs`), or a legal round
        could decrypt to a wrapped-around value without any error.

        Raises:
            ConfigError: naming the bound, the parameters' range and the fixes.
        """
        if not self.adds_preweighted:
            return
        k = self.cfg.clients_per_round
        need = k * int(max_examples) * self.UPDATE_BOUND
        if need >= max_abs:
            raise ConfigError(
                f"{self.name}: the server adds up to {k} clients' ciphertexts pre-weighted by up "
                f"to {max_examples} examples: sums up to {need:.3g}, but the CKKS parameters "
                f"represent |x| < {max_abs:.3g}. Sample fewer clients per round "
                "(client_fraction), use fewer examples per client, or choose ckks_params with "
                "more integer bits (a larger first prime or a smaller scale)"
            )

    def _encrypt_summed(self, crypto: Any, values: np.ndarray) -> list[bytes]:
        """Encrypt values the server adds across up to ``clients_per_round`` clients: each
        must stay below ``max_abs / clients_per_round`` so that the sum does."""
        k = self.cfg.clients_per_round
        limit = crypto.max_abs / k
        x = np.asarray(values, np.float64)
        peak = float(np.max(np.abs(x))) if x.size else 0.0
        if not peak < limit:
            raise CKKSError(
                f"{self.name}: a value of {peak:.3g} to encrypt exceeds {limit:.3g}, the share of "
                f"each of {k} clients in the range |x| < {crypto.max_abs:.3g} their encrypted sum "
                "must stay in; the local update diverged (lower lr) or the sample count is too "
                "large for these CKKS parameters"
            )
        return self._encrypt(crypto, x)

    def _encrypt(self, crypto: Any, values: np.ndarray) -> list[bytes]:
        """Every fresh upload ciphertext goes through here: ``crypto.encrypt(values)``, seeded
        (:mod:`shelora_core.ckks.seeded`, about half the bytes) when the config's
        ``seeded_uploads`` is set."""
        if self.cfg.seeded_uploads:
            return crypto.encrypt(values, seeded=True)
        return crypto.encrypt(values)

    # server: per-client checks (shelora_core.validation calls these) -------------
    def upload_geometry(self, upload: Message) -> dict[str, tuple[int, int]]:
        """``(m, n)`` of every layer an upload adapts (from its plaintext factors by default).

        Raises:
            ProtocolError: a tensor that is neither a factor, the head nor a ciphertext, or a
                layer without both factors.
        """
        cid = upload.header.get("client_id")
        parts: dict[str, dict[str, tuple[int, ...]]] = {}
        for name, arr in upload.tensors.items():
            owner, _, key = name.rpartition(SEP)
            if owner in ("head", ENC) or key in self.extra_tensors:
                continue
            if key not in ("A", "B") or arr.ndim != 2:
                raise ProtocolError(
                    f"upload from client {cid}: tensor {name!r} {arr.shape} is neither a 2-D LoRA "
                    "factor, the head nor a ciphertext",
                    client_id=cid,
                    reason="shape",
                )
            parts.setdefault(owner, {})[key] = arr.shape
        out = {}
        for layer, ab in parts.items():
            if set(ab) != {"A", "B"}:
                raise ProtocolError(
                    f"upload from client {cid}: layer {layer!r} lacks its "
                    f"{sorted({'A', 'B'} - set(ab))} factor",
                    client_id=cid,
                    reason="shape",
                )
            out[layer] = (int(ab["B"][0]), int(ab["A"][1]))
        return out

    #: tensor keys (``<owner>|<key>``) a method adds besides factors, head and ciphertexts
    extra_tensors: tuple[str, ...] = ()

    def agreement(self, upload: Message) -> Any:
        """What every upload of a round must share besides the geometry (hashable; e.g.
        SHE-LoRA's column list). The server takes the value most uploads carry."""
        return None

    def check_upload(self, upload: Message, ctx: Any) -> None:
        """Method-specific checks of one upload (``ctx`` a
        :class:`~shelora_core.validation.RoundContext`); :class:`ProtocolError` naming the client
        and the reason. The default: plaintext factors of the client's rank within the value
        bound, and no ciphertexts."""
        self._check_factors(upload, ctx)
        self._check_ciphertexts(upload, ctx, 0, "a plaintext method")

    def _check_factors(self, upload: Message, ctx: Any) -> None:
        """Plaintext factors ``B`` (m x r) and ``A`` (r x n) at the client's configured rank, and
        every plaintext value within :data:`~shelora_core.validation.MAX_ABS_VALUE`."""
        from ..validation import check_plain_values

        cid = int(upload.header["client_id"])
        r = ctx.cfg.client_rank(cid)
        for layer, (m, n) in self.upload_geometry(upload).items():
            b = upload.tensors[f"{layer}{SEP}B"]
            a = upload.tensors[f"{layer}{SEP}A"]
            if b.shape != (m, r) or a.shape != (r, n):
                raise ProtocolError(
                    f"upload from client {cid}: layer {layer!r} has B {b.shape} and A {a.shape}; "
                    f"its rank {r} needs B ({m}, {r}) and A ({r}, {n})",
                    client_id=cid,
                    reason="shape",
                )
        check_plain_values(upload, skip=is_ciphertext)

    def _check_ciphertexts(self, upload: Message, ctx: Any, expected: int, need: str) -> None:
        """The header's ciphertext count equals ``expected`` (``need`` says what sets it), the
        message holds exactly ``enc|0 .. enc|expected-1``, each a 1-D uint8 array that loads
        under the server's public context (TenSEAL bytes or seeded ones; a seeded ciphertext
        names its key, which must be the round's), and the key fingerprint matches."""
        from ..validation import check_int

        h = upload.header
        cid = h.get("client_id")
        got = check_int(h, "ciphertexts") if (expected or "ciphertexts" in h) else 0
        names = sorted(k for k in upload.tensors if is_ciphertext(k))
        want = [f"{ENC}{SEP}{c}" for c in range(expected)]
        if got != expected or sorted(want) != names:
            raise ProtocolError(
                f"upload from client {cid} carries {len(names)} ciphertexts (header: {got}); "
                f"{need} need {expected}",
                client_id=cid,
                reason="ciphertexts",
            )
        if not expected:
            return
        crypto = ctx.crypto
        self._need_crypto(crypto, "server")
        if h.get("fingerprint") != crypto.fingerprint:
            raise ProtocolError(
                f"upload from client {cid} was encrypted under key {h.get('fingerprint')!r}, "
                f"this round's key is {crypto.fingerprint}: a message from another key or session",
                client_id=cid,
                reason="key",
            )
        for name in want:
            arr = upload.tensors[name]
            try:
                if arr.dtype != np.uint8 or arr.ndim != 1:
                    raise ProtocolError(f"{arr.dtype} {arr.shape} is not serialized bytes")
                crypto.load(arr.tobytes())
            except SheloraError as exc:
                raise ProtocolError(
                    f"upload from client {cid}: ciphertext {name!r} is not a valid ciphertext "
                    f"under the round's key ({exc})",
                    client_id=cid,
                    reason="ciphertext",
                ) from exc

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
