"""Measurements of a parameter set: ciphertext size, precision and throughput.

Notes
-----
Both functions generate a throw-away key (without Galois keys, which change neither the
ciphertexts nor the precision) and go through the bytes API, as between machines.
:func:`measure_precision` sums LoRA-like vectors (:func:`lora_like`) homomorphically and compares
with numpy; the comments on :data:`~shelora_core.ckks.PARAM_SETS` quote its numbers.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import numpy as np

from .params import CKKSParams, get_params
from .roles import KeyHolder

__all__ = ["ciphertext_bytes", "lora_like", "measure_precision"]


def ciphertext_bytes(params: CKKSParams | str, *, seeded: bool = False) -> int:
    """Serialized size of one full fresh ciphertext (all slots used) under ``params``.

    Generates a throw-away key. Sizes vary by a few bytes between keys (zstd compression).

    Args:
        params: a :class:`CKKSParams` or the name of a named set.
        seeded: measure a seed-compressed symmetric ciphertext
            (:mod:`~shelora_core.ckks.seeded`, what ``seeded_uploads`` sends) instead of
            TenSEAL's.

    Returns:
        Bytes of ``CKKSVector.serialize()`` (or of the seeded ciphertext) for ``slots`` random
        values.
    """
    p = replace(get_params(params), galois=False)
    client = KeyHolder.generate(p).client(seeded=seeded)
    x = np.random.default_rng(0).normal(0.0, 0.02, p.slots)
    return len(client.encrypt(x)[0])


def lora_like(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` LoRA-like values: ``N(0, 0.02)`` with 1% of them (at least one) replaced by
    ``U(-1, 1)`` outliers, drawn from ``rng``. What :func:`measure_precision` sums.

    Args:
        rng: the generator the values are drawn from (advanced by the call).
        n: number of values.

    Returns:
        float64 array of shape ``(n,)``.
    """
    x = rng.normal(0.0, 0.02, n)
    k = max(1, n // 100)
    idx = rng.choice(n, size=k, replace=False)
    x[idx] = rng.uniform(-1.0, 1.0, k)
    return x


def measure_precision(
    params: CKKSParams | str,
    *,
    n_values: int = 4096,
    n_summands: int = 32,
    seed: int = 0,
    seeded: bool = False,
) -> dict[str, Any]:
    """Encrypt ``n_summands`` LoRA-like vectors, add them homomorphically, compare with numpy.

    Values are ``N(0, 0.02)`` with 1% of them replaced by ``U(-1, 1)`` (LoRA factors plus a
    few outliers). Uses the bytes API end to end: client encrypt -> server add -> client decrypt.
    Galois keys are not generated (they do not change ciphertexts or precision).

    Args:
        params: a :class:`CKKSParams` or the name of a named set.
        n_values: length of each vector.
        n_summands: number of vectors (clients) summed.
        seed: seed of the plaintext values (the keys are never seeded, see
            :meth:`KeyHolder.generate`).
        seeded: clients upload seed-compressed symmetric ciphertexts
            (:mod:`~shelora_core.ckks.seeded`); ``ciphertext_bytes`` is then a seeded one.

    Returns:
        dict with ``params``, ``n_values``, ``n_summands``, ``slots``, ``num_ciphertexts``,
        ``max_abs_error``, ``max_rel_error`` (max abs error / max |exact sum|),
        ``ciphertext_bytes`` (one full ciphertext), ``bytes_per_value`` (that / slots),
        ``encrypt_values_per_s`` (encrypt + serialize), ``add_values_per_s`` (one
        ciphertext-ciphertext addition, per value, including deserialization) and
        ``decrypt_values_per_s``.
    """
    p = replace(get_params(params), galois=False)
    holder = KeyHolder.generate(p)
    client, server = holder.client(seeded=seeded), holder.server()
    rng = np.random.default_rng(seed)
    xs = [lora_like(rng, n_values) for _ in range(n_summands)]

    t0 = time.perf_counter()
    enc = [client.encrypt(x) for x in xs]
    t_enc = time.perf_counter() - t0
    t0 = time.perf_counter()
    summed = server.add(enc)
    t_add = time.perf_counter() - t0
    t0 = time.perf_counter()
    got = client.decrypt(summed, n_values)
    t_dec = time.perf_counter() - t0

    exact = np.sum(xs, axis=0)
    err = float(np.max(np.abs(got - exact)))
    full = len(client.encrypt(rng.normal(0.0, 0.02, p.slots))[0])
    return {
        "params": p.name,
        "n_values": n_values,
        "n_summands": n_summands,
        "slots": p.slots,
        "num_ciphertexts": client.num_ciphertexts(n_values),
        "max_abs_error": err,
        "max_rel_error": err / float(np.max(np.abs(exact))),
        "ciphertext_bytes": full,
        "bytes_per_value": full / p.slots,
        "encrypt_values_per_s": n_summands * n_values / t_enc,
        "add_values_per_s": (n_summands - 1) * n_values / t_add if n_summands > 1 else float("nan"),
        "decrypt_values_per_s": n_values / t_dec,
    }
