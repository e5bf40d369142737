"""Does a few-minute run separate FedAvg of LoRA factors from FlexLoRA? A measured answer.

Under label skew with heterogeneous ranks, FedAvg of zero-padded factors is biased (mean(B) mean(A)
!= mean(B A); each client's scaling alpha / r_i differs, yet the factors are averaged as if it did
not; the components only the larger ranks hold shrink by their clients' weight each round). In the
paper profile (notebook 05: 10 clients, 20 rounds x 15 steps) the gap appears late. The quick
profile's own schedule (a fresh classification head at 10x the adapter's learning rate, 3 rounds)
hides it: the head learns the task on frozen features within a few steps and every method ends
alike. Notebook 05's quick runs therefore slow the head to 0.01x so that the adapters carry the
learning (:data:`~shelora_core.profiles.GRID_OVERRIDES`). This module measures that choice: every
setting of :data:`SETTINGS` is a small override of notebook 05's quick configuration (MiniLM, ranks
8/16/32, Dirichlet 0.3), trained with FedAvg and with FlexLoRA from the same seed and data, and the
final accuracies are set side by side.

Run it with ``python -m shelora_core.separation`` (about 20 minutes on 2 cores); it writes
``results/<profile>/separation.json`` and the README's results section reports it. Finished runs are
reused (their per-round JSONL under ``results/<profile>/separation/``), so an interrupted sweep
resumes.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .notebook import write_json
from .profiles import grid_base
from .provenance import run_meta

__all__ = [
    "METHODS",
    "SETTINGS",
    "VISIBLE_GAP_PP",
    "separation_configs",
    "run_separation",
    "paper_gap",
    "main",
]

#: "visibly behind": FlexLoRA ahead by at least this many points of final accuracy (30 of notebook
#: 05's 600 quick-profile test examples)
VISIBLE_GAP_PP = 5.0

#: the pair compared (same seed, same data, same schedule)
METHODS = ("fedavg", "flexlora")

#: (name, overrides of notebook 05's quick configuration): the configuration itself, and what
#: undoes it (the profile's own fast head and schedule; the head at the adapter's rate; more steps)
SETTINGS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("notebook 05's quick runs: head at 0.01x, adapter lr 1e-2, 4 rounds x 8 steps", {}),
    ("the quick profile's own schedule: head at 10x, adapter lr 2e-3 cosine, 3 rounds",
     dict(lr=2e-3, head_lr_scale=10.0, lr_final_ratio=0.1, rounds=3)),
    ("head at 1x", dict(head_lr_scale=1.0)),
    ("16 local steps", dict(local_steps=16)),
)  # fmt: skip


def separation_configs(
    profile: str = "quick", settings: Sequence[tuple[str, Mapping[str, Any]]] = SETTINGS
) -> list[tuple[str, Any]]:
    """``(setting name, FederatedConfig)`` for every setting and method (validated)."""
    out = []
    for name, overrides in settings:
        for method in METHODS:
            cfg = grid_base(
                profile,
                method=method,
                ranks=(8, 16, 32),
                partition="dirichlet",
                **dict(overrides),
            )
            out.append((name, cfg))
    return out


def run_separation(
    results_dir: str | Path,
    *,
    profile: str = "quick",
    settings: Sequence[tuple[str, Mapping[str, Any]]] = SETTINGS,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Train every (setting, method), reusing finished runs; write and return the record.

    Returns:
        ``{"profile", "methods", "rows", "largest_gap_pp", "meta"}``; each row holds the setting's
        name, overrides, each method's final accuracy and accuracy curve, and
        ``gap_pp`` = 100 x (FlexLoRA - FedAvg) final accuracy.
    """
    from .federation import Federation

    results_dir = Path(results_dir)
    runs_dir = results_dir / "separation"
    finals: dict[str, dict[str, Any]] = {}
    for name, cfg in separation_configs(profile, settings):
        t0 = time.perf_counter()
        res = Federation(cfg, results_dir=runs_dir, progress=progress).run(reuse_complete=True)
        row = finals.setdefault(name, {"setting": name})
        row[cfg.method] = {
            "run_name": cfg.run_name,
            "final_accuracy": res.final_accuracy,
            "curve": [
                (r["round"], r["accuracy"]) for r in res.history if r["accuracy"] is not None
            ],
            "seconds": time.perf_counter() - t0,
            "computed_at": (res.meta or {}).get("git_commit"),
        }
    rows = []
    for name, overrides in settings:
        row = finals[name]
        row["overrides"] = dict(overrides)
        row["gap_pp"] = 100.0 * (
            row["flexlora"]["final_accuracy"] - row["fedavg"]["final_accuracy"]
        )
        rows.append(row)
    record = {
        "profile": profile,
        "methods": list(METHODS),
        "base": f"notebook 05's {profile} configuration, MiniLM, ranks 8/16/32, Dirichlet(0.3)",
        "rows": rows,
        "largest_gap_pp": max(rows, key=lambda r: abs(r["gap_pp"]))["gap_pp"],
        "visible_gap_pp": VISIBLE_GAP_PP,
        "visible_in": [r["setting"] for r in rows if r["gap_pp"] >= VISIBLE_GAP_PP],
        "meta": run_meta(),
    }
    write_json(record, results_dir / "separation.json")
    return record


def paper_gap(results_dir: str | Path) -> dict[str, Any] | None:
    """The same pair in the paper profile, read from notebook 05's per-round JSONL under
    ``results_dir`` (``results/paper``): how the gap looks over the whole run, not only at its
    last round. ``None`` until both runs have finished there (a summary beside the JSONL).

    Returns:
        ``{"runs": {method: {"run_name", "commit", "curve"}}, "evaluations", "gaps_pp",
        "final_gap_pp", "mean_gap_pp", "flexlora_ahead", "largest_swing_pp"}``: the per-evaluation
        gaps (FlexLoRA - FedAvg, points) over the rounds both evaluated, their mean, how many of them
        FlexLoRA leads, and the largest change of either method's accuracy between two consecutive
        evaluations (the client sampling under label skew moves the curves by that much).
    """
    import json

    from .profiles import federated_tuning_grid

    runs_dir = Path(results_dir) / "federated_tuning"
    runs: dict[str, dict[str, Any]] = {}
    for cfg in federated_tuning_grid("paper"):
        if (
            cfg.variant in METHODS
            and cfg.model == "minilm"
            and cfg.partition == "dirichlet"
            and tuple(cfg.ranks) == (8, 16, 32)
        ):
            rows_path = runs_dir / f"{cfg.run_name}.jsonl"
            summary_path = runs_dir / f"{cfg.run_name}.summary.json"
            if not (rows_path.exists() and summary_path.exists()):  # a summary: the run finished
                return None
            rows = [json.loads(x) for x in rows_path.read_text().splitlines() if x.strip()]
            meta = json.loads(summary_path.read_text()).get("meta", {})
            runs[cfg.method] = {
                "run_name": cfg.run_name,
                "commit": meta.get("git_commit"),
                "curve": [
                    (r["round"], r["accuracy"]) for r in rows if r.get("accuracy") is not None
                ],
            }
    if set(runs) != set(METHODS):
        return None
    fed, flex = (dict(runs[m]["curve"]) for m in METHODS)
    both = sorted(set(fed) & set(flex))
    if not both:
        return None
    gaps = [100.0 * (flex[r] - fed[r]) for r in both]
    swing = max(
        (100.0 * abs(c[i + 1][1] - c[i][1]) for m in METHODS for c in [runs[m]["curve"]]
         for i in range(len(c) - 1)),
        default=0.0,
    )  # fmt: skip
    return {
        "runs": runs,
        "evaluations": both,
        "gaps_pp": gaps,
        "final_gap_pp": gaps[-1],
        "mean_gap_pp": sum(gaps) / len(gaps),
        "flexlora_ahead": sum(g > 0 for g in gaps),
        "largest_swing_pp": swing,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results-dir", default=None, help="default: results/quick")
    args = ap.parse_args(argv)
    out = Path(args.results_dir or Path(__file__).resolve().parent.parent / "results" / "quick")
    rec = run_separation(out)
    for r in rec["rows"]:
        print(
            f"{r['setting']:60s} fedavg {r['fedavg']['final_accuracy']:.3f}  "
            f"flexlora {r['flexlora']['final_accuracy']:.3f}  gap {r['gap_pp']:+.1f} pp"
        )
    print(f"wrote {out / 'separation.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
