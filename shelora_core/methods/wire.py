"""How an adapter and ciphertexts are laid out in a message: the tensor names of the wire.

An upload carries, per adapted layer, ``<layer>|B`` and ``<layer>|A`` (float32), the head as
``head|<name>``, and serialized CKKS ciphertexts as uint8 arrays ``enc|0``, ``enc|1``, ... (their
count in the header). Methods add their own tensors (SHE-LoRA's ``U``/``S``/``Vt`` broadcast,
MaskCrypt's mask) under the same ``<owner>|<key>`` naming.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..adapters import AdapterWeights
from ..aggregation import SVDFactors
from ..messages import Message, MessageError, require

__all__ = [
    "ENC",
    "SEP",
    "put_svd",
    "read_svd",
    "adapter_to_upload",
    "attach_ciphertexts",
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
    count = msg.header["ciphertexts"]
    held = sum(1 for k in msg.tensors if is_ciphertext(k))
    names = [f"{ENC}{SEP}{c}" for c in range(count)] if isinstance(count, int) else None
    if names is None or held != count or any(k not in msg.tensors for k in names):
        raise MessageError(
            f"{msg.kind} from client {msg.header.get('client_id')}: the header promises "
            f"{count!r} ciphertexts, the message holds {held}"
        )
    blobs = [msg.tensors[k].tobytes() for k in names]
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


def put_svd(tensors: dict[str, np.ndarray], layer: str, svd: SVDFactors) -> None:
    """Store a layer's thin SVD as ``<layer>|U``, ``|S``, ``|Vt`` (float32) in a broadcast."""
    tensors[f"{layer}{SEP}U"] = svd.u.astype(np.float32)
    tensors[f"{layer}{SEP}S"] = svd.s.astype(np.float32)
    tensors[f"{layer}{SEP}Vt"] = svd.vt.astype(np.float32)


def read_svd(parts: dict[str, np.ndarray]) -> SVDFactors:
    """A layer's thin SVD from its ``U``, ``S``, ``Vt`` tensors (as float64)."""
    return SVDFactors(
        u=parts["U"].astype(np.float64),
        s=parts["S"].astype(np.float64),
        vt=parts["Vt"].astype(np.float64),
    )
