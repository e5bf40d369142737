"""What crosses the client/server boundary, as bytes.

Every message is a typed object that becomes ``bytes`` and comes back; communication cost is the
length of those bytes, measured, never estimated. The in-process driver in
:mod:`shelora_core.federation` passes only these bytes between client steps and server steps, so a
Flower ServerApp/ClientApp can carry the same bytes across machines.

Wire format (version 1)::

    b"SHLR" | u16 protocol version | u64 payload length | 32-byte SHA-256 of payload | payload

The payload is a `safetensors <https://github.com/huggingface/safetensors>`_ blob: named numeric
tensors plus a string metadata map that carries the JSON header (kind, method, round, client id,
...). safetensors never unpickles, so a hostile message cannot run code on the receiver.
Decoding checks the magic, version, length and digest (truncated or corrupted bytes), the kind, and
that every tensor is finite.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import MessageError

__all__ = ["PROTOCOL_VERSION", "Message", "MessageError", "decode", "encode"]

MAGIC = b"SHLR"
PROTOCOL_VERSION = 1
_PREFIX = struct.Struct("<4sHQ32s")


@dataclass
class Message:
    """A header plus named tensors.

    Attributes:
        kind: what the message is (``"upload"``, ``"broadcast"``, ...).
        header: JSON-serialisable fields (method, round, client id, shapes, ...).
        tensors: name -> numpy array (float32/float64/int/uint8).
    """

    kind: str
    header: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, np.ndarray] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        return encode(self)

    @classmethod
    def from_bytes(cls, data: bytes, *, expect_kind: str | None = None) -> Message:
        return decode(data, expect_kind=expect_kind)


def encode(message: Message) -> bytes:
    """Serialise ``message``; the result's ``len`` is its communication cost."""
    from safetensors.numpy import save

    header = {"kind": message.kind, **message.header}
    try:
        header_json = json.dumps(header, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise MessageError(f"message header is not JSON-serialisable: {exc}") from exc
    tensors = {k: np.ascontiguousarray(v) for k, v in message.tensors.items()}
    payload = save(tensors, metadata={"header": header_json})
    digest = hashlib.sha256(payload).digest()
    return _PREFIX.pack(MAGIC, PROTOCOL_VERSION, len(payload), digest) + payload


def decode(data: bytes, *, expect_kind: str | None = None) -> Message:
    """Parse and validate bytes produced by :func:`encode`.

    Raises:
        MessageError: on truncation, corruption, a foreign protocol version, the wrong kind, or
            non-finite values. The message says which check failed and what was found.
    """
    from safetensors.numpy import load

    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise MessageError(f"expected bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) < _PREFIX.size:
        raise MessageError(f"message truncated: {len(data)} bytes is shorter than the header")
    magic, version, length, digest = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise MessageError(f"not a shelora message (magic {magic!r}, expected {MAGIC!r})")
    if version != PROTOCOL_VERSION:
        raise MessageError(
            f"protocol version {version} is not supported (this side speaks {PROTOCOL_VERSION}); "
            "run the same shelora version on clients and server"
        )
    payload = data[_PREFIX.size :]
    if len(payload) != length:
        raise MessageError(
            f"message truncated or padded: payload is {len(payload)} bytes, header says {length}"
        )
    if hashlib.sha256(payload).digest() != digest:
        raise MessageError("message corrupted: SHA-256 of the payload does not match its header")
    try:
        tensors = load(payload)
        header = _metadata(payload)
    except Exception as exc:  # safetensors raises several types on malformed input
        raise MessageError(f"message payload is malformed: {exc}") from exc
    kind = header.pop("kind", None)
    if expect_kind is not None and kind != expect_kind:
        raise MessageError(f"expected a {expect_kind!r} message, got {kind!r}")
    for name, arr in tensors.items():
        if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
            bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
            raise MessageError(f"tensor {name!r} holds {bad} NaN/Inf value(s); refusing it")
    return Message(kind=str(kind), header=header, tensors=dict(tensors))


def _metadata(payload: bytes) -> dict[str, Any]:
    (n,) = struct.unpack_from("<Q", payload)
    meta = json.loads(payload[8 : 8 + n]).get("__metadata__", {})
    return json.loads(meta["header"])


def require(header: Mapping[str, Any], *keys: str) -> None:
    """Raise :class:`MessageError` if any of ``keys`` is missing from ``header``."""
    missing = [k for k in keys if k not in header]
    if missing:
        raise MessageError(f"message header lacks field(s) {missing}")
