"""SHE-LoRA: selective CKKS encryption of LoRA A-matrix columns, column-aware secure aggregation.

Liu et al., "SHE-LoRA: Selective Homomorphic Encryption for Federated Tuning with Heterogeneous
LoRA", ICLR 2026. Per adapted layer, an ordered column list ``G`` is public (the negotiation's
output; until that lands, :func:`public_column_order` derives it from the public model). Client i
with budget ``k_i`` protects ``J_i = G[:k_i]``:

* plaintext: ``B_i`` and ``A_i`` with the columns ``J_i`` zeroed;
* encrypted, two modes:

  - ``delta`` (ours, default): ``n_i s_i B_i A_i[:, J_i]`` (its dW columns, weighted by its sample
    count). The server only ADDS ciphertexts, slot-wise; clients divide the decrypted sum by the
    total sample count (public). No multiplicative depth: ``add_only`` CKKS parameters (N=4096,
    32 bytes per value), no Galois keys, no server-side matrix products.
  - ``paper`` (the authors'): each column ``A_i[:, j]`` as a ciphertext of r_i values; the server
    multiplies it by the plaintext ``(p_i s_i B_i)^T`` (TenSEAL ``mm``, needs Galois keys) into an
    encrypted dW column of m values and adds those.
  - ``packed``: the paper's protocol with dense packing. Each client packs all its protected
    columns ``A_i[:, G[j]]`` (every layer, ``j < k_i``; ``r_i`` values each) into as few
    ciphertexts as the public :class:`~shelora_core.methods.packing.PackedLayout` allows; the
    server computes ``p_i s_i B_i A_i[:, G[j]]`` for all of them with masks, rotations and
    plaintext diagonal products (:mod:`shelora_core.ckks.packed`; Galois keys of the ``packed``
    parameter set), in output slots common to every rank (blocks of one width), so the clients'
    products add slot-wise, and broadcasts the sums densely packed (``m`` values per block).

Packing (delta): segments are ordered *position-major* (position 0 of G in every layer, then
position 1, ...), so a client's protected values are a prefix of one flat vector: a client with a
smaller budget sends fewer ciphertexts, and the server adds ciphertext c over the clients that
sent it. Zero-padding the last ciphertext costs nothing (a ciphertext's size does not depend on
how many slots are used).

The server broadcasts the plaintext part P = sum_i p_i s_i B_i A_i^plain exactly (its thin SVD,
all components) and the summed ciphertexts; each client fuses P + D E_G^T and truncates to its rank
through the low-rank SVD (:mod:`shelora_core.column_aggregation`).

Ablation ``shelora_protect="withhold"`` (the reviewers' question: what does encryption buy over
simply dropping the sensitive columns?): client i sends exactly the plaintext part above and NO
ciphertexts (no CKKS at all). The server aggregates, for every column ``c`` of every layer,

    dW[:, c] = sum_{i in S_c} (p_i / q_c) s_i B_i A_i[:, c],   q_c = sum_{i in S_c} p_i,

where ``S_c`` are the clients that sent column c (for ``c = G[j]``: the clients with ``k_i <= j``;
for columns outside G: everybody, q_c = 1, i.e. FlexLoRA). A column nobody sent (``j < min k_i``)
is zero in the global update: the clients' local training of it is discarded every round. The
re-weighting by ``1 / q_c`` is a scaling of the rows of the stacked right factor, so the aggregate
stays low-rank and is broadcast like FlexLoRA's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..adapters import AdapterWeights, fit_rank
from ..aggregation import LowRankUpdate, lora_scaling, lowrank_svd
from ..ckks import ServerCrypto, check_fingerprint
from ..ckks.errors import CKKSError
from ..ckks.packed import BlockInput
from ..column_aggregation import fuse, plain_part, protected_columns, reparameterize, split_columns
from ..config import FederatedConfig
from ..errors import ProtocolError
from ..messages import Message, MessageError, require
from .base import AggregateArgs, Method, ReceiveArgs, UploadArgs
from .budget import encrypted_values
from .packing import PackedLayout, delta_layout
from .wire import (
    SEP,
    adapter_to_upload,
    attach_ciphertexts,
    put_svd,
    read_svd,
    split_ciphertexts,
    upload_to_adapter,
)

__all__ = [
    "SHELoRA",
    "public_column_order",
    "public_columns",
    "withheld_column_weights",
]


def public_column_order(
    layer_weights: Mapping[str, np.ndarray], length: int, *, order: str = "w0_norm", seed: int = 0
) -> dict[str, list[int]]:
    """An ordered column list G per layer from public information only.

    Stand-in until the sensitivity negotiation lands: ``"w0_norm"`` ranks the input columns of the
    frozen weight by decreasing L2 norm; ``"random"`` is a seeded permutation.
    """
    out = {}
    for i, (name, w0) in enumerate(sorted(layer_weights.items())):
        n = w0.shape[1]
        if length > n:
            raise ValueError(
                f"HE budget {length} columns exceeds layer {name!r} width {n}: lower he_budgets"
            )
        if order == "w0_norm":
            cols = np.argsort(-np.linalg.norm(w0, axis=0), kind="stable")[:length]
        elif order == "random":
            cols = np.random.default_rng([seed, i, 7]).permutation(n)[:length]
        else:
            raise ValueError(f"unknown column order {order!r}; choose 'w0_norm' or 'random'")
        out[name] = [int(c) for c in cols]
    return out


def public_columns(
    cfg: FederatedConfig, layer_weights: Mapping[str, np.ndarray]
) -> dict[str, list[int]] | None:
    """G when the config takes it from public information, else ``None``.

    The one place that turns ``cfg.column_order`` into columns without a negotiation: the
    ablation orders ``"w0_norm"`` and ``"random"`` (``cfg.max_budget`` columns per layer of the
    frozen weights ``layer_weights``). ``None`` for methods other than SHE-LoRA and for
    ``"negotiated"``, whose G only the negotiation produces.
    """
    if not cfg.uses_columns or cfg.column_order == "negotiated":
        return None
    return public_column_order(layer_weights, cfg.max_budget, order=cfg.column_order, seed=cfg.seed)


def withheld_column_weights(budgets: Sequence[int], p: Sequence[float], k_max: int) -> np.ndarray:
    """``1 / q_j`` per position j of G for the withhold ablation (0 where nobody sent G[j]).

    ``q_j = sum of p_i over the clients with k_i <= j``, i.e. that sent column G[j] in plaintext.
    """
    budgets_arr, p_arr = np.asarray(budgets), np.asarray(p, np.float64)
    q = np.array([p_arr[budgets_arr <= j].sum() for j in range(k_max)])
    return np.divide(1.0, q, out=np.zeros_like(q), where=q > 0)


class SHELoRA(Method):
    """SHE-LoRA's client and server steps (see the module docstring)."""

    name = "shelora"
    needs_crypto = True

    def __init__(self, cfg: FederatedConfig | None = None) -> None:
        super().__init__(cfg)
        self.mode = self.cfg.cipher_mode
        self.withhold = self.cfg.shelora_protect == "withhold"
        self.needs_crypto = not self.withhold  # the withhold ablation sends no ciphertext

    @property
    def adds_preweighted(self) -> bool:
        return self.mode == "delta" and not self.withhold

    # ------------------------------------------------------------------ client: upload
    def _upload(self, weights: AdapterWeights, req: UploadArgs) -> Message:
        round_, client_id, num_examples, crypto, columns, _, _ = req
        if columns is None or (crypto is None and not self.withhold):
            raise ValueError(
                "SHE-LoRA uploads need the client's CKKS context and the column list G"
            )
        k = self.cfg.client_budget(client_id)
        k_max = self.cfg.max_budget
        s = lora_scaling(weights.alpha, weights.rank)
        plain = AdapterWeights(weights.rank, weights.alpha, {}, weights.head)
        protected: dict[str, np.ndarray] = {}
        for layer, (b, a) in weights.factors.items():
            g = list(columns[layer])[:k_max]
            a_plain, a_cols = split_columns(a, g[:k])
            plain.factors[layer] = (b, a_plain.astype(np.float32))
            if self.withhold:
                continue
            if self.mode == "delta":
                protected[layer] = protected_columns(b, a, g[:k], num_examples * s)  # m x k
            else:
                protected[layer] = a_cols.astype(np.float64)  # r x k
        msg = adapter_to_upload(
            plain, method=self.name, round_=round_, client_id=client_id, num_examples=num_examples
        )
        cols = {layer: list(columns[layer])[:k_max] for layer in weights.factors}
        if self.withhold:  # the columns G[:k] are simply not sent
            msg.header.update(budget=k, protect="withhold", columns=cols, ciphertexts=0)
            return msg
        msg.header.update(
            budget=k, cipher_mode=self.mode, fingerprint=crypto.fingerprint, columns=cols
        )
        blobs: list[bytes] = []
        if k > 0 and self.mode == "delta":
            rows = {layer: b.shape[0] for layer, (b, _) in weights.factors.items()}
            layout = delta_layout(rows, k_max, crypto.slots)
            flat = layout.pack(
                {
                    f"{layer}#{j}": (protected[layer][:, j] if j < k else np.zeros(rows[layer]))
                    for layer in rows
                    for j in range(k_max)
                }
            )
            # the client's prefix of the flat vector: sum over layers of k x m values
            used = encrypted_values(
                self.cfg,
                client_id,
                weights.shapes,
            )
            n_ct = crypto.num_ciphertexts(used)
            flat = flat[:used]  # zero-pad the last ciphertext: free, its size does not change
            blobs = self._encrypt_summed(
                crypto, np.concatenate([flat, np.zeros(n_ct * crypto.slots - used)])
            )
        elif k > 0 and self.mode == "packed":  # every protected A column, densely packed
            layout = self._packed_layout(
                {layer: b.shape[0] for layer, (b, _) in weights.factors.items()}, crypto.slots
            )
            blobs = self._encrypt(crypto, layout.pack(weights.rank, k, protected))
        elif k > 0:  # paper mode: one ciphertext per protected A column (r values)
            for j in range(k):
                for layer in sorted(protected):
                    blobs += self._encrypt(crypto, protected[layer][:, j])
        attach_ciphertexts(msg.tensors, blobs)
        msg.header["ciphertexts"] = len(blobs)
        return msg

    # ------------------------------------------------------------------ server: checks
    def agreement(self, upload: Message) -> Any:
        """The column list G the upload protects (every client of a round shares it)."""
        cols = upload.header.get("columns")
        if not isinstance(cols, dict):
            return None
        try:
            return tuple(sorted((k, tuple(int(c) for c in v)) for k, v in cols.items()))
        except (TypeError, ValueError):
            return None

    def check_upload(self, upload: Message, ctx: Any) -> None:
        """Budget, cipher mode, the shared column list G (``k_max`` distinct columns per layer,
        each within the layer's width), G's first k_i columns of A zeroed in plaintext, and the
        ciphertext count its budget and layer shapes give; then the plaintext checks."""
        from ..validation import check_int

        h = upload.header
        cid = int(h["client_id"])
        geometry = self.upload_geometry(upload)
        k = check_int(h, "budget")
        if k != self.cfg.client_budget(cid):
            raise ProtocolError(
                f"upload from client {cid} has budget {k}; the configuration gives it "
                f"{self.cfg.client_budget(cid)}",
                client_id=cid,
                reason="budget",
            )
        self._check_columns(upload, geometry, ctx)
        for layer in geometry:
            g = h["columns"][layer][:k]
            if g and np.any(upload.tensors[f"{layer}{SEP}A"][:, g]):
                raise ProtocolError(
                    f"upload from client {cid}: layer {layer!r} sends protected columns "
                    f"{g[:4]}... of A in plaintext; they must be zero (they travel encrypted)",
                    client_id=cid,
                    reason="columns",
                )
        self._check_factors(upload, ctx)
        if self.withhold:
            if h.get("protect") != "withhold":
                raise ProtocolError(
                    f"upload from client {cid} is a {h.get('protect', 'encrypt')!r} upload; the "
                    "server runs the withhold ablation",
                    client_id=cid,
                    reason="mode",
                )
            self._check_ciphertexts(upload, ctx, 0, "withheld columns")
            return
        if h.get("cipher_mode") != self.mode:
            raise ProtocolError(
                f"upload from client {cid} used cipher mode {h.get('cipher_mode')!r}; the "
                f"server runs {self.mode!r}",
                client_id=cid,
                reason="mode",
            )
        slots = ctx.crypto.slots if ctx.crypto is not None else 1
        expected = self._expected_ciphertexts(upload, slots)
        self._check_ciphertexts(
            upload,
            ctx,
            expected,
            f"its budget {k}, rank and layer shapes"
            if self.mode == "packed"
            else f"its budget {k} and layer shapes",
        )
        if self.mode == "packed" and expected:  # the products need fresh ciphertexts
            evaluator = ctx.crypto.packed_evaluator()
            for name in sorted(t for t in upload.tensors if t.startswith("enc" + SEP)):
                try:
                    evaluator.load(upload.tensors[name].tobytes())
                except CKKSError as exc:
                    raise ProtocolError(
                        f"upload from client {cid}: ciphertext {name!r} cannot enter the packed "
                        f"products ({exc})",
                        client_id=cid,
                        reason="ciphertext",
                    ) from exc

    def _check_columns(self, upload: Message, geometry: dict, ctx: Any) -> None:
        cid = upload.header.get("client_id")
        cols = upload.header.get("columns")
        k_max = self.cfg.max_budget

        def bad(why: str) -> ProtocolError:
            return ProtocolError(
                f"upload from client {cid}: column list {why}", client_id=cid, reason="columns"
            )

        if not isinstance(cols, dict) or set(cols) != set(geometry):
            raise bad(
                f"covers layers {sorted(cols)[:3] if isinstance(cols, dict) else cols!r}, "
                "not the layers it uploads"
            )
        for layer, g in cols.items():
            n = geometry[layer][1]
            ok = isinstance(g, list) and all(
                isinstance(c, int) and not isinstance(c, bool) for c in g
            )
            if not ok or len(g) != k_max or len(set(g)) != len(g):
                raise bad(f"of layer {layer!r} must be {k_max} distinct integers, got {g!r:.80}")
            if g and not 0 <= min(g) <= max(g) < n:
                raise bad(f"of layer {layer!r} has columns outside 0 .. {n - 1}: {g!r:.80}")
        if ctx.agreed is not None and self.agreement(upload) != ctx.agreed:
            raise bad("differs from the one the round's other clients share (G is common)")

    # ------------------------------------------------------------------ server
    def _aggregate(self, uploads: Sequence[Message], req: AggregateArgs) -> Message:
        round_, max_rank, crypto, _ = req
        if self.withhold:
            return self._aggregate_withheld(uploads, round_=round_, max_rank=max_rank)
        self._need_crypto(crypto, "server")
        plain_msgs, blobs, headers = [], [], []
        for u in uploads:
            require(u.header, "budget", "fingerprint", "columns", "ciphertexts", "cipher_mode")
            check_fingerprint(crypto.fingerprint, u.header["fingerprint"])
            if u.header["cipher_mode"] != self.mode:
                raise MessageError(
                    f"client {u.header.get('client_id')} used cipher mode "
                    f"{u.header['cipher_mode']!r}, the server runs {self.mode!r}"
                )
            need = f"its budget {u.header['budget']} and layer shapes"
            plain, enc = self._split_encrypted(u, self._expected_ciphertexts(u, crypto.slots), need)
            plain_msgs.append(plain)
            blobs.append(enc)
            headers.append(u.header)
        columns = headers[0]["columns"]
        for h in headers[1:]:
            if h["columns"] != columns:
                raise MessageError(
                    f"client {h['client_id']} protects other columns than client "
                    f"{headers[0]['client_id']}: the column list G must be shared"
                )
        _, weights, p, r_max = self._decode_uploads(plain_msgs, max_rank)
        scalings = [lora_scaling(w.alpha, w.rank) for w in weights]
        tensors: dict[str, np.ndarray] = {}
        for layer in weights[0].factors:
            svd = lowrank_svd(plain_part([w.factors[layer] for w in weights], p, scalings))
            put_svd(tensors, layer, svd)
        budgets = [int(h["budget"]) for h in headers]
        k_max = self.cfg.max_budget
        if self.mode == "delta":
            summed = self._sum_prefixes(blobs, crypto)
        elif self.mode == "packed":
            summed = self._packed_products(blobs, weights, p, scalings, budgets, crypto)
        else:
            summed = self._paper_products(blobs, weights, p, scalings, budgets, crypto)
        attach_ciphertexts(tensors, summed)
        counts = [sum(1 for k in budgets if k > j) for j in range(k_max)]
        extra = dict(k_max=k_max, contributors=counts, ciphertexts=len(summed))
        extra.update(fingerprint=crypto.fingerprint, cipher_mode=self.mode)
        return self._column_broadcast(tensors, weights, p, headers, round_, r_max, **extra)

    def _aggregate_withheld(
        self, uploads: Sequence[Message], *, round_: int, max_rank: int | None
    ) -> Message:
        """The withhold ablation: each column averaged over the clients that sent it."""
        headers = []
        for u in uploads:
            require(u.header, "budget", "columns", "protect")
            if u.header["protect"] != "withhold" or u.header.get("ciphertexts", 0):
                raise MessageError(
                    f"client {u.header.get('client_id')} sent a {u.header['protect']!r} upload "
                    "with ciphertexts; the server runs the withhold ablation"
                )
            headers.append(u.header)
        columns = headers[0]["columns"]
        if any(h["columns"] != columns for h in headers[1:]):
            raise MessageError("clients withhold other columns: the column list G must be shared")
        _, weights, p, r_max = self._decode_uploads(uploads, max_rank)
        scalings = [lora_scaling(w.alpha, w.rank) for w in weights]
        budgets = [int(h["budget"]) for h in headers]
        k_max = self.cfg.max_budget
        inv_q = withheld_column_weights(budgets, p, k_max)
        tensors: dict[str, np.ndarray] = {}
        for layer in weights[0].factors:
            stacked = plain_part([w.factors[layer] for w in weights], p, scalings)
            right = stacked.right.copy()
            g = list(columns[layer])[:k_max]
            right[:, g] *= inv_q[: len(g)]  # re-weight column G[j] over its senders
            svd = lowrank_svd(LowRankUpdate(left=stacked.left, right=right))
            put_svd(tensors, layer, svd)
        senders = [sum(1 for k in budgets if k <= j) for j in range(k_max)]
        # k_max 0: nothing encrypted, clients fuse no column
        extra = dict(k_max=0, withheld=k_max, contributors=senders, ciphertexts=0)
        return self._column_broadcast(
            tensors, weights, p, headers, round_, r_max, protect="withhold", **extra
        )

    def _column_broadcast(
        self, tensors, weights, p, headers, round_: int, r_max: int, **header: Any
    ) -> Message:
        """The broadcast with what every SHE-LoRA broadcast carries: G and the total sample count."""
        header.update(
            columns=headers[0]["columns"],
            total_examples=int(sum(h["num_examples"] for h in headers)),
        )
        return self._broadcast(tensors, weights, p, headers, round_=round_, r_max=r_max, **header)

    def _expected_ciphertexts(self, upload: Message, slots: int) -> int:
        """Ciphertexts an upload must carry, from public inputs: its budget and layer shapes
        (and, packed, its rank)."""
        k = int(upload.header["budget"])
        rows = {
            name[: -len(SEP) - 1]: v.shape[0]
            for name, v in upload.tensors.items()
            if name.endswith(f"{SEP}B")
        }
        if self.mode == "delta":
            return -(-sum(rows.values()) * k // slots)
        if self.mode == "packed":  # the rank of the factors sent (validation: the client's)
            ranks = {v.shape[1] for n, v in upload.tensors.items() if n.endswith(f"{SEP}B")}
            if len(ranks) != 1:
                raise MessageError(f"the upload's factors B have ranks {sorted(ranks)}, not one")
            return self._packed_layout(rows, slots).inputs(ranks.pop(), k) if k else 0
        return k * len(rows)

    def _packed_layout(self, rows: dict[str, int], slots: int) -> PackedLayout:
        """The packed mode's public layout: layer heights, ``k_max`` and the federation's
        largest rank (every client and the server build the same one)."""
        return PackedLayout.build(rows, self.cfg.max_budget, max(self.cfg.client_ranks), slots)

    def _packed_products(self, blobs, weights, p, scalings, budgets, crypto: ServerCrypto):
        """The output ciphertexts of :class:`PackedLayout` up to the largest budget: per
        block, ``sum_i p_i s_i B_i[rows] A_i[:, G[j]]`` over the clients with ``k_i > j``."""
        rows = {layer: b.shape[0] for layer, (b, _) in weights[0].factors.items()}
        layout = self._packed_layout(rows, crypto.slots)
        evaluator = crypto.packed_evaluator()
        pairs = [(w.rank, k) for w, k in zip(weights, budgets, strict=True)]
        evaluator.check_steps(set().union(*layout.rotations(pairs)))
        loaded = [[evaluator.load(b) for b in client] for client in blobs]
        where = [{(ci, o): (ct, pos) for ci, o, ct, pos in layout.groups(*pr)} for pr in pairs]
        out = []
        for ci, c in enumerate(layout.classes):
            for o in range(c.outputs(max(budgets, default=0))):
                inputs = []
                for i, w in enumerate(weights):
                    if (ci, o) not in where[i]:
                        continue
                    ct, pos = where[i][ci, o]
                    factor = p[i] * scalings[i]
                    mats = [
                        None
                        if blk is None or blk.position >= budgets[i]
                        else factor
                        * w.factors[blk.layer][0][blk.row0 : blk.row0 + blk.rows].astype(np.float64)
                        for blk in c.output_blocks(o)
                    ]
                    inputs.append(BlockInput(loaded[i][ct], pos, w.rank, mats))
                out.append(
                    evaluator.block_products(
                        inputs, blocks=c.per_output, rows=c.height, baby=layout.baby
                    )
                )
        return evaluator.serialize(out)

    @staticmethod
    def _sum_prefixes(blobs: list[list[bytes]], crypto: ServerCrypto) -> list[bytes]:
        """Ciphertext c summed over the clients that sent it (budgets nest, so layouts do too)."""
        out = []
        for c in range(max((len(b) for b in blobs), default=0)):
            out += crypto.add([[b[c]] for b in blobs if len(b) > c])
        return out

    def _paper_products(self, blobs, weights, p, scalings, budgets, crypto: ServerCrypto):
        """``sum_i enc(A_i[:, j]) x (p_i s_i B_i)^T`` per (position j, layer): m values each."""
        layers = sorted(weights[0].factors)
        out = []
        for j in range(max(budgets)):  # positions some answering client protects
            for li, layer in enumerate(layers):
                acc = None
                for i, w in enumerate(weights):
                    if budgets[i] <= j:
                        continue
                    vec = crypto.load(blobs[i][j * len(layers) + li])
                    mat = (p[i] * scalings[i] * w.factors[layer][0].astype(np.float64)).T
                    prod = vec.mm(mat.tolist())
                    acc = prod if acc is None else acc + prod
                if acc is None:  # no client protects this position: an encrypted zero column
                    raise MessageError(f"no client protects position {j}; budgets {budgets}")
                out.append(acc.serialize())
        return out

    # ------------------------------------------------------------------ client: new adapter
    def _receive(self, broadcast: Message, req: ReceiveArgs) -> AdapterWeights:
        rank, alpha, seed, crypto = req
        require(
            broadcast.header, "columns", "k_max", "contributors", "ciphertexts", "total_examples"
        )
        h = broadcast.header
        if h.get("protect") == "withhold" and int(h["k_max"]) == 0:
            crypto = None  # nothing to decrypt
        elif crypto is None:
            raise ValueError("a SHE-LoRA client needs its CKKS context to read the broadcast")
        else:
            require(h, "fingerprint")
            check_fingerprint(crypto.fingerprint, h["fingerprint"])
        plain, blobs = split_ciphertexts(broadcast)
        layers, head = self._split(plain)
        rows = {layer: t["U"].shape[0] for layer, t in layers.items()}
        k_max = int(h["k_max"])
        if k_max == 0:  # nothing protected: SHE-LoRA degenerates to FlexLoRA
            d = {layer: np.zeros((rows[layer], 0)) for layer in rows}
        elif self.mode == "delta":
            layout = delta_layout(rows, k_max, crypto.slots)
            flat = crypto.decrypt(blobs, len(blobs) * crypto.slots)[: layout.total]
            parts = layout.unpack(np.concatenate([flat, np.zeros(layout.total - flat.size)]))
            d = {
                layer: np.stack([parts[f"{layer}#{j}"] for j in range(k_max)], axis=1)
                / float(h["total_examples"])
                for layer in rows
            }
        elif self.mode == "packed":
            layout = self._packed_layout(rows, crypto.slots)
            if layout.k_max != k_max:
                raise MessageError(
                    f"the broadcast protects {k_max} positions, this configuration {layout.k_max}"
                )
            k_eff = sum(1 for c in h["contributors"] if int(c) > 0)  # the largest budget
            n = layout.outputs(k_eff)
            if len(blobs) != n:
                raise MessageError(
                    f"the packed broadcast holds {len(blobs)} ciphertexts; its layout needs {n} "
                    f"for the largest budget {k_eff}"
                )
            flat = crypto.decrypt(blobs, n * crypto.slots) if n else np.zeros(0)
            d = layout.unpack(flat, k_eff, rows)
        else:
            order = sorted(rows)
            d = {layer: np.zeros((rows[layer], k_max)) for layer in rows}
            for c, blob in enumerate(blobs):
                j, li = divmod(c, len(order))
                d[order[li]][:, j] = crypto.decrypt([blob], rows[order[li]])
        if self.cfg.authors_weighting:  # the authors' code: also divide by the contributor count
            counts = np.maximum(np.asarray(h["contributors"], np.float64), 1.0)
            d = {layer: v / counts for layer, v in d.items()}
        scaling = lora_scaling(alpha, rank)
        factors = {}
        for layer, t in layers.items():
            plain = read_svd(t)
            fused = fuse(plain, h["columns"][layer][:k_max], d[layer])
            b, a, _ = reparameterize(fused, rank, scaling)
            factors[layer] = fit_rank(b, a, rank, seed=seed)
        return AdapterWeights(rank=rank, alpha=alpha, factors=factors, head=dict(head))


def decode_upload(msg: Message):
    """The plaintext part of an upload (what an attacker reads), without the ciphertexts."""
    return upload_to_adapter(split_ciphertexts(msg)[0])
