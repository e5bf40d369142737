"""Speed benchmarks (``make bench``): seconds per client-round of local LoRA training.

Measured, not estimated: for each model, one client trains ``local_steps`` AdamW steps on real
Rotten Tomatoes batches through :func:`shelora_core.federation.client_step` (so the number
includes loading the adapter from the broadcast and serialising the upload). Writes
``<out>/train_speed.json`` and a bar chart ``<out>/train_speed.png``. Speed targets live here,
never in timed tests.

    python -m shelora_core.bench --out results/bench
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

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

    from .config import FederatedConfig
    from .federation import Federation, client_step

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
    ap.add_argument("--out", type=Path, default=Path("results/bench"))
    ap.add_argument("--only", choices=("minilm", "smollm2"))
    args = ap.parse_args(argv)
    rows = []
    for case in CASES:
        if args.only and case[0] != args.only:
            continue
        row = bench_client_round(*case)
        print(
            f"{row['model']:8s} r={row['rank']:<3d} batch {row['batch_size']:>2d}: "
            f"{row['seconds_per_step']:.2f} s/step, {row['seconds_per_client_round']:.1f} s per "
            f"client-round of {row['local_steps']} steps, upload {row['upload_bytes'] / 1e3:.0f} KB",
            flush=True,
        )
        rows.append(row)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "train_speed.json").write_text(
        json.dumps({"rows": rows, "meta": run_meta()}, indent=1)
    )
    _figure(rows, args.out / "train_speed.png")
    print("wrote", args.out / "train_speed.json")
    return 0


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
