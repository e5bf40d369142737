"""Measured HE costs per method and client-round (``make bench`` -> ``he_cost.json``).

Every number is measured on real messages through the round engine
(:func:`shelora_core.engine.run_round`): clients build their uploads with their secret CKKS
context, the uploads are serialised, the server aggregates them with the PUBLIC context only, and
every client decrypts and reparameterizes the broadcast. Bytes are ``len()`` of the serialised messages; seconds are wall-clock on this machine.

LoRA factors are synthetic (random, LoRA-like magnitudes) with the exact layer shapes of each
model: costs depend on shapes, ranks and budgets, not on trained values. For the big models the
encrypt-everything methods are measured on ``layers_measured`` of the model's identical layers
and scaled by ``layers / layers_measured`` (bytes exactly, seconds linearly); the JSON says so in
every such row (``scaled_from_layers``).

Full HE and FedShield-LLM encrypt each client's factors at its own rank (results version 4 of
those methods; :class:`~shelora_core.methods.packing.ComponentLayout`): every row states the layout
of the full-HE row it is measured against in ``full_he_layout`` (:data:`FULL_HE_LAYOUT`; rows
without the field are from before, when the full-HE row encrypted factors zero-padded to the
largest rank), so ``upload_change_vs_full_he_pct`` and ``encrypt_time_change_vs_full_he_pct`` say
which baseline they compare with. The zero-padded variant is counted from shapes
(:func:`shelora_core.claims.count_costs`), not measured.

MaskCrypt rows add the per-round mask exchange: ``mask_upload_bytes`` (a client's ranked mask
proposal), ``mask_download_bytes`` (the consensus), ``client_mask_seconds`` (scoring and
proposing; its gradient comes from a synthetic array here, so the backward pass a real client
runs is not included) and ``consensus_server_seconds``. MaskCrypt encrypts per client exactly as
many values as SHE-LoRA at the same budgets and cipher mode (``encrypted_values_per_client``).

``shelora-authors-2^24`` and ``shelora-authors-2^40`` rows measure the SHE-LoRA authors' own
packing and parameters (four A columns per ciphertext, N = 8192, [60, 40, 60]) at their shipped
scale and at 2^40, on the same adapters and columns (:mod:`shelora_core.he_authors`, which says
what is reproduced and what was chosen); their error is that of the decrypted columns
(``error_of``), and they are measured on :data:`AUTHORS_LAYERS` layers and scaled.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from .adapters import AdapterWeights
from .assets import MODELS
from .ckks import KeyHolder
from .config import FederatedConfig
from .engine import run_round
from .messages import decode
from .methods import ckks_params_for, get_method
from .methods.budget import encrypted_values
from .methods.shelora import public_column_order

__all__ = [
    "AUTHORS_LAYERS",
    "FULL_HE_LAYOUT",
    "SHAPES",
    "ModelShape",
    "measure_method",
    "measure_packed",
]

#: what the ``full_he`` (and ``fedshield``) uploads measured here encrypt: each client's factors
#: at its own rank (``"padded"``: zero-padded to the federation's largest rank, before results
#: version 4)
FULL_HE_LAYOUT = "own-rank"


@dataclass(frozen=True)
class ModelShape:
    """Adapted layers of a model: ``layers`` blocks x ``modules`` square (d x d) projections."""

    name: str
    layers: int
    modules: tuple[str, ...]
    d: int

    def layer_shapes(self, n_layers: int | None = None) -> dict[str, tuple[int, int]]:
        n = self.layers if n_layers is None else min(n_layers, self.layers)
        return {f"layers.{i}.{m}": (self.d, self.d) for i in range(n) for m in self.modules}


def _shipped(name: str, label: str) -> ModelShape:
    """A shipped model's cost shape, from the model registry (its default targets)."""
    spec = MODELS[name]
    d = spec.module_shapes[spec.default_targets[0]][1]
    return ModelShape(label, spec.layers, spec.default_targets, d)


#: the shipped SmolLM2 (from :data:`shelora_core.assets.MODELS`) and the paper's models, which do
#: not ship (public architecture shapes: blocks, adapted modules, hidden size)
SHAPES = {
    "smollm2-135m": _shipped("smollm2", "SmolLM2-135M"),
    "openllama-3b": ModelShape("OpenLLaMA-3B", 26, ("q_proj", "v_proj"), 3200),
    "llama2-7b": ModelShape("LLaMA-2-7B", 32, ("q_proj", "v_proj"), 4096),
    "llama2-13b": ModelShape("LLaMA-2-13B", 40, ("q_proj", "v_proj"), 5120),
}


def synthetic_adapter(
    shapes: dict[str, tuple[int, int]],
    rank: int,
    rng: np.random.Generator,
    head: dict[str, np.ndarray] | None = None,
) -> AdapterWeights:
    """Random LoRA factors of the given layer shapes at trained-adapter scales (B ~ N(0, 0.01),
    A ~ N(0, 0.02)): what the cost benchmarks encrypt."""
    return AdapterWeights(
        rank=rank,
        alpha=16.0,
        factors={
            k: (
                rng.normal(0, 0.01, (m, rank)).astype(np.float32),
                rng.normal(0, 0.02, (rank, n)).astype(np.float32),
            )
            for k, (m, n) in shapes.items()
        },
        head=head or {},
    )


def _adapters(shapes, ranks, seed):
    rng = np.random.default_rng(seed)
    return [synthetic_adapter(shapes, r, rng) for r in ranks]


def measure_method(
    method: str,
    shape: ModelShape,
    *,
    ranks=(8, 16, 32),
    budgets=(2, 4, 8),
    cipher_mode: str = "delta",
    layers: int | None = None,
    seed: int = 0,
    keys: dict[str, KeyHolder] | None = None,
    seeded: bool = False,
) -> dict[str, Any]:
    """One round of ``method`` for len(ranks) clients; per-client-round means.

    Args:
        layers: measure on this many layers (``None`` = all) and scale to the model.
        keys: reuse key holders by parameter-set name (key generation is reported separately).
        seeded: clients upload seed-compressed ciphertexts (``seeded_uploads``); the row's
            method name ends in ``-seeded``.
    """
    cfg = FederatedConfig(
        method=method,
        cipher_mode=cipher_mode,
        num_clients=len(ranks),
        ranks=tuple(ranks),
        he_budgets=tuple(budgets),
        seed=seed,
        seeded_uploads=seeded,
    )
    shapes = shape.layer_shapes(layers)
    n_meas = len(shapes) // len(shape.modules)
    scale = shape.layers / n_meas
    params = ckks_params_for(cfg)
    kh = None
    if params is not None:
        keys = {} if keys is None else keys
        kh = keys.get(params) or keys.setdefault(params, KeyHolder.generate(params))
    columns = None
    if method == "shelora":
        w0 = {k: np.random.default_rng(1).normal(size=s) for k, s in shapes.items()}
        columns = public_column_order(w0, max(budgets), order="random", seed=seed)
    adapters = _adapters(shapes, ranks, seed)
    sizes = [100 + 10 * i for i in range(len(ranks))]
    starts = grads = None
    if get_method(method, cfg).needs_consensus:
        starts = _adapters(shapes, ranks, seed + 1)  # the adversary's estimates (synthetic)
        grads = [g.factors for g in _adapters(shapes, ranks, seed + 2)]  # synthetic gradients
    trace = run_round(
        cfg,
        adapters,
        num_examples=sizes,
        client_crypto=kh.client() if kh else None,
        server_crypto=kh.server() if kh else None,
        columns=columns,
        starts=starts,
        grads=grads,
    )
    t = trace.seconds
    mask_row: dict[str, Any] = {}
    if trace.consensus is not None:  # MaskCrypt: proposals -> consensus before the uploads
        cons = decode(trace.consensus, expect_kind="mask_consensus")
        mask_row = {
            "mask_upload_bytes": float(np.mean([len(b) for b in trace.proposals])) * scale,
            "mask_download_bytes": len(trace.consensus) * scale,
            "client_mask_seconds": float(np.mean(t["mask"])) * scale,
            "consensus_server_seconds": t["consensus"] * scale,
            "consensus_union_size": int(cons.header["union_size"]),
        }
    # accuracy of what the largest client receives, vs the plaintext reference
    err, rel = _max_error(cfg, adapters, sizes, trace.received[-1], ranks[-1])
    ups, bc = trace.uploads, trace.broadcast
    row = {
        "method": (f"{method}-{cipher_mode}" if method in ("shelora", "maskcrypt") else method)
        + ("-seeded" if seeded else ""),
        "seeded_uploads": seeded,
        "model": shape.name,
        "layers": shape.layers,
        "modules": list(shape.modules),
        "d": shape.d,
        "ranks": list(ranks),
        "budgets": list(budgets) if method in ("shelora", "maskcrypt") else None,
        "ckks_params": params,
        "client_upload_seconds": float(np.mean(t["upload"])) * scale,
        "server_seconds_per_round": t["server"] * scale,
        "client_receive_seconds": float(np.mean(t["receive"])) * scale,
        "upload_bytes": float(np.mean([len(u) for u in ups])) * scale,
        "download_bytes": len(bc) * scale,
        "key_bytes_server": len(kh.public_bytes()) if kh else 0,
        "key_bytes_client": len(kh.secret_bytes()) if kh else 0,
        "encrypted_values_per_client": _encrypted_values(cfg, shapes) * scale,
        "max_abs_error_vs_plaintext": err,
        "max_rel_error_vs_plaintext": rel,
        "layers_measured": n_meas,
        "scaled_from_layers": n_meas != shape.layers,
        "full_he_layout": FULL_HE_LAYOUT,
        **mask_row,
    }
    return row


def _encrypted_values(cfg: FederatedConfig, shapes) -> float:
    """Mean values a client encrypts per round (SHE-LoRA and MaskCrypt: the same count)."""
    if cfg.method in ("fedavg", "flexlora"):
        return 0.0
    if cfg.method in ("fedshield", "full_he"):  # each client's factors at its own rank
        per_rank = sum(mm + nn for mm, nn in shapes.values())
        return float(np.mean([cfg.client_rank(i) * per_rank for i in range(cfg.num_clients)]))
    per = [encrypted_values(cfg, i, shapes) for i in range(cfg.num_clients)]
    return float(np.mean(per))


def _max_error(cfg, adapters, sizes, got, rank) -> tuple[float, float]:
    """Max |dW - reference dW| for the largest client, reference = the plaintext method."""
    ref_name = "flexlora" if cfg.method in ("shelora", "flexlora") else "fedavg"
    ref = run_round(
        cfg.replace(method=ref_name), adapters, num_examples=sizes, receive_ranks=[rank]
    )
    want = ref.received[0]
    err, top = 0.0, 0.0
    for layer, (b, a) in got.factors.items():
        wb, wa = want.factors[layer]
        ref = wb.astype(np.float64) @ wa
        err = max(err, float(np.abs(b.astype(np.float64) @ a - ref).max()))
        top = max(top, float(np.abs(ref).max()))
    return err, err / top if top else 0.0


#: the paper's reported reductions against full HE (SHE-LoRA v2 / v1) and encryption seconds
PAPER = {
    "upload_reduction_vs_full_he": {"v2": -99.71, "v1": -94.9},
    "encryption_time_reduction_vs_full_he": {"v2": -99.87, "v1": -99.83},
    "encryption_seconds_openllama_3b": {"full_he": 480.0, "maskcrypt": 50.0, "shelora": 0.6},
}

#: what each bench profile measures: (model key, methods, layers for encrypt-everything/paper)
PLAN = {
    "quick": [("smollm2-135m", None), ("openllama-3b", 2)],
    "paper": [("smollm2-135m", None), ("openllama-3b", 2), ("llama2-7b", 1), ("llama2-13b", 1)],
}

#: layers the authors' packing (:mod:`shelora_core.he_authors`) is measured on per model, scaled
#: to the model: its server runs one TenSEAL ``mm`` per protected column over four columns' slots,
#: about 10 CPU seconds per SmolLM2 layer and 20 per OpenLLaMA-3B layer (q and v) at ranks
#: 8/16/32 and budgets 2/4/8, at each of its two scales; bytes scale exactly (identical layers)
AUTHORS_LAYERS = {
    "quick": {"smollm2-135m": 1, "openllama-3b": 1},
    "paper": {"smollm2-135m": 1, "openllama-3b": 1, "llama2-7b": 1, "llama2-13b": 1},
}


def run_plan(profile: str, *, progress: bool = True) -> dict[str, Any]:
    """Measure every method on every model of ``profile``; add the reductions vs full HE."""
    keys: dict[str, KeyHolder] = {}
    rows = []
    for model_key, sub_layers in PLAN[profile]:
        shape = SHAPES[model_key]
        cases = [
            ("flexlora", "delta", None),
            ("shelora", "delta", None),
            ("shelora", "paper", sub_layers),
            # MaskCrypt at SHE-LoRA's budgets (same encrypted values per client); all layers
            ("maskcrypt", "delta", None),
            ("maskcrypt", "paper", None),
            ("full_he", "delta", sub_layers),
            # issue 16: seed-compressed uploads, and the packed paper mode on every layer (one
            # layer of a big model fills a ciphertext poorly: scaling it would overstate bytes)
            ("shelora", "delta", None, True),
            ("shelora", "packed", None),
            ("shelora", "packed", None, True),
        ]
        for method, mode, layers, *flags in cases:
            seeded = bool(flags and flags[0])
            if method == "shelora" and mode == "paper" and shape.d > 4096:
                # ciphertext x matrix products need d <= slots (4096 at N=8192)
                rows.append(
                    {
                        "method": "shelora-paper",
                        "model": shape.name,
                        "skipped": f"d={shape.d} exceeds 4096 slots at N=8192 (needs N=16384)",
                        "full_he_layout": FULL_HE_LAYOUT,
                    }
                )
                continue
            t0 = time.perf_counter()
            row = measure_method(
                method, shape, cipher_mode=mode, layers=layers, keys=keys, seeded=seeded
            )
            rows.append(row)
            if progress:
                print(
                    f"  {shape.name:14s} {row['method']:14s} upload {row['upload_bytes'] / 1e6:9.2f} MB"
                    f"  encrypt {row['client_upload_seconds']:8.3f} s  server "
                    f"{row['server_seconds_per_round']:7.2f} s  ({time.perf_counter() - t0:.0f} s)",
                    flush=True,
                )
        rows += _authors_rows(shape, AUTHORS_LAYERS[profile].get(model_key), progress=progress)
    for row in rows:
        if "skipped" in row:
            continue
        ref = next(r for r in rows if r.get("model") == row["model"] and r["method"] == "full_he")
        row["upload_change_vs_full_he_pct"] = 100 * (row["upload_bytes"] / ref["upload_bytes"] - 1)
        row["encrypt_time_change_vs_full_he_pct"] = 100 * (
            row["client_upload_seconds"] / ref["client_upload_seconds"] - 1
        )
        flex = next(r for r in rows if r.get("model") == row["model"] and r["method"] == "flexlora")
        row["upload_vs_flexlora_x"] = row["upload_bytes"] / flex["upload_bytes"]
    return {"rows": rows, "paper": PAPER}


def _authors_rows(shape: ModelShape, layers: int | None, *, progress: bool) -> list[dict]:
    """The authors' packing at each of its scales on ``shape`` (:mod:`shelora_core.he_authors`);
    a skipped row where a layer's outputs exceed the slots of their ``N = 8192``."""
    from .he_authors import AUTHORS_POLY_DEGREE, AUTHORS_SCALE_BITS, measure_authors

    rows: list[dict] = []
    for bits in AUTHORS_SCALE_BITS:
        if shape.d > AUTHORS_POLY_DEGREE // 2:
            rows.append(
                {
                    "method": f"shelora-authors-2^{bits}",
                    "model": shape.name,
                    "skipped": f"d={shape.d} exceeds {AUTHORS_POLY_DEGREE // 2} slots at "
                    f"N={AUTHORS_POLY_DEGREE} (the authors use N=16384 there)",
                    "full_he_layout": FULL_HE_LAYOUT,
                }
            )
            continue
        t0 = time.perf_counter()
        row = measure_authors(shape, scale_bits=bits, layers=layers)
        rows.append(row)
        if progress:
            print(
                f"  {shape.name:14s} {row['method']:14s} upload {row['upload_bytes'] / 1e6:9.2f} MB"
                f"  encrypt {row['client_upload_seconds']:8.3f} s  server "
                f"{row['server_seconds_per_round']:7.2f} s  max rel. error "
                f"{row['max_rel_error_vs_plaintext']:.1e}  ({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
    return rows


def measure_packed(
    shapes: dict[str, tuple[int, int]],
    *,
    ranks=(8, 16, 32),
    budgets=(2, 4, 8),
    seeded: bool = True,
    keys: str = "pow2",
    seed: int = 0,
) -> dict[str, Any]:
    """One round of SHE-LoRA's ``packed`` mode on ``shapes`` against plaintext FlexLoRA.

    Args:
        shapes: the adapted layers (all of them are measured; nothing is scaled).
        seeded: clients send seed-compressed ciphertexts (``seeded_uploads``).
        keys: ``"pow2"``: the ``packed`` parameter set's power-of-two Galois keys;
            ``"layout"``: exactly the layout's steps
            (:meth:`~shelora_core.methods.packing.PackedLayout.galois_steps`).

    Returns:
        Per-round bytes (uploads summed over the clients), the ratio of the uploads to
        FlexLoRA's, the public context's bytes, wall-clock seconds (client encrypt and decrypt:
        the mean per client) and the largest client's max abs dW error against FlexLoRA.
    """
    from .methods.packing import PackedLayout

    cfg = FederatedConfig(method="shelora", cipher_mode="packed", num_clients=len(ranks),
                          ranks=tuple(ranks), he_budgets=tuple(budgets), seed=seed,
                          seeded_uploads=seeded)  # fmt: skip
    if keys == "layout":
        layout = PackedLayout.build(
            {k: m for k, (m, _) in shapes.items()}, max(budgets), max(ranks), 4096
        )
        steps = layout.galois_steps(zip(ranks, budgets, strict=True))
        kh = KeyHolder.generate("packed", galois_steps=steps)
    else:
        kh = KeyHolder.generate("packed")
    w0 = {k: np.random.default_rng(1).normal(size=s) for k, s in shapes.items()}
    columns = public_column_order(w0, max(budgets), order="random", seed=seed)
    adapters = _adapters(shapes, ranks, seed)
    sizes = [100 + 10 * i for i in range(len(ranks))]
    cpu = time.process_time()
    trace = run_round(cfg, adapters, num_examples=sizes, columns=columns,
                      client_crypto=kh.client(), server_crypto=kh.server())  # fmt: skip
    cpu = time.process_time() - cpu
    from .server import server_step

    server = kh.server()
    server_cpu = time.process_time()  # the server step again, in CPU seconds (one thread)
    server_step(cfg, trace.uploads, round_=1, crypto=server)
    server_cpu = time.process_time() - server_cpu
    flex = run_round(cfg.replace(method="flexlora"), adapters, num_examples=sizes)
    err, rel = _max_error(cfg, adapters, sizes, trace.received[-1], ranks[-1])
    costs = trace.costs()
    return {
        "layers": len(shapes),
        "ranks": list(ranks),
        "budgets": list(budgets),
        "seeded_uploads": seeded,
        "galois_keys": keys,
        "galois_key_count": int(kh.server().context.galois_keys().data.size()),
        "public_context_bytes": len(kh.public_bytes()),
        "upload_bytes": sum(costs["upload_bytes"]),
        "upload_cipher_bytes": sum(costs["upload_cipher_bytes"]),
        "ciphertexts_up": costs["ciphertexts_up"],
        "flexlora_upload_bytes": sum(len(u) for u in flex.uploads),
        "upload_vs_flexlora_x": sum(costs["upload_bytes"]) / sum(len(u) for u in flex.uploads),
        "broadcast_bytes": costs["broadcast_bytes"],
        "broadcast_ciphertexts": int(trace.broadcast_message().header["ciphertexts"]),
        "flexlora_broadcast_bytes": len(flex.broadcast),
        "client_encrypt_seconds": costs["seconds_upload_per_client"],
        "server_seconds": costs["seconds_server"],
        "client_decrypt_seconds": costs["seconds_client_per_client"],
        "server_cpu_seconds": server_cpu,
        "round_cpu_seconds": cpu,
        "broadcast_cipher_bytes": sum(
            v.nbytes for k, v in trace.broadcast_message().tensors.items() if k.startswith("enc|")
        ),
        "max_abs_error_vs_flexlora": err,
        "max_rel_error_vs_flexlora": rel,
    }
