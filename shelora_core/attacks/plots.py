"""Figures of the attack evaluation (matplotlib; each function returns the Figure)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["attack_overview", "budget_sweep", "dp_sweep"]

#: the attackers of the DAGER heatmap (the optimisation attacker's rows are not DAGER's)
_DAGER_ATTACKERS = ("oblivious", "adaptive", "b-channel")
_STYLE = {
    "flexlora": ("tab:red", "o"),
    "flexlora-dp": ("tab:orange", "v"),
    "maskcrypt": ("tab:purple", "s"),
    "shelora": ("tab:blue", "D"),
    "shelora+first-layers": ("tab:green", "P"),
    "shelora-dp": ("tab:cyan", "^"),
    "fedshield": ("tab:gray", "x"),
    "full_he": ("black", "+"),
}


def _pick(rows: Sequence[Mapping[str, Any]], **match: Any) -> list[Mapping[str, Any]]:
    return [r for r in rows if all(r.get(k) == v for k, v in match.items())]


def attack_overview(
    rows: Sequence[Mapping[str, Any]],
    *,
    rank: int,
    budget: int,
    updates: Sequence[str] = ("round1", "later"),
    paper: Mapping[str, Mapping[int, float]] | None = None,
):
    """ROUGE-1 as a heatmap: one row per (method, attacker), one column per (update, batch size).

    SHE-LoRA, MaskCrypt and the protected variant at ``budget`` (the variant: any budget); DP at the
    authors' epsilon (rows with ``dp_epsilon`` set); learning rate 1e3 only; the B-channel attacker
    in rows of its own. The paper's numbers (``paper``, in %) form a last block of columns (batch
    4 / 8 / 16, DAGER as written, i.e. our oblivious attacker).
    """
    import matplotlib.pyplot as plt

    sel = [
        r
        for r in rows
        if r["rank"] == rank
        and r["attacker"] in _DAGER_ATTACKERS
        and r["update"] in updates
        and r.get("dp_sigma") is None
        and r.get("lr", 1e3) == 1e3
        and (r["budget"] is None or r["budget"] == budget or r["method"] == "shelora+first-layers")
    ]
    keys = [(m, a) for m in _STYLE for a in _DAGER_ATTACKERS]
    keys = [k for k in keys if any((r["method"], r["attacker"]) == k for r in sel)]
    cols = sorted(
        {(r["update"], r["batch_size"]) for r in sel}, key=lambda t: (updates.index(t[0]), t[1])
    )
    paper_bs = sorted({b for v in (paper or {}).values() for b in v})
    grid = np.full((len(keys), len(cols) + len(paper_bs)), np.nan)
    for r in sel:
        grid[
            keys.index((r["method"], r["attacker"])), cols.index((r["update"], r["batch_size"]))
        ] = r["rouge1"]
    for i, (m, a) in enumerate(keys):
        for j, b in enumerate(paper_bs):
            if a == "oblivious" and b in (paper or {}).get(m, {}):
                grid[i, len(cols) + j] = paper[m][b] / 100
    fig, ax = plt.subplots(figsize=(max(6.5, 2.5 + 0.62 * grid.shape[1]), 0.9 + 0.38 * len(keys)))
    ax.imshow(np.ma.masked_invalid(grid), cmap="RdYlGn_r", vmin=0, vmax=1, aspect="auto")
    for (i, j), v in np.ndenumerate(grid):
        if np.isfinite(v):
            ax.text(j, i, f"{100 * v:.0f}", ha="center", va="center", fontsize=7)
    labels = [f"{u}\nb={b}" for u, b in cols] + [f"paper\nb={b}" for b in paper_bs]
    ax.set_xticks(range(grid.shape[1]), labels, fontsize=7)
    ax.set_yticks(range(len(keys)), [f"{m} · {a}" for m, a in keys], fontsize=8)
    if paper_bs:
        ax.axvline(len(cols) - 0.5, color="black", lw=1.5)
    ax.set_title(
        f"DAGER ROUGE-1 (%) from the server's bytes\nSmolLM2, r={rank}, budget k={budget}",
        fontsize=9,
    )
    fig.tight_layout()
    return fig


def budget_sweep(
    rows: Sequence[Mapping[str, Any]],
    *,
    rank: int,
    update: str,
    methods: Sequence[str] = ("shelora", "maskcrypt"),
):
    """ROUGE-1 against the HE budget (columns per layer), per batch size and attacker."""
    import matplotlib.pyplot as plt

    sel = [r for r in rows if r["rank"] == rank and r["update"] == update and r["budget"]]
    sizes = sorted({r["batch_size"] for r in sel})
    fig, axes = plt.subplots(1, len(methods), figsize=(5 * len(methods), 3.3), squeeze=False)
    cmap = plt.get_cmap("viridis")
    for ax, method in zip(axes[0], methods, strict=True):
        for n, bs in enumerate(sizes):
            for att, ls in (("oblivious", "--"), ("adaptive", "-")):
                pts = sorted(
                    (r["budget"], r["rouge1"])
                    for r in sel
                    if r["method"] == method and r["batch_size"] == bs and r["attacker"] == att
                )
                if pts:
                    ax.plot(
                        *zip(*pts, strict=True),
                        ls=ls,
                        marker="o",
                        color=cmap(n / max(1, len(sizes) - 1)),
                        label=f"batch {bs}, {att}",
                    )
        ax.set_xscale("log", base=2)
        ax.set_ylim(-0.05, 1.05)
        ax.set_xlabel("HE budget (columns per layer; MaskCrypt: as many values)")
        ax.set_ylabel("ROUGE-1")
        ax.set_title(f"{method}, {update}, r={rank}", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def dp_sweep(rows: Sequence[Mapping[str, Any]], *, rank: int, sigma_eps10: float | None = None):
    """ROUGE-1 and token precision against the DP noise multiplier (gradient clipped to 1)."""
    import matplotlib.pyplot as plt

    sel = [r for r in rows if r["method"] == "flexlora-dp" and r["rank"] == rank]
    fig, ax = plt.subplots(figsize=(6, 3.3))
    groups = sorted({(r["update"], r["batch_size"]) for r in sel})
    for n, (upd, bs) in enumerate(groups):
        ls = ["-", "--", ":", "-."][n % 4]
        pts = []
        for r in sel:
            if r["update"] != upd or r["batch_size"] != bs:
                continue
            sigma = r["dp_sigma"] if r["dp_sigma"] is not None else sigma_eps10
            if sigma is not None:
                pts.append((sigma, r["rouge1"]))
        if pts:
            pts.sort()
            ax.plot(*zip(*pts, strict=True), ls=ls, marker="o", label=f"{upd}, batch {bs}")
    if sigma_eps10:
        ax.axvline(sigma_eps10, color="tab:red", lw=1)
        ax.text(sigma_eps10, 0.5, " ε=10, δ=1e-5", color="tab:red", fontsize=8)
    ax.set_xscale("log")
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("noise multiplier σ (gradient clipped to norm 1)")
    ax.set_ylabel("ROUGE-1")
    ax.set_title(f"FlexLoRA + local DP, r={rank}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
