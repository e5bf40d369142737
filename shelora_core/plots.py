"""Figures shared by the notebooks (matplotlib, Agg-safe; each function returns the Figure)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["accuracy_curves", "partition_heatmap", "save"]


def partition_heatmap(
    counts: Mapping[str, np.ndarray], label_names: Sequence[str], *, title: str = ""
):
    """Clients x labels example counts, one panel per partition scheme."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(counts), figsize=(4.2 * len(counts), 3.4), squeeze=False)
    for ax, (name, c) in zip(axes[0], counts.items(), strict=True):
        share = c / np.maximum(c.sum(1, keepdims=True), 1)
        im = ax.imshow(share, aspect="auto", cmap="viridis", vmin=0, vmax=1)
        for (i, j), v in np.ndenumerate(c):
            ax.text(
                j,
                i,
                str(v),
                ha="center",
                va="center",
                fontsize=7,
                color="white" if share[i, j] < 0.6 else "black",
            )
        ax.set_xticks(range(len(label_names)), label_names, rotation=30, ha="right")
        ax.set_yticks(range(c.shape[0]))
        ax.set_ylabel("client")
        ax.set_title(name)
    fig.colorbar(im, ax=axes[0].tolist(), label="share of the client's examples")
    if title:
        fig.suptitle(title)
    return fig


def accuracy_curves(
    runs: Sequence[Mapping[str, Any]],
    *,
    majority: float | None = None,
    title: str = "Test accuracy per round",
):
    """Accuracy per round; one panel per (model, partition), one line per method and ranks.

    ``runs`` are dicts with ``label``, ``panel`` and ``history`` (records with ``round`` and
    ``accuracy``).
    """
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys(r["panel"] for r in runs))
    fig, axes = plt.subplots(
        1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False, sharey=True
    )
    for ax, panel in zip(axes[0], panels, strict=True):
        for r in (r for r in runs if r["panel"] == panel):
            pts = [
                (h["round"], h["accuracy"]) for h in r["history"] if h.get("accuracy") is not None
            ]
            if pts:
                x, y = zip(*pts, strict=True)
                ax.plot(x, y, marker="o", ms=3, label=r["label"])
        if majority is not None:
            ax.axhline(majority, color="grey", ls=":", lw=1, label="majority class")
        ax.set_title(panel)
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test accuracy")
    axes[0][-1].legend(fontsize=8, loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def save(fig, path: str | Path) -> Path:
    """Save ``fig`` as PNG (150 dpi), creating the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150, bbox_inches="tight")
    return path
