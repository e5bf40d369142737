"""Seed-compressed symmetric ciphertexts: fresh uploads in about half the bytes.

A CKKS ciphertext is a pair of polynomials ``(c0, c1)``. Encrypted with the **secret** key
(symmetric encryption), ``c1`` is uniformly random, so SEAL can send the seed of the generator
that drew it instead of the polynomial, and the receiver regrows it on load. TenSEAL's own
encryption uses the public key (``c1`` is not random) and its serializer always writes both
polynomials, even with ``encryption_type=SYMMETRIC``; the low-level ``tenseal.sealapi`` exposes
``Encryptor.encrypt_symmetric(plain) -> SerializableCiphertext`` whose ``save`` writes the seed.
Only fresh ciphertexts compress: a sum or a product of ciphertexts has a non-random ``c1`` and
is sent at full size (the server's broadcasts are ordinary TenSEAL bytes).

Wire format (version 1), all integers little-endian:

====== ======= ==============================================================================
offset bytes   content
====== ======= ==============================================================================
0      4       :data:`SEEDED_MAGIC` ``b"\\x00SSC"``; TenSEAL bytes (a protobuf) never start
               with a zero byte, so the first byte tells the two formats apart
4      1       format version (:data:`SEEDED_VERSION`)
5      8       the key's :func:`~shelora_core.ckks.context_fingerprint` (16 hex characters)
13     4       number of values the ciphertext holds (TenSEAL's vector size)
17     ...     the SEAL serialization of the seeded ciphertext (SEAL's own 16-byte header, which
               states its length, then the zstd-compressed ``c0`` and the seed of ``c1``)
====== ======= ==============================================================================

:func:`load_ciphertext` turns such bytes into a TenSEAL ``CKKSVector`` under any context of the
key (public or secret): it checks the header, wraps the SEAL bytes in TenSEAL's
``CKKSVectorProto`` (``sizes``, ``ciphertexts``, ``scale``: tenseal/proto/tensors.proto) and
lets TenSEAL load it; SEAL's ``Ciphertext::load`` expands the seed (it needs the parameters
only, no key) and checks that the data is valid for the context. The vector then adds,
weights and multiplies (``mm``) like one TenSEAL encrypted itself: the values are encoded as
TenSEAL encodes them, replicated cyclically over all slots.

Because the header names the key, a seeded ciphertext made under another key is refused
when it is loaded, not only by the message header's fingerprint (TenSEAL bytes do not say
which key made them).

SEAL's Python binding saves to a file path only, so :class:`SeededEncryptor` writes each
ciphertext to a private temporary directory and reads it back (the file holds the ciphertext,
nothing secret).
"""

from __future__ import annotations

import os
import struct
import tempfile
from collections.abc import Iterable
from typing import Any

import numpy as np
import tenseal as ts
import tenseal.sealapi as sealapi

from .context import _FINGERPRINT_HEX, _as_bytes, load_vector
from .errors import CKKSError

__all__ = [
    "SEEDED_MAGIC",
    "SEEDED_VERSION",
    "SeededEncryptor",
    "is_seeded",
    "load_ciphertext",
    "seeded_header",
    "seeded_to_tenseal",
]

#: the first bytes of every seeded ciphertext (a zero byte first: never a TenSEAL protobuf)
SEEDED_MAGIC = b"\x00SSC"
#: the wire format's version
SEEDED_VERSION = 1
_HEADER = struct.Struct("<4sB8sI")
#: SEAL's serialization header: magic, header size, version major/minor, compression, reserved,
#: total size in bytes (seal/serialization.h)
_SEAL_HEADER = struct.Struct("<HBBBBHQ")
_SEAL_MAGIC = 0xA15E
_SEAL_COMPR_MODES = {0: "none", 1: "zlib", 2: "zstd"}


def is_seeded(blob: bytes) -> bool:
    """Whether ``blob`` claims to be a seeded ciphertext (its first byte is zero).

    TenSEAL's bytes are a protobuf message, whose first byte is a field tag and never zero, so
    a zero first byte means this format (a damaged one is then refused by
    :func:`seeded_to_tenseal`, naming what is wrong).
    """
    return len(blob) > 0 and blob[0] == 0


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        if n:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _tenseal_vector_proto(size: int, seal_bytes: bytes, scale: float) -> bytes:
    """TenSEAL's ``CKKSVectorProto`` around one SEAL ciphertext: ``sizes`` (field 1, packed
    uint32), ``ciphertexts`` (field 2, bytes) and ``scale`` (field 3, double), in field order
    as TenSEAL writes them."""
    sizes = _varint(size)
    return b"".join(
        (
            b"\x0a" + _varint(len(sizes)) + sizes,
            b"\x12" + _varint(len(seal_bytes)) + seal_bytes,
            b"\x19" + struct.pack("<d", scale),
        )
    )


def seeded_header(blob: bytes) -> dict[str, Any]:
    """The header of a seeded ciphertext, checked: ``version``, ``fingerprint``, ``size``,
    ``seal_bytes`` (the length of the SEAL part) and ``compression``.

    Raises:
        CKKSError: naming the part that is wrong: too short, another magic or version, a SEAL
            part that is not a SEAL ciphertext or whose length differs from the one it states.
    """
    blob = _as_bytes(blob, "a seeded ciphertext")
    n = len(blob)
    if n < _HEADER.size + _SEAL_HEADER.size:
        raise CKKSError(
            f"these {n} bytes are too short for a seeded ciphertext (its header alone is "
            f"{_HEADER.size} + {_SEAL_HEADER.size} bytes): truncated"
        )
    magic, version, fp, size = _HEADER.unpack_from(blob)
    if magic != SEEDED_MAGIC:
        raise CKKSError(
            f"these bytes start with {magic!r}: neither a seeded ciphertext ({SEEDED_MAGIC!r}) nor "
            "TenSEAL bytes (which never start with a zero byte); corrupted"
        )
    if version != SEEDED_VERSION:
        raise CKKSError(
            f"seeded ciphertext format version {version}, this code reads version "
            f"{SEEDED_VERSION}: encrypt with the same shelora version on both sides"
        )
    seal = blob[_HEADER.size :]
    s_magic, s_head, _, _, compr, _, s_size = _SEAL_HEADER.unpack_from(seal)
    if s_magic != _SEAL_MAGIC or s_head != _SEAL_HEADER.size or compr not in _SEAL_COMPR_MODES:
        raise CKKSError(
            f"the seeded ciphertext's SEAL part does not start with a SEAL header (magic "
            f"{s_magic:#06x}, header size {s_head}, compression {compr}; SEAL writes "
            f"{_SEAL_MAGIC:#06x}, {_SEAL_HEADER.size}, 0-2): corrupted"
        )
    if s_size != len(seal):
        raise CKKSError(
            f"the seeded ciphertext's SEAL part states {s_size} bytes but carries {len(seal)}: "
            "truncated or padded"
        )
    return {
        "version": version,
        "fingerprint": fp.hex(),
        "size": size,
        "seal_bytes": len(seal),
        "compression": _SEAL_COMPR_MODES[compr],
    }


def seeded_to_tenseal(
    blob: bytes, *, fingerprint: str, scale: float, max_size: int | None = None
) -> bytes:
    """TenSEAL's serialization of a seeded ciphertext (still seeded: loading it expands the seed).

    Args:
        blob: bytes from :meth:`SeededEncryptor.encrypt`.
        fingerprint: the loading context's :func:`~shelora_core.ckks.context_fingerprint`; the
            ciphertext must have been made under the same key.
        scale: the context's global scale (TenSEAL's vector scale; every ciphertext of this
            package is encrypted at it).
        max_size: if given, the most values a ciphertext may hold (the slot count).

    Returns:
        Bytes ``tenseal.ckks_vector_from`` loads.

    Raises:
        CKKSError: a bad header (:func:`seeded_header`), another key, or a size of 0 or more
            than ``max_size``.
    """
    head = seeded_header(blob)
    if head["fingerprint"] != fingerprint:
        raise CKKSError(
            f"seeded ciphertext was encrypted under key {head['fingerprint']}, this context is "
            f"{fingerprint}: it comes from another key / session (decrypting it would silently "
            "give garbage)"
        )
    size = head["size"]
    if size == 0:
        raise CKKSError("the seeded ciphertext holds no values (size 0 in its header)")
    if max_size is not None and size > max_size:
        raise CKKSError(
            f"the seeded ciphertext states {size} values, more than the {max_size} slots"
        )
    return _tenseal_vector_proto(size, bytes(blob[_HEADER.size :]), float(scale))


def load_ciphertext(
    ctx: ts.Context, blob: bytes, *, fingerprint: str, max_size: int | None = None
) -> ts.CKKSVector:
    """Load TenSEAL bytes or a seeded ciphertext (told apart by the first byte) under ``ctx``.

    Args:
        ctx: a public or secret context of the key.
        blob: ``CKKSVector.serialize()`` bytes or bytes from :meth:`SeededEncryptor.encrypt`.
        fingerprint: ``ctx``'s :func:`~shelora_core.ckks.context_fingerprint` (checked against
            a seeded ciphertext's header; TenSEAL bytes carry no key).
        max_size: the most values accepted (usually the slot count).

    Returns:
        The encrypted vector (a seeded one expanded to both polynomials).

    Raises:
        CKKSError: anything :func:`~shelora_core.ckks.load_vector` refuses (TenSEAL bytes) or
            :func:`seeded_to_tenseal` refuses (a seeded header), or SEAL data that does not load.
            As with TenSEAL bytes, a byte flipped inside the compressed polynomial may load and
            decrypt to garbage; the message layer's SHA-256 catches it.
    """
    blob = _as_bytes(blob, "a serialized ciphertext")
    if not is_seeded(blob):
        return load_vector(ctx, blob, max_size=max_size)
    data = seeded_to_tenseal(
        blob, fingerprint=fingerprint, scale=ctx.global_scale, max_size=max_size
    )
    try:
        return ts.ckks_vector_from(ctx, data)
    except Exception as exc:  # TenSEAL / SEAL raise ValueError or RuntimeError from C++
        raise CKKSError(
            f"this seeded ciphertext ({len(blob)} bytes) did not load: SEAL refused its data "
            f"(corrupted, or encrypted with other parameters): {exc}"
        ) from exc


class SeededEncryptor:
    """Encrypts chunks of values symmetrically (secret key) into seeded ciphertexts.

    Args:
        ctx: a **secret** TenSEAL context (the client's).
        fingerprint: its :func:`~shelora_core.ckks.context_fingerprint`, written into every
            ciphertext.

    Raises:
        CKKSError: the context holds no secret key, or the fingerprint is not 16 hex characters.
    """

    def __init__(self, ctx: ts.Context, fingerprint: str) -> None:
        if not ctx.is_private():
            raise CKKSError(
                "seeded (symmetric) encryption needs the secret key: give the client's secret "
                "context (KeyHolder.secret_bytes()), not the public one"
            )
        try:
            fp = bytes.fromhex(fingerprint)
        except ValueError:
            fp = b""
        if len(fp) != _FINGERPRINT_HEX // 2:
            raise CKKSError(
                f"fingerprint {fingerprint!r} is not {_FINGERPRINT_HEX} hex characters (use "
                "context_fingerprint(ctx))"
            )
        seal = ctx.seal_context().data
        self._encryptor = sealapi.Encryptor(seal, ctx.secret_key().data)
        self._encoder = sealapi.CKKSEncoder(seal)
        self._scale = float(ctx.global_scale)
        self._fingerprint = fp
        self.slots = int(self._encoder.slot_count())

    def encrypt(self, chunks: Iterable[np.ndarray]) -> list[bytes]:
        """One seeded ciphertext per chunk.

        Each chunk (1 to ``slots`` finite values; the caller checks their range) is replicated
        cyclically over all slots before encoding, as TenSEAL does, so the server's ``mm``
        (which rotates the vector) works on it as on TenSEAL's own.

        Args:
            chunks: 1-D float arrays.

        Returns:
            The serialized ciphertexts (format in the module docstring).

        Raises:
            CKKSError: an empty chunk or one longer than ``slots``.
        """
        xs = [np.asarray(chunk, np.float64).ravel() for chunk in chunks]
        for x in xs:
            if not 0 < x.size <= self.slots:
                raise CKKSError(f"a seeded ciphertext holds 1 to {self.slots} values, got {x.size}")
        out: list[bytes] = []
        try:
            with tempfile.TemporaryDirectory(prefix="shelora-seeded-") as tmp:
                path = os.path.join(tmp, "ct")
                for x in xs:
                    plain = sealapi.Plaintext()
                    self._encoder.encode(np.resize(x, self.slots).tolist(), self._scale, plain)
                    self._encryptor.encrypt_symmetric(plain).save(path)
                    with open(path, "rb") as f:
                        seal = f.read()
                    head = _HEADER.pack(SEEDED_MAGIC, SEEDED_VERSION, self._fingerprint, x.size)
                    out.append(head + seal)
        except OSError as exc:
            raise CKKSError(
                "seeded encryption writes each ciphertext to a temporary file (SEAL's Python "
                f"binding saves to a path only) and could not: {exc}; point TMPDIR to a "
                "writable directory"
            ) from exc
        return out
