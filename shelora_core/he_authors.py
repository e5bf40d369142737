"""The SHE-LoRA authors' CKKS packing, measured as a baseline (issue 16, item 3).

Our ``paper`` cipher mode sends one N = 8192 ciphertext per protected column of A; the authors'
code packs four columns per ciphertext and uses a shorter modulus chain. This module reproduces
their layout and parameters (written from their description and code, which was read for
understanding only) and measures it on real messages beside the package's rows in
``he_cost.json`` (:func:`shelora_core.he_cost.run_plan` adds one row per scale and model).

What the authors' code does (``icloudsheep/SHE-LoRA``, ``flowertune_llm/she/``):

* **keys**: one TenSEAL context, ``N = 8192``, coefficient moduli ``[60, 40, 60]``, scale
  ``2**24`` (their comment: ``2**40`` for a 30B model), TenSEAL's default Galois keys
  (``generate_galois_keys()``: every power-of-two step) and its relinearisation keys; the server
  gets a public copy (``make_context_public``).
* **client**: the protected columns of A (``r`` values each) are packed four adjacent columns per
  ciphertext, column-major (column ``c`` of a block in slots ``c r .. c r + r - 1``); a layer's
  last ciphertext holds the remaining one to three columns. Public-key encryption
  (``ts.ckks_vector``) and TenSEAL's serializer.
* **server**: for every ciphertext of ``w`` columns and every column ``c`` in it, a plaintext
  matrix of shape ``(w r, m)``, zero except rows ``c r .. c r + r - 1`` which hold ``B^T``;
  ``CKKSVector.mm`` with it yields ``B A[:, j]`` (``m`` values). So ``w`` products per
  ciphertext, each with as many rotations as the ciphertext holds values (``w r``): four times
  the rotations of one column per ciphertext. Products of the same column are added across the
  clients; the server returns one ciphertext of ``m`` values per protected column.
* **client**: decrypts every returned column.

Choices made here (the authors' code does not say, or is not comparable as written):

* **weights**: the server multiplies by ``p_i s_i B_i`` (sample-count weight times LoRA scaling,
  plaintext: free), exactly as our ``paper`` mode, so the decrypted columns are the FlexLoRA
  aggregate's. The authors' server adds unweighted products and sends a count along.
* **alignment across clients**: position ``j`` of the public column list G (budgets nest: client
  i protects ``G[:k_i]``, the same columns as every other mode measured in ``he_cost``). The
  authors move the selected columns to the end of A and the server adds the clients' lists from
  the end: the same alignment by selection order.
* **plaintext part** (``B_i`` and ``A_i`` with the protected columns zeroed; the broadcast's
  plaintext aggregate): the same as our ``paper`` mode, so it is counted and timed from one
  round of the package's ``withhold`` ablation on the same adapters and columns, whose
  messages carry exactly that plaintext in the package's message encoding (no ciphertext). The
  authors pickle Python objects instead; ciphertexts are counted as ``len()`` of their
  serialisation (the pickle framing around them, a few bytes each, is not counted). Every
  seconds field is the plaintext round's plus the HE part's (``he_*`` and ``plain_*`` give
  both).
* **scale 2^24 with a 40-bit inner prime**: TenSEAL rescales a product by the 40-bit prime and
  records its scale as ``2**24``, so the products decrypt off by ``2**-16`` and below the
  noise. :func:`shelora_core.ckks.check_security` refuses that parameter set for this reason
  (each row states it in ``package_check``), so the contexts here are built with TenSEAL
  directly: the row measures the authors' choice, it does not endorse it.
* **layers wider than the slots**: a product's ``m`` outputs must fit ``N / 2 = 4096`` slots (a
  packed input holds at most ``4 r`` values, which always fits); larger layers (LLaMA-2-13B,
  ``m = 5120``) are not measured (the authors' comment switches to ``N = 16384`` there).
* **contexts**: the client's secret context holds no Galois keys (a client never rotates; the
  authors' clients load the full context, Galois keys included). TenSEAL's default thread
  count, as for every other row.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import tenseal as ts

from .aggregation import lora_scaling, normalize_weights
from .ckks.errors import CKKSError
from .ckks.params import CKKSParams, check_security
from .config import FederatedConfig
from .engine import run_round
from .messages import decode
from .methods.shelora import public_column_order
from .methods.wire import upload_to_adapter

__all__ = [
    "AUTHORS_CHAIN",
    "AUTHORS_COLUMNS_PER_CIPHERTEXT",
    "AUTHORS_POLY_DEGREE",
    "AUTHORS_SCALE_BITS",
    "AuthorsClient",
    "AuthorsKeys",
    "AuthorsServer",
    "AuthorsTrace",
    "authors_round",
    "authors_row",
    "measure_authors",
    "pack_columns",
]

#: the authors' CKKS parameters: ``N``, the modulus chain, their shipped scale and the one their
#: comment gives for large models
AUTHORS_POLY_DEGREE = 8192
AUTHORS_CHAIN = (60, 40, 60)
AUTHORS_SCALE_BITS = (24, 40)
#: adjacent protected columns of A per ciphertext
AUTHORS_COLUMNS_PER_CIPHERTEXT = 4

#: one client's upload: per layer, its ciphertexts in order, each with the columns it holds
Upload = dict[str, list[tuple[bytes, int]]]


def pack_columns(
    columns: np.ndarray, per: int = AUTHORS_COLUMNS_PER_CIPHERTEXT
) -> list[tuple[np.ndarray, int]]:
    """The authors' layout: ``per`` adjacent columns per vector, column-major.

    Args:
        columns: ``r x k`` matrix, the protected columns of A in order.
        per: columns per vector (the authors: 4).

    Returns:
        ``ceil(k / per)`` pairs ``(values, w)``: the ``w * r`` values of ``w`` columns, column
        after column (the last pair may hold fewer than ``per`` columns).

    Raises:
        ValueError: ``columns`` is not a matrix or ``per`` is not positive.
    """
    cols = np.asarray(columns, dtype=np.float64)
    if cols.ndim != 2:
        raise ValueError(f"pack_columns takes an r x k matrix, got shape {cols.shape}")
    if per < 1:
        raise ValueError(f"columns per ciphertext must be >= 1, got {per}")
    return [
        (cols[:, s : s + per].T.reshape(-1), int(cols[:, s : s + per].shape[1]))
        for s in range(0, cols.shape[1], per)
    ]


def _params(scale_bits: int) -> CKKSParams:
    return CKKSParams(
        name=f"authors-2^{scale_bits}",
        poly_modulus_degree=AUTHORS_POLY_DEGREE,
        coeff_mod_bit_sizes=AUTHORS_CHAIN,
        global_scale_bits=int(scale_bits),
        galois=True,
        relin_keys=True,
        description="the SHE-LoRA authors' code: N=8192, [60, 40, 60], default Galois keys",
    )


def package_check(scale_bits: int) -> str | None:
    """What :func:`~shelora_core.ckks.check_security` says about the authors' parameters at
    ``scale_bits`` (``None``: it accepts them)."""
    try:
        check_security(_params(scale_bits))
    except CKKSError as exc:
        return str(exc)
    return None


@dataclass(frozen=True)
class AuthorsKeys:
    """A key pair at the authors' parameters: the secret context (clients) and the public one
    (server: public key, Galois and relinearisation keys, no secret key), as bytes."""

    scale_bits: int
    secret: bytes
    public: bytes

    @classmethod
    def generate(cls, scale_bits: int) -> AuthorsKeys:
        """Fresh keys at ``N = 8192``, ``[60, 40, 60]``, scale ``2**scale_bits``.

        Raises:
            ValueError: ``scale_bits`` is not below the first prime's 60 bits.
        """
        if not 0 < int(scale_bits) < AUTHORS_CHAIN[0] - 1:
            raise ValueError(
                f"scale_bits={scale_bits} does not fit the first {AUTHORS_CHAIN[0]}-bit prime: "
                "use the authors' 24 or 40"
            )
        ctx = ts.context(
            ts.SCHEME_TYPE.CKKS,
            poly_modulus_degree=AUTHORS_POLY_DEGREE,
            coeff_mod_bit_sizes=list(AUTHORS_CHAIN),
        )
        ctx.global_scale = float(2 ** int(scale_bits))
        secret = ctx.serialize(
            save_public_key=True,
            save_secret_key=True,
            save_galois_keys=False,
            save_relin_keys=False,
        )
        ctx.generate_galois_keys()
        public = ctx.serialize(
            save_public_key=True,
            save_secret_key=False,
            save_galois_keys=True,
            save_relin_keys=True,
        )
        return cls(int(scale_bits), secret, public)


class AuthorsClient:
    """A client: packs and encrypts its protected columns, decrypts the server's sums.

    Args:
        secret_context: :attr:`AuthorsKeys.secret`.

    Raises:
        ValueError: the context holds no secret key.
    """

    def __init__(self, secret_context: bytes) -> None:
        self.context = ts.context_from(secret_context)
        if not self.context.is_private():
            raise ValueError("a client needs the secret context (AuthorsKeys.secret)")

    def encrypt(self, protected: Mapping[str, np.ndarray]) -> Upload:
        """Per layer, the ``r x k`` protected columns packed by :func:`pack_columns` and
        encrypted with the public key (TenSEAL's ``ckks_vector``), serialised."""
        return {
            layer: [
                (ts.ckks_vector(self.context, v.tolist()).serialize(), w)
                for v, w in pack_columns(cols)
            ]
            for layer, cols in protected.items()
        }

    def decrypt(self, blob: bytes) -> np.ndarray:
        """One returned column (``m`` values)."""
        return np.asarray(ts.ckks_vector_from(self.context, blob).decrypt(), dtype=np.float64)


class AuthorsServer:
    """The server: the authors' ciphertext x plaintext products and cross-client sums, with the
    public context only.

    Args:
        public_context: :attr:`AuthorsKeys.public`.

    Raises:
        ValueError: the context holds the secret key.
    """

    def __init__(self, public_context: bytes) -> None:
        self.context = ts.context_from(public_context)
        if self.context.is_private():
            raise ValueError("the server must not hold the secret key: give it AuthorsKeys.public")

    def aggregate(
        self, uploads: Sequence[Upload], left: Sequence[Mapping[str, np.ndarray]]
    ) -> dict[str, list[bytes]]:
        """``sum_i left_i[layer] @ A_i[:, G[j]]`` per layer and position ``j`` of G.

        Args:
            uploads: each client's :meth:`AuthorsClient.encrypt` output.
            left: each client's plaintext ``m x r_i`` factor per layer (here ``p_i s_i B_i``).

        Returns:
            Per layer, one serialised ciphertext of ``m`` values per position that some client
            protects, summed over the clients that protect it.

        Raises:
            ValueError: mismatched clients or layers, a ciphertext whose size is not its column
                count times the client's rank, or a position no client sent.
        """
        if len(uploads) != len(left) or not uploads:
            raise ValueError(f"{len(uploads)} uploads for {len(left)} plaintext factors")
        layers = sorted(uploads[0])
        out: dict[str, list[bytes]] = {}
        for layer in layers:
            sums: dict[int, Any] = {}
            for i, (up, mats) in enumerate(zip(uploads, left, strict=True)):
                if sorted(up) != layers or layer not in mats:
                    raise ValueError(f"client {i} sent other layers than client 0")
                b = np.asarray(mats[layer], dtype=np.float64)
                m, r = b.shape
                transforms: dict[int, list[Any]] = {}  # per column count, as the authors cache
                j = 0
                for blob, w in up[layer]:
                    if not 1 <= w <= AUTHORS_COLUMNS_PER_CIPHERTEXT:
                        raise ValueError(f"client {i}, layer {layer!r}: {w} columns per ciphertext")
                    vec = ts.ckks_vector_from(self.context, blob)
                    if vec.size() != w * r:
                        raise ValueError(
                            f"client {i}, layer {layer!r}: a ciphertext of {w} columns at rank "
                            f"{r} must hold {w * r} values, it holds {vec.size()}"
                        )
                    if w not in transforms:
                        transforms[w] = []
                        for c in range(w):
                            t = np.zeros((w * r, m))
                            t[c * r : (c + 1) * r] = b.T
                            transforms[w].append(ts.plain_tensor(t))
                    for t in transforms[w]:
                        prod = vec.mm(t)
                        sums[j] = prod if j not in sums else sums[j] + prod
                        j += 1
            if sorted(sums) != list(range(len(sums))):
                raise ValueError(f"layer {layer!r}: positions {sorted(sums)} leave a gap")
            out[layer] = [sums[j].serialize() for j in range(len(sums))]
        return out


@dataclass
class AuthorsTrace:
    """Everything one round of the authors' packing sent and measured.

    Attributes:
        plain: the ``withhold`` round that carries the plaintext part (its uploads, broadcast
            and seconds; :class:`~shelora_core.engine.RoundTrace`).
        uploads: each client's ciphertexts (:meth:`AuthorsClient.encrypt`).
        summed: the server's summed columns (:meth:`AuthorsServer.aggregate`).
        seconds: wall-clock ``encrypt`` and ``encrypt_cpu`` (per client), ``server`` and
            ``server_cpu``, ``decrypt`` (one client, every column).
        max_abs_error, max_ref: the largest ``|decrypted - exact|`` over every returned column
            and the largest ``|exact|`` (exact: ``sum_i p_i s_i B_i A_i[:, G[j]]`` over the
            clients with ``k_i > j``, float64).
        layers: the adapted layers measured, with their ``(m, n)``.
    """

    plain: Any
    uploads: list[Upload]
    summed: dict[str, list[bytes]]
    seconds: dict[str, Any]
    max_abs_error: float
    max_ref: float
    layers: dict[str, tuple[int, int]]


def authors_round(
    shapes: Mapping[str, tuple[int, int]],
    keys: AuthorsKeys,
    *,
    ranks: Sequence[int] = (8, 16, 32),
    budgets: Sequence[int] = (2, 4, 8),
    seed: int = 0,
) -> AuthorsTrace:
    """One round of the authors' packing on ``shapes`` for ``len(ranks)`` clients.

    The adapters, column list G and sample counts are
    :func:`shelora_core.he_cost.measure_method`'s (``_adapters``, :func:`public_column_order`
    with ``order="random"``, 100, 110, 120, ...), so rows compare with the package's.

    Raises:
        ValueError: ranks and budgets of different lengths, or a layer wider than the slots.
    """
    from .he_cost import _adapters

    if len(ranks) != len(budgets):
        raise ValueError(f"one budget per rank: got ranks {ranks} and budgets {budgets}")
    slots = AUTHORS_POLY_DEGREE // 2
    wide = sorted(n for n, (m, _) in shapes.items() if m > slots)
    if wide:
        raise ValueError(
            f"layers {wide[:3]} have more outputs than the {slots} slots of N = "
            f"{AUTHORS_POLY_DEGREE}: the authors' products do not fit (they use N = 16384)"
        )
    w0 = {k: np.random.default_rng(1).normal(size=s) for k, s in shapes.items()}
    columns = public_column_order(w0, max(budgets), order="random", seed=seed)
    adapters = _adapters(dict(shapes), ranks, seed)
    sizes = [100 + 10 * i for i in range(len(ranks))]

    # the plaintext part: B_i and A_i without G[:k_i] up, the plaintext aggregate down
    cfg = FederatedConfig(method="shelora", shelora_protect="withhold", num_clients=len(ranks),
                          ranks=tuple(ranks), he_budgets=tuple(budgets), seed=seed)  # fmt: skip
    plain = run_round(cfg, adapters, num_examples=sizes, columns=columns,
                      receive_ranks=[ranks[-1]])  # fmt: skip

    # clients: pack and encrypt A_i[:, G[:k_i]]
    client = AuthorsClient(keys.secret)
    uploads, t_enc, cpu_enc = [], [], []
    for w, k in zip(adapters, budgets, strict=True):
        t0, c0 = time.perf_counter(), time.process_time()
        uploads.append(client.encrypt({n: a[:, columns[n][:k]] for n, (_, a) in w.factors.items()}))
        t_enc.append(time.perf_counter() - t0)
        cpu_enc.append(time.process_time() - c0)

    # server: B_i and p_i from the plaintext uploads it received, the products with the public
    # context only
    received = [upload_to_adapter(decode(u, expect_kind="upload")) for u in plain.uploads]
    p = normalize_weights([h["num_examples"] for h, _ in received])
    left = [
        {n: p[i] * lora_scaling(w.alpha, w.rank) * b.astype(np.float64)
         for n, (b, _) in w.factors.items()}
        for i, (_, w) in enumerate(received)
    ]  # fmt: skip
    server = AuthorsServer(keys.public)
    t0, c0 = time.perf_counter(), time.process_time()
    summed = server.aggregate(uploads, left)
    t_server, cpu_server = time.perf_counter() - t0, time.process_time() - c0

    # a client decrypts every column (all clients read the same ones)
    t0 = time.perf_counter()
    got = {n: [client.decrypt(b) for b in blobs] for n, blobs in summed.items()}
    t_dec = time.perf_counter() - t0

    err = top = 0.0
    for n, cols in got.items():
        for j, col in enumerate(cols):
            ref = sum(
                left[i][n] @ adapters[i].factors[n][1][:, columns[n][j]].astype(np.float64)
                for i, k in enumerate(budgets)
                if k > j
            )
            err = max(err, float(np.abs(col - ref).max()))
            top = max(top, float(np.abs(ref).max()))
    seconds = dict(encrypt=t_enc, encrypt_cpu=cpu_enc, server=t_server, server_cpu=cpu_server,
                   decrypt=t_dec)  # fmt: skip
    return AuthorsTrace(plain, uploads, summed, seconds, err, top, dict(shapes))


def measure_authors(
    shape: Any,
    *,
    scale_bits: int,
    ranks: Sequence[int] = (8, 16, 32),
    budgets: Sequence[int] = (2, 4, 8),
    layers: int | None = None,
    seed: int = 0,
    keys: dict[int, AuthorsKeys] | None = None,
) -> dict[str, Any]:
    """One round of the authors' packing (:func:`authors_round`) as an ``he_cost.json`` row.

    Args:
        shape: a :class:`shelora_core.he_cost.ModelShape`.
        scale_bits: the CKKS scale, ``2**scale_bits`` (the authors ship 24).
        ranks, budgets: per client, its LoRA rank and its number of protected columns per layer.
        layers: measure on this many of the model's identical layers (``None``: all) and scale
            bytes and seconds by ``layers / layers_measured``.
        seed: the adapters' and the column order's seed.
        keys: reuse :class:`AuthorsKeys` by scale bits (key generation is not timed).

    Returns:
        :func:`authors_row` of the round.
    """
    keys = {} if keys is None else keys
    kh = keys.get(scale_bits) or keys.setdefault(scale_bits, AuthorsKeys.generate(scale_bits))
    trace = authors_round(shape.layer_shapes(layers), kh, ranks=ranks, budgets=budgets, seed=seed)
    return authors_row(shape, trace, kh, ranks=ranks, budgets=budgets)


def authors_row(
    shape: Any,
    trace: AuthorsTrace,
    keys: AuthorsKeys,
    *,
    ranks: Sequence[int],
    budgets: Sequence[int],
) -> dict[str, Any]:
    """The ``he_cost.json`` row of a round: per-client-round means, scaled to the model.

    The fields of :func:`~shelora_core.he_cost.measure_method`'s rows where they mean the same
    (every cost is the plaintext part's plus the HE part's; ``he_*`` and ``plain_*`` fields give
    the two), the authors' parameters, and ``max_*_error_vs_plaintext`` of the decrypted columns
    against their exact value (``error_of``; the package's rows compare the received dW instead).
    """
    from .he_cost import FULL_HE_LAYOUT

    n_meas = len(trace.layers) // len(shape.modules)
    scale = shape.layers / n_meas
    t, tp = trace.seconds, trace.plain.seconds
    up_cipher = [sum(len(b) for lay in u.values() for b, _ in lay) for u in trace.uploads]
    down_cipher = sum(len(b) for blobs in trace.summed.values() for b in blobs)
    n_up = [sum(len(lay) for lay in u.values()) for u in trace.uploads]
    plain_up = [len(u) for u in trace.plain.uploads]
    enc, plain_upload = float(np.mean(t["encrypt"])), float(np.mean(tp["upload"]))
    plain_receive = float(np.mean(tp["receive"]))
    values = np.mean([k * r for k, r in zip(budgets, ranks, strict=True)]) * len(trace.layers)
    bits = keys.scale_bits
    return {
        "method": f"shelora-authors-2^{bits}",
        "seeded_uploads": False,
        "model": shape.name,
        "layers": shape.layers,
        "modules": list(shape.modules),
        "d": shape.d,
        "ranks": list(ranks),
        "budgets": list(budgets),
        "ckks_params": f"authors-2^{bits}",
        "poly_modulus_degree": AUTHORS_POLY_DEGREE,
        "coeff_mod_bit_sizes": list(AUTHORS_CHAIN),
        "global_scale_bits": bits,
        "columns_per_ciphertext": AUTHORS_COLUMNS_PER_CIPHERTEXT,
        "package_check": package_check(bits),
        "client_upload_seconds": (plain_upload + enc) * scale,
        "server_seconds_per_round": (tp["server"] + t["server"]) * scale,
        "client_receive_seconds": (plain_receive + t["decrypt"]) * scale,
        "he_client_encrypt_seconds": enc * scale,
        "he_client_encrypt_cpu_seconds": float(np.mean(t["encrypt_cpu"])) * scale,
        "he_server_seconds": t["server"] * scale,
        "he_server_cpu_seconds": t["server_cpu"] * scale,
        "he_client_decrypt_seconds": t["decrypt"] * scale,
        "plain_client_upload_seconds": plain_upload * scale,
        "plain_server_seconds": tp["server"] * scale,
        "plain_client_receive_seconds": plain_receive * scale,
        "upload_bytes": float(np.mean(plain_up) + np.mean(up_cipher)) * scale,
        "upload_cipher_bytes": float(np.mean(up_cipher)) * scale,
        "ciphertexts_up": float(np.mean(n_up)) * scale,
        "download_bytes": (len(trace.plain.broadcast) + down_cipher) * scale,
        "download_cipher_bytes": down_cipher * scale,
        "ciphertexts_down": sum(len(b) for b in trace.summed.values()) * scale,
        "key_bytes_server": len(keys.public),
        "key_bytes_client": len(keys.secret),
        "encrypted_values_per_client": float(values) * scale,
        "max_abs_error_vs_plaintext": trace.max_abs_error,
        "max_rel_error_vs_plaintext": (
            trace.max_abs_error / trace.max_ref if trace.max_ref else 0.0
        ),
        "error_of": "decrypted columns vs sum_i p_i s_i B_i A_i[:, G[j]] over clients k_i > j",
        "layers_measured": n_meas,
        "scaled_from_layers": n_meas != shape.layers,
        "full_he_layout": FULL_HE_LAYOUT,
    }
