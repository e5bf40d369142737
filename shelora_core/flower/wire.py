"""Flower records that carry shelora's bytes, and the message types of the app.

A shelora message (:mod:`shelora_core.messages`) is already bytes; Flower carries it unchanged as
a raw ``uint8`` :class:`flwr.app.Array` in an :class:`flwr.app.ArrayRecord` (Flower cuts arrays
into 5 MiB chunks on the wire). Small fields (round, seconds, a refusal's reason) travel in a
:class:`flwr.app.ConfigRecord` / :class:`flwr.app.MetricRecord`.

Message types (``<category>.<action>``, routed by the ClientApp):

=================  ==========================================================================
``query.hello``    who is this SuperNode: its partition id, whether it evaluates, its key's
                   fingerprint (no model is loaded)
``query.propose``  SHE-LoRA: the client's OPE-encrypted sensitivity proposal
``train``          one client step: receive the broadcast, train, upload (MaskCrypt: the mask
                   proposal; the trained adapter stays in the SuperNode's context state)
``train.upload``   MaskCrypt's second client step: encrypt with the round's consensus
``evaluate``       the evaluator reads the global model and returns accuracy and macro-F1
=================  ==========================================================================
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from ..errors import MessageError

__all__ = [
    "EVALUATE",
    "HELLO",
    "PROPOSE",
    "TRAIN",
    "UPLOAD",
    "blob_array",
    "content",
    "read_blob",
    "read_blobs",
    "refusal",
]

HELLO = "query.hello"
PROPOSE = "query.propose"
TRAIN = "train"
UPLOAD = "train.upload"
EVALUATE = "evaluate"

#: record names inside a message's RecordDict
BYTES, META, METRICS, REFUSED = "bytes", "meta", "metrics", "refused"


def blob_array(data: bytes) -> Array:
    """``data`` as a raw ``uint8`` array (what Flower chunks and sends unchanged)."""
    return Array(dtype="uint8", shape=(len(data),), stype="raw-bytes", data=bytes(data))


def read_blob(arr: Array) -> bytes:
    """The bytes of an array made by :func:`blob_array`.

    Raises:
        MessageError: the array is not a raw ``uint8`` vector.
    """
    if arr.dtype != "uint8" or arr.stype != "raw-bytes" or len(arr.shape) != 1:
        raise MessageError(
            f"expected a raw-bytes uint8 vector, got dtype {arr.dtype!r}, stype {arr.stype!r}, "
            f"shape {tuple(arr.shape)}: the sender is not this app"
        )
    data = bytes(arr.data)
    if len(data) != int(arr.shape[0]):
        raise MessageError(f"a raw-bytes array says {arr.shape[0]} bytes but holds {len(data)}")
    return data


def content(
    blobs: Mapping[str, bytes | None] | None = None,
    meta: Mapping[str, Any] | None = None,
    metrics: Mapping[str, float] | None = None,
) -> RecordDict:
    """A message's content: ``blobs`` (``None`` values left out) as raw arrays, ``meta`` as a
    config record and ``metrics`` as floats."""
    rd = RecordDict()
    arrays = {k: blob_array(v) for k, v in (blobs or {}).items() if v is not None}
    if arrays:
        rd[BYTES] = ArrayRecord(arrays)
    if meta:
        rd[META] = ConfigRecord(dict(meta))
    if metrics:
        rd[METRICS] = MetricRecord({k: float(v) for k, v in metrics.items()})
    return rd


def read_blobs(msg: Message) -> dict[str, bytes]:
    """Every raw array of a message, by name (empty when it carries none)."""
    if BYTES not in msg.content.array_records:
        return {}
    return {k: read_blob(v) for k, v in msg.content.array_records[BYTES].items()}


def meta(msg: Message) -> dict[str, Any]:
    """A message's config fields (empty when it has none)."""
    rec = msg.content.config_records.get(META)
    return dict(rec) if rec is not None else {}


def metrics(msg: Message) -> dict[str, float]:
    """A reply's metrics (empty when it has none)."""
    rec = msg.content.metric_records.get(METRICS)
    return {k: float(v) for k, v in rec.items()} if rec is not None else {}


def refusal(reason: str, error: str) -> RecordDict:
    """A client's reply when its own step refused (a named shelora error): no bytes."""
    rd = RecordDict()
    rd[REFUSED] = ConfigRecord({"reason": str(reason), "error": str(error)})
    return rd


def refused(msg: Message) -> dict[str, str] | None:
    """The refusal a reply carries, or ``None``."""
    rec = msg.content.config_records.get(REFUSED)
    return None if rec is None else {"reason": str(rec["reason"]), "error": str(rec["error"])}
