"""What each defence costs and what it stops: notebook 05's training runs beside notebook 06's attacks.

Two tables and a figure, computed from the two records a profile leaves
(``results/<profile>/federated_tuning.json`` and ``results/<profile>/attack.json``):

* :func:`tradeoff_rows`, one row per trained variant (MiniLM, heterogeneous ranks, Dirichlet label
  skew: the setting every defended variant of notebook 05 is trained in): its final accuracy,
  upload bytes and seconds per client-round, the privacy it accounted (``epsilon_server``: the
  epsilon against the server, which knows whom it sampled), and the worst ROUGE-1 of each kind of
  attacker over every one-step (FedSGD) cell of the attack grid for the same method, in round 1
  and in later rounds. The attack cells run on SmolLM2-135M at rank 128 (quick) or 256 and the
  training ranks (paper), the model DAGER needs (a decoder); the accuracy is MiniLM's. The two
  halves are joined by method, not measured on one model: the row says so.
* :func:`cheapest_settings`: for each method and each setting the grid attacked (SHE-LoRA's and
  MaskCrypt's budget in columns or values, the DP noise), the worst ROUGE-1 of the strongest
  attacker the method faces (``adaptive`` and ``b-channel`` for the methods that hide part of the
  update: the server knows what is hidden; ``oblivious`` for the rest) over batch sizes and both
  rounds, and the cheapest setting (fewest upload bytes, then least noise) that keeps it at or
  below ``threshold`` (0.1) everywhere; ``None`` when no setting does.
* :func:`frontier_figure`: worst ROUGE-1 against accuracy and against upload bytes.

A method stops the attack "everywhere" only over the cells measured: more batch sizes, ranks or
another attacker may find more (the B channel, deeper layers: the README's protection section).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "ROUND1_UPDATE",
    "VARIANT_METHOD",
    "cheapest_settings",
    "frontier_figure",
    "strong_attackers",
    "tradeoff_rows",
]

#: notebook 05's variant label -> the attack grid's method for the same protocol
VARIANT_METHOD = {
    "flexlora": "flexlora",
    "flexlora-dp": "flexlora-dp",
    "shelora-delta": "shelora",
    "shelora-paper": "shelora",
    "shelora-dp-delta": "shelora-dp",
    "shelora+first-layers-delta": "shelora+first-layers",
    "shelora-delta-secretA": "shelora",
    "maskcrypt-delta": "maskcrypt",
    "fedshield": "fedshield",
    "full_he": "full_he",
}
#: the update a variant's round-1 upload is attacked through (a secret initial A has its own cells)
ROUND1_UPDATE = {"shelora-delta-secretA": "round1-secret-a"}
#: methods whose upload hides part of the update at positions the server knows
_PARTLY_HIDDEN = ("shelora", "shelora-dp", "shelora+first-layers", "maskcrypt")


def strong_attackers(method: str) -> tuple[str, ...]:
    """The attackers a method must stop: those who know what the upload hides (``adaptive`` and
    ``b-channel``) where it hides a part at known positions, else DAGER as written."""
    return ("adaptive", "b-channel") if method in _PARTLY_HIDDEN else ("oblivious",)


def _one_step(row: Mapping[str, Any]) -> bool:
    """A measured one-step (FedSGD) cell at DAGER's own threshold and the documented lr."""
    return (
        row.get("kind") == "measured"
        and row.get("update") in ("round1", "round1-secret-a", "later")
        and row.get("steps") is None
        and row.get("span_tol") is None
        and row.get("rouge1") is not None
        and row.get("lr") in (None, 1000.0)
    )


def _worst(rows: Sequence[Mapping[str, Any]], attackers: Sequence[str]) -> float | None:
    vals = [float(r["rouge1"]) for r in rows if r.get("attacker") in attackers]
    return max(vals) if vals else None


def tradeoff_rows(
    summaries: Sequence[Mapping[str, Any]],
    attack_rows: Sequence[Mapping[str, Any]],
    *,
    model: str = "minilm",
) -> list[dict[str, Any]]:
    """One row per trained run of ``model`` with heterogeneous ranks under label skew whose
    variant the attack grid covers (:data:`VARIANT_METHOD`); see the module docstring.

    DP cells count only at the run's own ``dp_epsilon`` (the grid's noise sweep is a separate
    setting, :func:`cheapest_settings`)."""
    cells = [r for r in attack_rows if _one_step(r)]
    out = []
    for s in summaries:
        variant = s.get("variant")
        if (
            variant not in VARIANT_METHOD
            or s.get("model") != model
            or len(s.get("ranks", ())) < 2
            or s.get("partition") == "iid"
        ):
            continue
        method = VARIANT_METHOD[variant]
        eps = (s.get("config") or {}).get("dp_epsilon")
        mine = [
            r
            for r in cells
            if r["method"] == method
            and (r.get("dp_sigma") is None)
            and (method not in ("flexlora-dp", "shelora-dp") or r.get("dp_epsilon") == eps)
        ]
        first = ROUND1_UPDATE.get(variant, "round1")
        r1 = [r for r in mine if r["update"] == first]
        later = [r for r in mine if r["update"] == "later"]
        privacy = s.get("privacy") or {}
        strong = strong_attackers(method)
        out.append(
            {
                "variant": variant,
                "method": method,
                "final_accuracy": s.get("final_accuracy"),
                "rounds": s.get("rounds"),
                "stopped_round": (s.get("stopped") or {}).get("round"),
                "upload_bytes_per_client": s.get("upload_bytes_per_client"),
                "seconds_per_client_round": s.get("seconds_per_client_round"),
                "epsilon_server": privacy.get("epsilon_server"),
                "delta": privacy.get("delta"),
                "rouge1_round1_dager": _worst(r1, ("oblivious",)),
                "rouge1_round1_strong": _worst(r1, strong),
                "rouge1_later_dager": _worst(later, ("oblivious",)),
                "rouge1_later_strong": _worst(later, strong),
                "attack_cells": len(r1) + len(later),
                "attack_model": sorted({r.get("model") for r in mine if r.get("model")}),
            }
        )
    return out


def _setting(row: Mapping[str, Any]) -> tuple[Any, ...]:
    return (row["method"], row.get("budget"), row.get("dp_epsilon"), row.get("dp_sigma"))


def cheapest_settings(
    attack_rows: Sequence[Mapping[str, Any]], *, threshold: float = 0.1
) -> list[dict[str, Any]]:
    """Per method: every attacked setting's worst ROUGE-1 (strong attackers, every batch size,
    rank and both rounds) and the cheapest one at or below ``threshold``; see the module
    docstring. Round 1 of a secret initial A is a setting of its own (``secret_init``)."""
    meta = next((r for r in attack_rows if r.get("kind") == "meta"), {})
    groups: dict[tuple[Any, ...], list[Mapping[str, Any]]] = defaultdict(list)
    for r in attack_rows:
        if not _one_step(r):
            continue
        key = _setting(r)
        if r["update"] == "round1-secret-a":
            key = (*key[:1], key[1], "secret_init", None)
        groups[key].append(r)
    by_method: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for key, rows in sorted(groups.items(), key=lambda kv: str(kv[0])):
        method, budget, eps, sigma = key
        strong = strong_attackers(method)
        worst = _worst(rows, strong)
        if worst is None:
            continue
        noise = sigma  # the noise multiplier of a DP setting (the grid records it per epsilon)
        if noise is None and isinstance(eps, float):
            noise = meta.get(f"dp_sigma_eps{eps:g}", math.inf)
        by_method[method].append(
            {
                "method": method,
                "budget": budget,
                "dp_epsilon": eps if eps != "secret_init" else None,
                "dp_sigma": sigma,
                "noise_multiplier": noise,
                "secret_init": eps == "secret_init",
                "attackers": list(strong),
                "worst_rouge1": worst,
                "cells": len(rows),
                "batch_sizes": sorted({int(r["batch_size"]) for r in rows}),
                "updates": sorted({str(r["update"]) for r in rows}),
                "upload_bytes": max(float(r.get("upload_bytes") or 0.0) for r in rows),
                "stops_attack": worst <= threshold,
            }
        )
    out = []
    for method, settings in by_method.items():
        ok = [s for s in settings if s["stops_attack"] and not s["secret_init"]]
        # least bytes first; among equal bytes the least noise (the best utility)
        ok.sort(key=lambda s: (s["upload_bytes"], s["noise_multiplier"] or 0.0))
        out.append(
            {
                "method": method,
                "threshold": threshold,
                "settings": settings,
                "cheapest": ok[0] if ok else None,
            }
        )
    return out


def frontier_figure(rows: Sequence[Mapping[str, Any]]):
    """Worst strong-attacker ROUGE-1 (either round) against final accuracy (left) and upload
    MB per client-round (right), one point per trained variant of :func:`tradeoff_rows`."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.6), sharey=True)
    pts = []
    for r in rows:
        vals = [r["rouge1_round1_strong"], r["rouge1_later_strong"]]
        vals = [v for v in vals if v is not None]
        if not vals or r["final_accuracy"] is None:
            continue
        pts.append((r, max(vals)))
    for ax, xkey, xlabel in (
        (axes[0], "final_accuracy", "final accuracy (MiniLM, notebook 05)"),
        (axes[1], "upload_bytes_per_client", "upload MB per client-round (MiniLM)"),
    ):
        for r, y in pts:
            x = r[xkey] / (1e6 if xkey == "upload_bytes_per_client" else 1.0)
            marker = "x" if r["stopped_round"] else "o"
            ax.scatter([x], [y], s=60, marker=marker)
            ax.annotate(r["variant"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel(xlabel)
        ax.axhline(0.1, color="grey", lw=0.8, ls="--")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("worst ROUGE-1, strongest attacker\n(SmolLM2 cells, both rounds)")
    axes[0].set_ylim(-0.05, 1.05)
    fig.suptitle("What each variant stops against what it costs (x: run stopped early)")
    fig.tight_layout()
    return fig
