"""The three roles of encrypted aggregation: key holder, client and server.

We use TenSEAL (Benaissa et al., "TenSEAL: A Library for Encrypted Tensor Operations Using
Homomorphic Encryption", ICLR 2021 workshop on distributed and private ML, arXiv:2104.03152),
a Python wrapper around Microsoft SEAL.

Notes
-----
* :class:`KeyHolder` generates the keys. It hands the **secret** context (as bytes) to clients and
  the **public** context (as bytes, no secret key) to the server.
* :class:`ClientCrypto` (secret context) encrypts a client's update and decrypts the aggregate.
  With ``seeded=True`` it encrypts symmetrically with the secret key and sends the seed of the
  random polynomial instead of the polynomial (:mod:`~shelora_core.ckks.seeded`): about half
  the bytes per fresh ciphertext.
* :class:`ServerCrypto` (public context) adds ciphertexts and multiplies them by plaintext weights;
  it cannot decrypt, by construction (its context holds no secret key). It loads TenSEAL bytes
  and seeded ciphertexts alike (the first byte tells them apart); its results are TenSEAL bytes.

The roles exchange only bytes, and each exposes the key's ``fingerprint``
(:func:`~shelora_core.ckks.context_fingerprint`) for receivers to check.

Rounding of decrypted aggregates
--------------------------------
A CKKS decryption returns the message plus the ciphertext's noise, and the noise is a function of
the secret key: whoever holds a ciphertext *and* its exact decryption can recover the key (Li and
Micciancio, "On the Security of Homomorphic Encryption on Approximate Numbers", EUROCRYPT 2021).
In the protocol every client decrypts the server's aggregates and what it does with them (its
next upload, the released model) leaves it, so the protocol rounds every decrypted value to a
grid of :data:`DECRYPT_PRECISION` (``2^-22``, about 2.4e-7, absolute) before it leaves the
decryption: :meth:`ClientCrypto.with_precision` gives the rounding view that
:func:`shelora_core.client.receive` (every method's receive path) decrypts with.

The grid is a trade-off. CKKS noise is absolute, so the grid must be too, and above the noise:
the largest decryption errors measured for the parameter sets in use (scale 2^40) are 3-7e-9 for
fresh ciphertexts, 1-3e-8 for sums of 10-32 ciphertexts, 3.6e-8 after ``weighted_sum`` and 5e-9
for paper mode's ``mm``; ``2^-22`` is ~7x the largest and 10-50x the typical. A decrypted value
then rounds to the grid point of its exact value except within the noise of a grid boundary
(a few percent of the values at these errors; the fraction halves with every doubling of the
grid): the noise bits below the grid are removed, not flooded (such a value still shows on which
side its noise fell). The cost is a rounding error of up to 1.2e-7 absolute on every decrypted
value: negligible for the pre-weighted sums of the ``delta`` modes (divided by the total sample
count afterwards); in notebook 04's protocol check (paper mode decrypts dW columns directly) the
worst error relative to max |dW| was 1.7e-7 unrounded and 8.1e-6 with a grid of ``2^-20``, too
close to that notebook's 1e-5 bar; ``2^-22`` scales it to about 2e-6 (within the 1.5 orders of
magnitude its pinned value allows). Plain :meth:`ClientCrypto.decrypt` (no precision) stays exact, for
measuring CKKS precision.
"""

from __future__ import annotations

import copy
import math
import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import Any, NoReturn

import numpy as np
import tenseal as ts
import tenseal.sealapi as sealapi

from .context import ContextInfo, context_fingerprint, context_info, load_context
from .errors import CKKSError
from .params import CKKSParams, check_security
from .seeded import SeededEncryptor, load_ciphertext

__all__ = ["DECRYPT_PRECISION", "ClientCrypto", "KeyHolder", "ServerCrypto", "round_to_grid"]

#: the grid (absolute) decrypted aggregates are rounded to before they leave a client's
#: decryption (module docstring, "Rounding of decrypted aggregates")
DECRYPT_PRECISION = 2.0**-22


def round_to_grid(values: np.ndarray, precision: float) -> np.ndarray:
    """``values`` rounded to the nearest multiple of ``precision`` (half to even).

    Raises:
        CKKSError: a precision that is not a finite number > 0.
    """
    if not (isinstance(precision, (int, float)) and math.isfinite(precision) and precision > 0):
        raise CKKSError(
            f"decryption precision {precision!r} must be a finite number > 0, e.g. "
            f"DECRYPT_PRECISION = {DECRYPT_PRECISION:.3g}"
        )
    x = np.asarray(values, np.float64)
    return np.round(x / precision) * precision


def _new_context(p: CKKSParams) -> ts.Context:
    try:
        ctx = ts.context(
            ts.SCHEME_TYPE.CKKS,
            poly_modulus_degree=p.poly_modulus_degree,
            coeff_mod_bit_sizes=list(p.coeff_mod_bit_sizes),
        )
    except Exception as exc:
        raise CKKSError(f"{p.name}: TenSEAL/SEAL rejected the parameters: {exc}") from exc
    ctx.global_scale = p.global_scale
    return ctx


class KeyHolder:
    """Generates a CKKS key pair and hands out the secret and public contexts as bytes.

    Use :meth:`generate`; clients get :meth:`secret_bytes`, the server :meth:`public_bytes`.
    """

    def __init__(
        self,
        params: CKKSParams,
        ctx: ts.Context,
        secret: bytes,
        public: bytes,
        seed: int | None = None,
    ) -> None:
        self.params = params
        self.seed = seed
        self._ctx = ctx
        self._secret = secret
        self._public = public
        self._fingerprint = context_fingerprint(ctx)

    @classmethod
    def generate(
        cls,
        params: CKKSParams | str = "add_only",
        *,
        seed: int | None = None,
        galois_steps: Iterable[int] | None = None,
    ) -> KeyHolder:
        """Create a fresh key pair for ``params`` (checked with :func:`check_security`).

        Args:
            params: a :class:`CKKSParams` or the name of a set in :data:`PARAM_SETS`.
            seed: recorded for provenance only. SEAL draws key and encryption randomness from
                the operating system and TenSEAL exposes no way to seed it, so keys, ciphertext
                bytes and fingerprints differ on every run; decrypted aggregates are
                reproducible up to the CKKS noise (~1e-8 for ``add_only``).
            galois_steps: generate Galois keys for exactly these rotation steps (e.g. a
                packed layout's :meth:`~shelora_core.methods.packing.PackedLayout.galois_steps`),
                replacing the parameters' own choice; the parameters get ``galois=True``.

        Returns:
            The key holder.

        Raises:
            CKKSError: insecure or unusable parameters, or steps that are 0 or not below the
                slot count in absolute value.
        """
        p = check_security(params)
        if galois_steps is not None:
            steps = tuple(sorted({int(k) for k in galois_steps}, key=lambda k: (abs(k), k)))
            p = check_security(replace(p, galois=True, galois_steps=steps))
        ctx = _new_context(p)
        # Clients only encrypt and decrypt: serialize the secret context *before* generating
        # Galois keys. A secret TenSEAL context never stores relin/Galois keys; it regenerates
        # them on load, which costs ~0.4 s at N=8192 for Galois keys nobody on the client needs.
        secret = ctx.serialize(
            save_public_key=True,
            save_secret_key=True,
            save_galois_keys=False,
            save_relin_keys=False,
        )
        if p.galois and p.galois_steps:
            # TenSEAL generates SEAL's default set only: make the chosen keys with SEAL and put
            # them where TenSEAL's public context keeps its Galois keys (KeyHolder.context
            # itself then holds none: the key holder never rotates)
            public = ctx.serialize(
                save_public_key=True,
                save_secret_key=False,
                save_galois_keys=False,
                save_relin_keys=p.relin_keys,
            )
            public = _with_galois_keys(public, _galois_key_bytes(ctx, p.galois_steps))
            return cls(p, ctx, secret, public, seed)
        if p.galois:
            ctx.generate_galois_keys()
        public = ctx.serialize(
            save_public_key=True,
            save_secret_key=False,
            save_galois_keys=p.galois,
            save_relin_keys=p.relin_keys,
        )
        return cls(p, ctx, secret, public, seed)

    @property
    def context(self) -> ts.Context:
        """The secret TenSEAL context (never send it to the server)."""
        return self._ctx

    @property
    def fingerprint(self) -> str:
        """:func:`context_fingerprint` of this key."""
        return self._fingerprint

    def secret_bytes(self) -> bytes:
        """The secret context (with the secret key) as bytes: for clients only."""
        return self._secret

    def public_bytes(self) -> bytes:
        """The public context (public key, Galois keys if ``params.galois``): for the server."""
        return self._public

    def client(self, *, seeded: bool = False) -> ClientCrypto:
        """A :class:`ClientCrypto` built from :meth:`secret_bytes` (through bytes); ``seeded``
        sets its default for :meth:`ClientCrypto.encrypt`."""
        return ClientCrypto(self._secret, seeded=seeded)

    def server(self) -> ServerCrypto:
        """A :class:`ServerCrypto` built from :meth:`public_bytes` (through bytes)."""
        return ServerCrypto(self._public)

    def __repr__(self) -> str:
        return f"KeyHolder(params={self.params.name!r}, fingerprint={self._fingerprint!r})"


def _galois_key_bytes(ctx: ts.Context, steps: Sequence[int]) -> bytes:
    """SEAL's serialization of Galois keys for exactly ``steps`` (secret context ``ctx``)."""
    seal = ctx.seal_context().data
    keys = sealapi.GaloisKeys()
    # pass Galois elements, not steps: the binding's overloads (steps as int, elements as
    # uint32) both take a list, and a list of positive steps would be read as elements
    elts = seal.key_context_data().galois_tool().get_elts_from_steps(list(steps))
    sealapi.KeyGenerator(seal, ctx.secret_key().data).create_galois_keys(list(elts), keys)
    if keys.size() != len(set(elts)) or not all(keys.has_key(e) for e in elts):
        raise CKKSError(f"SEAL generated {keys.size()} Galois keys for the steps {list(steps)}")
    try:
        with tempfile.TemporaryDirectory(prefix="shelora-galois-") as tmp:
            path = os.path.join(tmp, "galois")
            keys.save(path)  # SEAL's Python binding saves to a path only
            with open(path, "rb") as f:
                return f.read()
    except OSError as exc:
        raise CKKSError(
            f"could not write the Galois keys to a temporary file ({exc}); point TMPDIR to a "
            "writable directory"
        ) from exc


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _proto_fields(buf: bytes) -> list[tuple[int, bytes]]:
    """``(tag number, raw field bytes including the tag)`` of a serialized protobuf message."""
    out, pos = [], 0

    def varint() -> int:
        nonlocal pos
        value = shift = 0
        while True:
            if pos >= len(buf):
                raise CKKSError("truncated protobuf in a serialized TenSEAL context")
            byte = buf[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return value

    while pos < len(buf):
        start = pos
        key = varint()
        wire = key & 7
        if wire == 0:
            varint()
        elif wire == 1:
            pos += 8
        elif wire == 2:
            length = varint()  # (pos += varint() would add to the pos read before the call)
            pos += length
        elif wire == 5:
            pos += 4
        else:
            raise CKKSError(f"unexpected protobuf wire type {wire} in a TenSEAL context")
        out.append((key >> 3, buf[start:pos]))
    if pos != len(buf):
        raise CKKSError("truncated protobuf in a serialized TenSEAL context")
    return out


def _field_payload(raw: bytes) -> bytes:
    """The payload of a length-delimited field (``raw`` as :func:`_proto_fields` returns it)."""
    pos = 0
    while raw[pos] & 0x80:  # the tag
        pos += 1
    pos += 1
    while raw[pos] & 0x80:  # the length
        pos += 1
    return raw[pos + 1 :]


def _with_galois_keys(context: bytes, galois: bytes) -> bytes:
    """A serialized TenSEAL context with ``galois`` (SEAL bytes) as its Galois keys.

    TenSEAL's ``TenSEALContextProto`` keeps them in ``public_context`` (field 2), a
    ``TenSEALPublicProto`` whose field 5 is the SEAL serialization of the keys
    (tenseal/proto/tensealcontext.proto); TenSEAL loads them from there.
    """
    out = []
    for number, raw in _proto_fields(context):
        if number == 2:
            inner = b"".join(r for n, r in _proto_fields(_field_payload(raw)) if n != 5)
            inner += b"\x2a" + _varint(len(galois)) + galois  # field 5, length-delimited
            raw = b"\x12" + _varint(len(inner)) + inner
        out.append(raw)
    return b"".join(out)


def _role_context(data: bytes, *, private: bool) -> tuple[ts.Context, ContextInfo, str]:
    """``(context, info, fingerprint)`` of a client's (``private``) or the server's context,
    refusing parameters that fail :func:`~shelora_core.ckks.check_security` (the check
    :meth:`KeyHolder.generate` runs, repeated on load) and a context that holds the wrong kind
    of key."""
    role = "the client's ClientCrypto" if private else "the server's ServerCrypto"
    ctx = load_context(data, role=role)
    if private and not ctx.is_private():
        raise CKKSError(
            "this is a public context (no secret key): clients need the secret context "
            "(KeyHolder.secret_bytes()) to decrypt the aggregate"
        )
    if not private and ctx.is_private():
        raise CKKSError(
            "this context holds the secret key: the server must never hold the secret key; "
            "give it KeyHolder.public_bytes()"
        )
    return ctx, context_info(ctx), context_fingerprint(ctx)


class ClientCrypto:
    """A client's view: encrypts updates and decrypts aggregates with the secret context.

    Args:
        secret_context: bytes from :meth:`KeyHolder.secret_bytes`.
        seeded: the default of :meth:`encrypt`'s ``seeded`` (``False``: TenSEAL's own bytes).
        precision: :meth:`decrypt` rounds every value to this grid (``None``: exact decryption;
            the protocol's receive path uses :data:`DECRYPT_PRECISION` through
            :meth:`with_precision`).

    Raises:
        CKKSError: the bytes are not a context, its parameters fail
            :func:`~shelora_core.ckks.check_security` (insecure, or a scale that does not fit
            the modulus chain), or the context holds no secret key.
    """

    def __init__(
        self, secret_context: bytes, *, seeded: bool = False, precision: float | None = None
    ) -> None:
        self.context, self.info, self.fingerprint = _role_context(secret_context, private=True)
        self._max_abs = 2.0 ** (self.info.level_bits[-1] - self.info.global_scale_bits - 1)
        self.seeded = bool(seeded)
        self._seeded: SeededEncryptor | None = None  # built on first use
        if precision is not None:
            round_to_grid(np.zeros(0), precision)  # refuses a bad precision by name
        self.precision = precision

    def with_precision(self, precision: float | None = DECRYPT_PRECISION) -> ClientCrypto:
        """This client's context (shared, not copied) whose :meth:`decrypt` rounds every value
        to ``precision`` (``None``: exact)."""
        if precision is not None:
            round_to_grid(np.zeros(0), precision)
        view = copy.copy(self)
        view.precision = precision
        return view

    @property
    def slots(self) -> int:
        """Values per ciphertext."""
        return self.info.slots

    @property
    def max_abs(self) -> float:
        """The largest ``|value|`` a ciphertext of these parameters (or a sum of them) holds."""
        return self._max_abs

    def num_ciphertexts(self, length: int) -> int:
        """``ceil(length / slots)``: ciphertexts needed for ``length`` values."""
        return -(-int(length) // self.slots)

    def encrypt(self, values: np.ndarray, *, seeded: bool | None = None) -> list[bytes]:
        """Encrypt a 1-D float vector, packed densely: ``ceil(len / slots)`` ciphertexts.

        Args:
            values: 1-D array of finite floats.
            seeded: ``True``: encrypt with the secret key (symmetric) and send the seed of the
                random polynomial (:mod:`~shelora_core.ckks.seeded`; about half the bytes,
                :class:`ServerCrypto` loads both formats); ``False``: TenSEAL's public-key
                encryption and serializer. ``None``: this client's default (``seeded`` of the
                constructor).

        Returns:
            One serialized ciphertext per chunk of ``slots`` values (the last one may be shorter).

        Raises:
            CKKSError: not 1-D, non-finite values, or values too large for the parameters.
        """
        x = np.asarray(values, dtype=np.float64)
        if x.ndim != 1:
            raise CKKSError(f"encrypt takes a 1-D vector, got shape {x.shape}: ravel() it first")
        if not np.all(np.isfinite(x)):
            raise CKKSError("cannot encrypt NaN or infinite values")
        if x.size and float(np.max(np.abs(x))) >= self._max_abs:
            raise CKKSError(
                f"|value| up to {float(np.max(np.abs(x))):.3g} does not fit: these parameters hold "
                f"|x| < {self._max_abs:.3g} (first prime minus scale bits)"
            )
        chunks = [x[start : start + self.slots] for start in range(0, x.size, self.slots)]
        if self.seeded if seeded is None else bool(seeded):
            if self._seeded is None:
                self._seeded = SeededEncryptor(self.context, self.fingerprint)
            return self._seeded.encrypt(chunks)
        return [ts.ckks_vector(self.context, c.tolist()).serialize() for c in chunks]

    def decrypt(self, blobs: Sequence[bytes], length: int) -> np.ndarray:
        """Decrypt ciphertexts from :meth:`encrypt` (or an aggregate of them).

        Args:
            blobs: serialized ciphertexts (TenSEAL bytes or seeded ones), in order.
            length: the number of values they hold in total (the plaintext length).

        Returns:
            float64 array of ``length`` values, rounded to :attr:`precision` when it is set.

        Raises:
            CKKSError: corrupted bytes, a seeded ciphertext of another key, or the ciphertexts
                do not hold ``length`` values.
        """
        parts = [np.asarray(self._load(b).decrypt()) for b in blobs]
        flat = np.concatenate(parts) if parts else np.zeros(0)
        if flat.size != length:
            raise CKKSError(
                f"the {len(blobs)} ciphertexts hold {flat.size} values, expected length {length}"
            )
        flat = flat.astype(np.float64, copy=False)
        return flat if self.precision is None else round_to_grid(flat, self.precision)

    def _load(self, blob: bytes) -> ts.CKKSVector:
        return load_ciphertext(
            self.context, blob, fingerprint=self.fingerprint, max_size=self.slots
        )


class ServerCrypto:
    """The server's view: adds and weights ciphertexts with the public context; cannot decrypt.

    Args:
        public_context: bytes from :meth:`KeyHolder.public_bytes`.

    Raises:
        CKKSError: the bytes are not a context, its parameters fail
            :func:`~shelora_core.ckks.check_security`, or they hold the secret key.
    """

    def __init__(self, public_context: bytes) -> None:
        self.context, self.info, self.fingerprint = _role_context(public_context, private=False)
        self._packed: Any = None  # the PackedEvaluator, built on first use

    def packed_evaluator(self) -> Any:
        """The SEAL-level evaluator of the packed products over this public context
        (:class:`~shelora_core.ckks.packed.PackedEvaluator`, built once)."""
        if self._packed is None:
            from .packed import PackedEvaluator

            self._packed = PackedEvaluator(self)
        return self._packed

    @property
    def slots(self) -> int:
        """Values per ciphertext."""
        return self.info.slots

    def load(self, blob: bytes) -> ts.CKKSVector:
        """Deserialize one ciphertext into the public context.

        Args:
            blob: TenSEAL bytes (:func:`~shelora_core.ckks.load_vector`) or a seeded ciphertext
                (:func:`~shelora_core.ckks.load_ciphertext`: its header must name this key; SEAL
                regrows the seeded polynomial), told apart by the first byte.

        Returns:
            The encrypted vector, ready for ``+``, ``*`` and ``mm``.

        Raises:
            CKKSError: bytes that are neither format, damaged bytes, a seeded ciphertext of
                another key, or more values than slots.
        """
        return load_ciphertext(
            self.context, blob, fingerprint=self.fingerprint, max_size=self.slots
        )

    def _load_lists(self, lists: Sequence[Sequence[bytes]]) -> list[list[ts.CKKSVector]]:
        if len(lists) == 0:
            raise CKKSError("nothing to aggregate: no ciphertext lists given")
        n = len(lists[0])
        for i, cts in enumerate(lists):
            if len(cts) != n:
                raise CKKSError(
                    f"client {i} sent {len(cts)} ciphertexts, client 0 sent {n}: all clients must "
                    "use the same PackingLayout"
                )
        vecs = [[self.load(b) for b in cts] for cts in lists]
        for j in range(n):
            sizes = {v[j].size() for v in vecs}
            if len(sizes) != 1:
                raise CKKSError(
                    f"ciphertext {j} holds different numbers of values: {sorted(sizes)}"
                )
        return vecs

    def add(self, lists: Sequence[Sequence[bytes]]) -> list[bytes]:
        """Slot-wise sum of several clients' ciphertext lists.

        Args:
            lists: one list of serialized ciphertexts per client, all of the same length and
                layout.

        Returns:
            The serialized sums, one per position.

        Raises:
            CKKSError: empty input, lists of different lengths / sizes, or corrupted bytes.
        """
        vecs = self._load_lists(lists)
        out: list[bytes] = []
        for j in range(len(vecs[0])):
            acc = vecs[0][j]
            for client in vecs[1:]:
                acc += client[j]
            out.append(acc.serialize())
        return out

    def weighted_sum(
        self, lists: Sequence[Sequence[bytes]], weights: Sequence[float]
    ) -> list[bytes]:
        """``sum_i weights[i] * lists[i]``, multiplying by plaintext scalars then adding.

        Each multiplication consumes one level of the modulus chain (multiply, then rescale), so
        this needs parameters with depth >= 1 such as ``fedshield``. With ``add_only`` either
        pre-weight on the client side (encrypt ``w_i * x_i``) and call :meth:`add`, or use a
        longer modulus chain.

        Args:
            lists: one list of serialized ciphertexts per client.
            weights: one finite plaintext weight per client.

        Returns:
            The serialized weighted sums (one level lower than the inputs).

        Raises:
            CKKSError: the parameters have no multiplicative depth left, mismatched inputs, or
                non-finite weights.
        """
        if len(weights) != len(lists):
            raise CKKSError(f"{len(weights)} weights for {len(lists)} ciphertext lists")
        w = [float(x) for x in weights]
        if not all(math.isfinite(x) for x in w):
            raise CKKSError(f"weights must be finite, got {w}")
        if self.info.depth < 1:
            raise CKKSError(self._no_depth_message())
        vecs = self._load_lists(lists)
        out: list[bytes] = []
        for j in range(len(vecs[0])):
            try:
                acc = vecs[0][j] * w[0]
                for client, wi in zip(vecs[1:], w[1:], strict=True):
                    acc += client[j] * wi
            except ValueError as exc:
                if "scale out of bounds" in str(exc):
                    raise CKKSError(self._no_depth_message() + f" (TenSEAL: {exc})") from exc
                raise
            out.append(acc.serialize())
        return out

    def _no_depth_message(self) -> str:
        return (
            "weighted_sum multiplies ciphertexts by plaintext scalars, which consumes one level of "
            f"the modulus chain, and these ciphertexts have none left (data modulus levels "
            f"{list(self.info.level_bits)} bits; TenSEAL would raise 'scale out of bounds'). "
            "Each scalar multiplication needs a longer modulus chain, one more inner prime (the 'fedshield' "
            "set [60, 40, 40, 60] allows two) - or pre-weight on the client side and use add()"
        )

    def decrypt(self, *args: Any, **kwargs: Any) -> NoReturn:
        """Always raises: the server holds no secret key.

        Raises:
            PermissionError: always.
        """
        raise PermissionError(
            "the server holds no secret key (public context only) and cannot decrypt; only "
            "clients holding the secret context can"
        )
