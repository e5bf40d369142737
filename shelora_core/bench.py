"""Benchmarks (``make bench``): HE costs per method and the speed of local LoRA training.

``he_cost.json``: see :mod:`shelora_core.he_cost`. ``train_speed.json``:

Measured, not estimated: for each model, one client trains ``local_steps`` AdamW steps on real
Rotten Tomatoes batches through :func:`shelora_core.federation.client_step` (so the number
includes loading the adapter from the broadcast and serialising the upload). Writes
``<out>/train_speed.json`` and a bar chart ``<out>/train_speed.png``. Speed targets live here,
never in timed tests.

    python -m shelora_core.bench --profile quick     # -> results/quick/{he_cost,train_speed}.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

__all__ = ["bench_client_round", "main"]

CASES = (
    # model, rank, batch size, local steps
    ("minilm", 8, 16, 10),
    ("minilm", 8, 32, 10),
    ("smollm2", 8, 8, 3),
    ("smollm2", 32, 8, 3),
)


def bench_client_round(
    model: str, rank: int, batch_size: int, local_steps: int, *, repeats: int = 2
) -> dict:
    """Median wall seconds of one client round (and per step) for one model and rank."""
    import torch

    from .client import client_step
    from .config import FederatedConfig
    from .federation import Federation

    torch.set_num_threads(2)
    cfg = FederatedConfig(
        method="flexlora",
        model=model,
        num_clients=1,
        partition="iid",
        ranks=(rank,),
        rounds=1,
        local_steps=local_steps,
        batch_size=batch_size,
        train_examples=max(batch_size * local_steps, 64),
        eval_examples=32,
        max_length=64,
        min_client_examples=8,
    )
    fed = Federation(cfg, results_dir="/tmp/shelora-bench", progress=False)
    times, upload = [], 0
    for rep in range(repeats + 1):
        t0 = time.perf_counter()
        up, _, _ = client_step(
            cfg, fed.model, fed.clients[0], client_id=0, round_=1, broadcast=None
        )
        if rep:  # the first repetition warms up
            times.append(time.perf_counter() - t0)
        upload = len(up)
    med = statistics.median(times)
    tokens = float(fed.clients[0].attention_mask.sum(1).float().mean())
    return {
        "model": model,
        "rank": rank,
        "batch_size": batch_size,
        "local_steps": local_steps,
        "seconds_per_client_round": med,
        "seconds_per_step": med / local_steps,
        "mean_tokens_per_example": tokens,
        "upload_bytes": upload,
        "repeats": repeats,
    }


def main(argv: list[str] | None = None) -> int:
    from .provenance import run_meta

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", choices=("quick", "paper"), default="quick")
    ap.add_argument("--results", type=Path, default=Path("results"))
    ap.add_argument("--only", choices=("he_cost", "train_speed"))
    args = ap.parse_args(argv)
    args.out = args.results / args.profile
    args.out.mkdir(parents=True, exist_ok=True)
    if args.only != "train_speed":
        from .he_cost import run_plan

        print(f"HE cost per client-round ({args.profile}):", flush=True)
        res = run_plan(args.profile)
        res["meta"] = run_meta()
        (args.out / "he_cost.json").write_text(json.dumps(res, indent=1))
        _he_figure(res["rows"], args.out / "figures" / "he_cost.png")
        _print_reductions(res)
        print("wrote", args.out / "he_cost.json")
    if args.only == "he_cost":
        return 0
    rows = []
    for case in CASES:
        row = bench_client_round(*case)
        print(
            f"{row['model']:8s} r={row['rank']:<3d} batch {row['batch_size']:>2d}: "
            f"{row['seconds_per_step']:.2f} s/step, {row['seconds_per_client_round']:.1f} s per "
            f"client-round of {row['local_steps']} steps, upload {row['upload_bytes'] / 1e3:.0f} KB",
            flush=True,
        )
        rows.append(row)
    (args.out / "train_speed.json").write_text(
        json.dumps({"rows": rows, "meta": run_meta()}, indent=1)
    )
    _figure(rows, args.out / "figures" / "train_speed.png")
    print("wrote", args.out / "train_speed.json")
    return 0


def _print_reductions(res: dict) -> None:
    paper = res["paper"]
    layouts = sorted({r.get("full_he_layout", "padded") for r in res["rows"]})
    print(
        f"\nSHE-LoRA and MaskCrypt vs full HE ({'/'.join(layouts)} layout; measured here | paper "
        "v2 / v1 for SHE-LoRA):"
    )
    for r in res["rows"]:
        if r.get("method", "").startswith(("shelora", "maskcrypt")) and "skipped" not in r:
            print(
                f"  {r['model']:14s} {r['method']:14s} upload {r['upload_change_vs_full_he_pct']:+7.2f}% "
                f"| {paper['upload_reduction_vs_full_he']['v2']}% / "
                f"{paper['upload_reduction_vs_full_he']['v1']}%   encryption time "
                f"{r['encrypt_time_change_vs_full_he_pct']:+7.2f}% | "
                f"{paper['encryption_time_reduction_vs_full_he']['v2']}% / "
                f"{paper['encryption_time_reduction_vs_full_he']['v1']}%   upload "
                f"{r['upload_vs_flexlora_x']:.2f}x plaintext FlexLoRA"
            )
            if "mask_upload_bytes" in r:
                print(
                    f"  {'':14s} {'':14s} + mask exchange per round: proposal "
                    f"{r['mask_upload_bytes'] / 1e6:.2f} MB up, consensus "
                    f"{r['mask_download_bytes'] / 1e6:.2f} MB down, scoring "
                    f"{r['client_mask_seconds']:.3f} s, consensus "
                    f"{r['consensus_server_seconds']:.3f} s"
                )


def _he_figure(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .plots import save

    rows = [r for r in rows if "skipped" not in r]
    models = list(dict.fromkeys(r["model"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    metrics = [
        ("upload_bytes", "upload per client-round (bytes)"),
        ("client_upload_seconds", "client encryption + serialisation (s)"),
        ("server_seconds_per_round", "server aggregation per round (s)"),
    ]
    width = 0.8 / len(methods)
    for ax, (key, label) in zip(axes, metrics, strict=True):
        for j, meth in enumerate(methods):
            vals = [
                next((r[key] for r in rows if r["model"] == mo and r["method"] == meth), np.nan)
                for mo in models
            ]
            ax.bar(np.arange(len(models)) + j * width, vals, width, label=meth)
        ax.set_yscale("log")
        ax.set_xticks(np.arange(len(models)) + 0.4 - width / 2, models)
        ax.set_title(label, fontsize=10)
    axes[0].legend(fontsize=8)
    fig.suptitle(
        "Measured HE costs: ranks 8/16/32, SHE-LoRA budgets 2/4/8 columns per layer "
        "(MaskCrypt: as many values)"
    )
    fig.tight_layout()
    save(fig, path)


def _figure(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .plots import save

    labels = [f"{r['model']}\nr={r['rank']}, b={r['batch_size']}" for r in rows]
    fig, ax = plt.subplots(figsize=(1.6 * len(rows) + 1, 3.2))
    bars = ax.bar(labels, [r["seconds_per_step"] for r in rows], color="#4c72b0")
    ax.bar_label(bars, fmt="%.2f s")
    ax.set_ylabel("seconds per local step (2 CPU cores)")
    ax.set_title("Local LoRA training speed (measured)")
    save(fig, path)


if __name__ == "__main__":
    raise SystemExit(main())
