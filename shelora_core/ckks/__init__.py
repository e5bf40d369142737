"""CKKS homomorphic encryption for federated LoRA: keys, roles, packing and measurements.

Every public name is re-exported here, so ``from shelora_core.ckks import KeyHolder`` works
whichever module defines it.

Modules
-------
errors
    :class:`CKKSError`, the one exception type (a ``ValueError``).
params
    :class:`CKKSParams`, the named sets in :data:`PARAM_SETS`, :func:`get_params` and
    :func:`check_security` (128-bit security bound, scale and modulus-chain checks).
context
    Contexts and ciphertexts as bytes: :func:`load_context` (which runs
    :func:`check_context`, i.e. :func:`check_security` on the loaded parameters),
    :func:`load_vector`, :func:`context_info` / :class:`ContextInfo`, :func:`context_params`,
    :func:`context_fingerprint` and :func:`check_fingerprint`.
roles
    :class:`KeyHolder` (generates the keys), :class:`ClientCrypto` (encrypts and decrypts with
    the secret context) and :class:`ServerCrypto` (adds and weights ciphertexts with the public
    context; cannot decrypt).
seeded
    Seed-compressed symmetric ciphertexts (about half the bytes of a fresh upload):
    :class:`SeededEncryptor` (what ``ClientCrypto.encrypt(..., seeded=True)`` uses),
    :func:`load_ciphertext` (TenSEAL bytes or seeded ones, told apart by the first byte),
    :func:`is_seeded`, :func:`seeded_header`, :func:`seeded_to_tenseal`.
packing
    :class:`PackingLayout`, dense packing of named segments into ciphertext slots.
packed
    :class:`PackedEvaluator` (the server's plaintext-matrix x encrypted-vector products of
    SHE-LoRA's ``packed`` mode, SEAL-level through ``tenseal.sealapi``), :class:`BlockInput`,
    :func:`naf`, :func:`normalize_step`, :func:`replication_counts`.
measure
    :func:`ciphertext_bytes`, :func:`measure_precision` and the values it sums, :func:`lora_like`.

Notes
-----
The package is standalone: numpy, tenseal and the standard library only.
The private helpers of the former single module ``shelora_core/ckks.py`` (``_as_bytes``,
``_new_context`` and the ``_MAX_PRIME_BITS``-style constants) remain importable
from here too.
"""

from __future__ import annotations

from .context import _FINGERPRINT_HEX as _FINGERPRINT_HEX
from .context import (
    ContextInfo,
    check_context,
    check_fingerprint,
    context_fingerprint,
    context_info,
    context_params,
    load_context,
    load_vector,
)
from .context import _as_bytes as _as_bytes
from .errors import CKKSError
from .measure import ciphertext_bytes, lora_like, measure_precision
from .packed import BlockInput, PackedEvaluator, naf, normalize_step, replication_counts
from .packing import PackingLayout
from .params import _MAX_PRIME_BITS as _MAX_PRIME_BITS
from .params import _WARN_HEADROOM_BITS as _WARN_HEADROOM_BITS
from .params import _WARN_SCALE_BITS as _WARN_SCALE_BITS
from .params import (
    MAX_COEFF_BITS_128,
    PARAM_SETS,
    CKKSParams,
    check_security,
    get_params,
)
from .roles import ClientCrypto, KeyHolder, ServerCrypto
from .roles import _new_context as _new_context
from .seeded import (
    SEEDED_MAGIC,
    SEEDED_VERSION,
    SeededEncryptor,
    is_seeded,
    load_ciphertext,
    seeded_header,
    seeded_to_tenseal,
)

__all__ = [
    "MAX_COEFF_BITS_128",
    "PARAM_SETS",
    "SEEDED_MAGIC",
    "SEEDED_VERSION",
    "BlockInput",
    "CKKSError",
    "CKKSParams",
    "ClientCrypto",
    "ContextInfo",
    "KeyHolder",
    "PackedEvaluator",
    "PackingLayout",
    "SeededEncryptor",
    "ServerCrypto",
    "check_context",
    "check_fingerprint",
    "check_security",
    "ciphertext_bytes",
    "context_fingerprint",
    "context_info",
    "context_params",
    "get_params",
    "is_seeded",
    "load_ciphertext",
    "load_context",
    "load_vector",
    "lora_like",
    "measure_precision",
    "naf",
    "normalize_step",
    "replication_counts",
    "seeded_header",
    "seeded_to_tenseal",
]
