"""Figures shared by the notebooks (matplotlib, Agg-safe; each function returns the Figure)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "accuracy_beside_reference",
    "accuracy_curves",
    "accuracy_and_label_mix",
    "column_list_chart",
    "cost_growth",
    "layer_spectra",
    "objective_heatmaps",
    "ope_leakage",
    "partition_heatmap",
    "remaining_share_bars",
    "rouge_beside_paper",
    "save",
    "score_distributions",
    "threat_matrix",
]


def partition_heatmap(
    counts: Mapping[str, np.ndarray], label_names: Sequence[str], *, title: str = ""
):
    """Clients x labels example counts, one panel per partition scheme."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(  # constrained: room for the title above the panels' titles
        1, len(counts), figsize=(4.2 * len(counts), 3.6), squeeze=False, layout="constrained"
    )
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


def _label_styles(runs: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """One color and marker per run label, the same in every panel (tab20, then markers cycle)."""
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(r["label"] for r in runs))
    colors, markers = plt.get_cmap("tab20").colors, "osD^v"
    return {
        lab: {
            "color": colors[i % len(colors)],
            "marker": markers[(i // len(colors)) % len(markers)],
        }
        for i, lab in enumerate(labels)
    }


def _plot_accuracy(
    ax, runs: Sequence[Mapping[str, Any]], styles: Mapping[str, Mapping[str, Any]] | None = None
) -> None:
    """One line per run through its evaluated rounds (records whose ``accuracy`` is set)."""
    styles = styles or _label_styles(runs)
    for r in runs:
        pts = [(h["round"], h["accuracy"]) for h in r["history"] if h.get("accuracy") is not None]
        if pts:
            x, y = zip(*pts, strict=True)
            ax.plot(x, y, ms=3, label=r["label"], **styles[r["label"]])


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
    from matplotlib.ticker import MaxNLocator

    panels = list(dict.fromkeys(r["panel"] for r in runs))
    styles = _label_styles(runs)
    fig, axes = plt.subplots(
        1, len(panels), figsize=(5 * len(panels), 4.2), squeeze=False, sharey=True
    )
    for ax, panel in zip(axes[0], panels, strict=True):
        _plot_accuracy(ax, [r for r in runs if r["panel"] == panel], styles)
        if majority is not None:
            ax.axhline(majority, color="grey", ls=":", lw=1, label="majority class")
        ax.set_title(panel)
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test accuracy")
    # one legend for the figure: a label keeps its color in every panel
    handles: dict[str, Any] = {}
    for ax in axes[0]:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(lab, h)
    ncol = min(len(handles), 2 * len(panels) + 1)
    rows = -(-len(handles) // max(ncol, 1))
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=ncol, fontsize=8)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, min(0.4, 0.06 * rows + 0.02), 1, 1))
    return fig


def accuracy_and_label_mix(
    runs: Sequence[Mapping[str, Any]],
    mix: np.ndarray,
    label_names: Sequence[str],
    *,
    majority: float | None = None,
    title: str = "Accuracy and the label mix of each round's clients",
):
    """Accuracy per round (top) over the label shares of the clients sampled in each round (bottom).

    ``runs`` as for :func:`accuracy_curves` (one panel); ``mix`` is ``rounds x labels`` example
    counts of each round's participants (round 1 first).
    """
    import matplotlib.pyplot as plt

    mix = np.asarray(mix, dtype=float)
    rounds = np.arange(1, len(mix) + 1)
    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(8, 5.2), sharex=True, gridspec_kw={"height_ratios": [3, 2]}
    )
    _plot_accuracy(top, runs)
    if majority is not None:
        top.axhline(majority, color="grey", ls=":", lw=1, label="majority class")
    top.set_ylabel("test accuracy")
    top.grid(alpha=0.3)
    top.legend(fontsize=8, loc="lower left")
    shares = mix / mix.sum(1, keepdims=True).clip(min=1)
    bottom_edge = np.zeros(len(mix))
    for j, name in enumerate(label_names):
        bottom.bar(rounds, shares[:, j], bottom=bottom_edge, label=name, width=0.8)
        bottom_edge += shares[:, j]
    bottom.axhline(0.5, color="k", lw=0.8, ls=":")
    bottom.set_ylabel("share of the round's\ntraining examples")
    bottom.set_xlabel("round")
    bottom.set_ylim(0, 1)
    bottom.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    bottom.legend(fontsize=8, loc="upper right", ncol=len(label_names))
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def _short(layer: str) -> str:
    """``bert.encoder.layer.3.attention.self.query`` -> ``L3.query`` (for axis labels)."""
    parts = layer.split(".")
    num = next((p for p in parts if p.isdigit()), "")
    return f"L{num}.{parts[-1]}" if num else parts[-1]


def layer_spectra(
    norms: Mapping[str, np.ndarray], *, top: int = 8, title: str = "", max_lines: int = 12
):
    """Activation norms ``||X_j||`` per layer: sorted spectra and the top features' energy share.

    Left: each layer's norms sorted in decreasing order, divided by the layer's median (log scale),
    so a few massive-activation features stand out as the head of the curve. Right: the share of
    ``E||x||^2 = sum_j ||X_j||^2`` carried by the ``top`` largest features of each layer, beside the
    share they would carry if all features were equal (``top / n``).

    Args:
        norms: layer name -> ``||X_j||`` (n,), in layer order.
        top: how many of the largest features the right panel counts.
        title: figure title.
        max_lines: at most this many layers are drawn on the left (evenly spaced).
    """
    import matplotlib.pyplot as plt

    names = list(norms)
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 3.6))
    step = max(1, int(np.ceil(len(names) / max_lines)))
    cmap = plt.get_cmap("viridis")
    for i, name in enumerate(names[::step]):
        v = np.sort(np.asarray(norms[name], np.float64))[::-1]
        ax0.plot(
            np.arange(1, v.size + 1),
            v / np.median(v),
            color=cmap(i / max(1, len(names[::step]) - 1)),
            lw=1.2,
            label=_short(name),
        )
    ax0.set_xscale("log")
    ax0.set_yscale("log")
    ax0.axvline(top, color="grey", ls=":", lw=1)
    ax0.set_xlabel("feature rank (by ||X_j||)")
    ax0.set_ylabel("||X_j|| / median")
    ax0.legend(fontsize=7, ncol=2)
    ax0.grid(alpha=0.3)
    shares, uniform = [], []
    for name in names:
        e = np.sort(np.asarray(norms[name], np.float64) ** 2)[::-1]
        shares.append(e[:top].sum() / e.sum())
        uniform.append(min(top, e.size) / e.size)
    x = np.arange(len(names))
    ax1.bar(x, shares, color="tab:red", label=f"top {top} features")
    ax1.plot(x, uniform, "k_", ms=12, mew=2, label="if all features were equal")
    ax1.set_xticks(x, [_short(n) for n in names], rotation=90 if len(names) > 8 else 0, fontsize=7)
    ax1.set_ylabel("share of E||x||^2")
    ax1.set_ylim(0, 1)
    ax1.legend(fontsize=8)
    ax1.grid(alpha=0.3, axis="y")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def score_distributions(scores: Mapping[str, Mapping[str, np.ndarray]], *, title: str = ""):
    """Per-layer distributions of column scores (log10), one panel per scoring variant.

    Args:
        scores: variant -> layer name -> scores (n,). Zero scores are clipped to the smallest
            positive score of the layer before the logarithm.
        title: figure title.
    """
    import matplotlib.pyplot as plt

    variants = list(scores)
    fig, axes = plt.subplots(
        1, len(variants), figsize=(5.5 * len(variants), 3.6), squeeze=False, sharey=True
    )
    for ax, variant in zip(axes[0], variants, strict=True):
        names = list(scores[variant])
        data = []
        for name in names:
            s = np.asarray(scores[variant][name], np.float64)
            pos = s[s > 0]
            floor = pos.min() if pos.size else 1e-12
            data.append(np.log10(np.maximum(s, floor)))
        ax.boxplot(data, whis=(1, 99), flierprops={"markersize": 2, "alpha": 0.5})
        ax.set_xticks(
            range(1, len(names) + 1),
            [_short(n) for n in names],
            rotation=90 if len(names) > 8 else 0,
            fontsize=7,
        )
        ax.set_title(variant)
        ax.grid(alpha=0.3, axis="y")
    axes[0][0].set_ylabel("log10 S_j (box: quartiles, whiskers: 1-99%)")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def objective_heatmaps(panels: Sequence[Mapping[str, Any]], *, title: str = ""):
    """The negotiation's (a, b) landscape: one heat map of the objective per panel.

    Args:
        panels: dicts with ``a`` and ``b`` (axes), ``z`` (``Z[ib, ia]``, NaN off the simplex),
            ``title`` and optionally ``chosen`` (the chosen ``(a, b)``, marked with a star).
        title: figure title.
    """
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.0 * len(panels), 3.6), squeeze=False)
    finite = [p["z"][np.isfinite(p["z"])] for p in panels]
    lo = min((float(f.min()) for f in finite if f.size), default=0.0)
    hi = max((float(f.max()) for f in finite if f.size), default=1.0)
    im = None
    for ax, p in zip(axes[0], panels, strict=True):
        a, b = np.asarray(p["a"]), np.asarray(p["b"])
        da, db = (a[1] - a[0]) / 2 if a.size > 1 else 0.5, (b[1] - b[0]) / 2 if b.size > 1 else 0.5
        im = ax.imshow(
            np.ma.masked_invalid(p["z"]),
            origin="lower",
            extent=(a[0] - da, a[-1] + da, b[0] - db, b[-1] + db),
            cmap="viridis",
            vmin=lo,
            vmax=hi if hi > lo else lo + 1e-9,
            aspect="equal",
        )
        if p.get("chosen") is not None:
            ax.plot(*p["chosen"], marker="*", color="red", ms=14, mec="white")
        ax.set_xlabel("a (share from the tier's Clients list)")
        ax.set_title(p.get("title", ""), fontsize=9)
    axes[0][0].set_ylabel("b (share from Common)")
    fig.colorbar(im, ax=axes[0].tolist(), label="min Coverage - max Risk")
    if title:
        fig.suptitle(title)
    return fig


_SOURCE_COLORS = {
    "clients": "tab:blue",
    "common": "tab:orange",
    "sensitivity": "tab:green",
    "filler": "tab:grey",
}


def column_list_chart(
    columns: Mapping[str, Sequence[int]],
    sources: Mapping[str, Sequence[str]],
    budgets: Sequence[int],
    *,
    title: str = "",
):
    """The negotiated ordered list G per layer: position -> column, coloured by source.

    Args:
        columns: layer -> ordered column indices (decrypted, i.e. the clients' view).
        sources: layer -> per position the list it came from (``clients``, ``common``,
            ``sensitivity`` or ``filler``).
        budgets: the clients' budgets; a vertical line marks the end of every prefix ``G[:k]``.
        title: figure title.
    """
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    names = list(columns)
    width = max((len(c) for c in columns.values()), default=0)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.42 * width + 2.5), 0.42 * len(names) + 1.6))
    for row, name in enumerate(names):
        for pos, (col, src) in enumerate(zip(columns[name], sources[name], strict=True)):
            ax.add_patch(
                plt.Rectangle((pos, row), 1, 1, color=_SOURCE_COLORS.get(src, "white"), alpha=0.75)
            )
            ax.text(pos + 0.5, row + 0.5, str(col), ha="center", va="center", fontsize=6.5)
    for k in sorted({int(k) for k in budgets if k > 0}):
        ax.axvline(k, color="black", lw=1.5)
        ax.text(k - 0.05, -0.08, f"k={k}", ha="right", va="bottom", fontsize=8)
    ax.set_xlim(0, max(width, 1))
    ax.set_ylim(len(names), -0.6)
    ax.set_yticks(np.arange(len(names)) + 0.5, [_short(n) for n in names], fontsize=8)
    ax.set_xlabel("position in G (a client with budget k encrypts positions < k)")
    ax.legend(
        handles=[Patch(color=c, alpha=0.75, label=s) for s, c in _SOURCE_COLORS.items()],
        loc="upper left",
        bbox_to_anchor=(1.0, 1.0),
        fontsize=8,
        title="taken from",
    )
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def ope_leakage(
    true_indices: Sequence[int],
    estimates: Sequence[int],
    n: int,
    *,
    proposed: tuple[Sequence[int], Sequence[int]] | None = None,
    title: str = "",
):
    """What the server learns from OPE index ciphertexts: its estimate against the truth.

    Left: estimate vs true index (the diagonal is perfect recovery). Right: histogram of the
    absolute error, beside the error distribution of guessing a uniform column (no leakage).

    Args:
        true_indices: column indices that were encrypted.
        estimates: the server's estimates (same order).
        n: layer width.
        proposed: optional ``(true, estimates)`` of the columns clients actually proposed,
            highlighted on the left.
        title: figure title.
    """
    import matplotlib.pyplot as plt

    j = np.asarray(true_indices, np.int64)
    e = np.asarray(estimates, np.int64)
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 3.8))
    ax0.scatter(j, e, s=4, alpha=0.5, label="all columns")
    if proposed is not None:
        ax0.scatter(*proposed, s=18, color="tab:red", label="proposed columns")
    ax0.plot([0, n - 1], [0, n - 1], color="grey", lw=1, ls=":")
    ax0.set_xlabel("true column index")
    ax0.set_ylabel("server's estimate from the ciphertext")
    ax0.legend(fontsize=8)
    ax0.grid(alpha=0.3)
    err = np.abs(e - j)
    grid = np.arange(n)
    rand = np.abs(grid[None, :] - j[:, None]).ravel()
    bins = np.linspace(0, n, 49)
    ax1.hist(rand, bins=bins, density=True, alpha=0.5, color="grey", label="uniform random guess")
    ax1.hist(err, bins=bins, density=True, alpha=0.8, color="tab:blue", label="OPE estimate")
    ax1.set_yscale("log")
    ax1.set_xlabel("|estimate - true index| (columns)")
    ax1.set_ylabel("density")
    ax1.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def accuracy_beside_reference(
    runs: Sequence[Mapping[str, Any]],
    *,
    reference: str = "flexlora",
    tol: float = 0.01,
    majority: float | None = None,
    title: str = "",
):
    """Accuracy per round (left) and final accuracy (right) of one setting's runs, beside a
    reference run with a +- ``tol`` band.

    Args:
        runs: dicts with ``label``, ``final_accuracy`` and ``history`` (records with ``round``
            and ``accuracy``; may be empty).
        reference: the label the others are compared with (its band is drawn if present).
        tol: half-width of the band, in accuracy units (0.01 = 1 percentage point).
        majority: accuracy of always predicting the majority class (a dotted line), if known.
        title: figure title.
    """
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    styles = _label_styles(runs)
    fig, (ax0, ax1) = plt.subplots(
        1, 2, figsize=(12, 4.4), gridspec_kw={"width_ratios": [1.2, 1]}, layout="constrained"
    )
    _plot_accuracy(ax0, runs, styles)
    ax0.set_xlabel("round")
    ax0.set_ylabel("test accuracy")
    ax0.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax0.grid(alpha=0.3)
    ax0.set_title("per evaluated round")
    labels = [r["label"] for r in runs]
    finals = [r["final_accuracy"] for r in runs]
    y = np.arange(len(runs))
    ax1.barh(y, finals, color=[styles[lab]["color"] for lab in labels])
    ax1.set_yticks(y, labels, fontsize=8)
    ax1.invert_yaxis()
    ref = next((r["final_accuracy"] for r in runs if r["label"] == reference), None)
    if ref is not None:
        ax1.axvspan(
            ref - tol, ref + tol, color="tab:green", alpha=0.2, label=f"{reference} +- {tol:g}"
        )
        ax1.axvline(ref, color="tab:green", lw=1)
    lo = min(finals + ([majority] if majority is not None else []))
    ax1.set_xlim(max(0.0, lo - 0.05), min(1.0, max(finals) + 0.03))
    for yi, v in zip(y, finals, strict=True):
        ax1.text(v, yi, f" {v:.3f}", va="center", fontsize=7)
    if majority is not None:
        for ax in (ax0, ax1):
            line = ax.axhline if ax is ax0 else ax.axvline
            line(majority, color="grey", ls=":", lw=1, label="majority class")
    ax1.set_xlabel("final test accuracy")
    ax1.set_title("final")
    ax1.legend(fontsize=8, loc="lower right")  # the bars name the colors of the left panel too
    if title:
        fig.suptitle(title)
    return fig


def remaining_share_bars(
    rows: Sequence[Mapping[str, Any]],
    *,
    paper_change: float,
    factor: float | None = None,
    title: str = "",
):
    """What SHE-LoRA keeps of full HE's cost, per accounting and full-HE definition.

    The y axis is the share kept, ``100 + change`` (log scale), so that -99.7% and -94% are
    visibly different; the paper's share is a dashed line (and ``factor`` times it dotted,
    the threshold of a verdict).

    Args:
        rows: dicts with ``accounting``, ``definition`` and ``change_pct`` (percent; ``None``
            rows are skipped).
        paper_change: the paper's change, percent (e.g. -99.71).
        factor: draw ``factor * (100 + paper_change)`` as the threshold line.
        title: figure title.
    """
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r.get("change_pct") is not None]
    accountings = list(dict.fromkeys(r["accounting"] for r in rows))
    definitions = list(dict.fromkeys(r["definition"] for r in rows))
    width = 0.8 / max(len(definitions), 1)
    fig, ax = plt.subplots(figsize=(2.6 * len(accountings) + 3, 4.2), layout="constrained")
    colors = plt.get_cmap("tab10").colors
    for j, d in enumerate(definitions):
        for i, acc in enumerate(accountings):
            hit = [r for r in rows if r["definition"] == d and r["accounting"] == acc]
            if not hit:
                continue
            share = 100.0 + hit[0]["change_pct"]
            x = i + (j - (len(definitions) - 1) / 2) * width
            ax.bar(x, share, width, color=colors[j % 10], label=d if i == 0 else None)
            ax.text(x, share, f"{hit[0]['change_pct']:+.2f}%", ha="center", va="bottom", fontsize=7)
    ax.axhline(
        100 + paper_change, color="black", ls="--", lw=1, label=f"paper {paper_change:+.2f}%"
    )
    if factor:
        ax.axhline(
            factor * (100 + paper_change),
            color="black",
            ls=":",
            lw=1,
            label=f"x{factor:g} (verdict)",
        )
    ax.set_yscale("log")
    ax.set_xticks(range(len(accountings)), accountings)
    ax.set_ylabel("share of full HE's cost kept (%)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    if title:
        ax.set_title(title)
    return fig


def cost_growth(
    rows: Sequence[Mapping[str, Any]],
    *,
    measured: Sequence[Mapping[str, Any]] = (),
    title: str = "",
):
    """Upload per client as models grow (left), and the share of full HE kept (right).

    Args:
        rows: dicts with ``model``, ``params_b`` (billions), ``scheme``, ``upload_bytes`` and,
            optionally, ``share_pct`` with ``definition`` (right panel; one line per
            definition).
        measured: dicts with ``params_b``, ``scheme`` and ``upload_bytes`` measured on real
            messages, drawn as open markers over the counted lines.
        title: figure title.
    """
    import matplotlib.pyplot as plt

    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(12, 4.4), layout="constrained")
    schemes = list(dict.fromkeys(r["scheme"] for r in rows if "upload_bytes" in r))
    colors = plt.get_cmap("tab10").colors
    color = {s: colors[i % 10] for i, s in enumerate(schemes)}
    for s in schemes:
        pts = sorted((r["params_b"], r["upload_bytes"]) for r in rows if r.get("scheme") == s)
        x, y = zip(*pts, strict=True)
        ax0.plot(x, np.asarray(y) / 1e6, marker="o", ms=3, color=color[s], label=s)
    for m in measured:
        if m["scheme"] in color:
            ax0.plot(
                m["params_b"], m["upload_bytes"] / 1e6, marker="s", ms=8, mfc="none",
                color=color[m["scheme"]], ls="none",
            )  # fmt: skip
    if measured:
        ax0.plot([], [], marker="s", mfc="none", color="grey", ls="none", label="measured")
    ax0.set_xscale("log")
    ax0.set_yscale("log")
    ax0.set_xlabel("model parameters (billions)")
    ax0.set_ylabel("upload per client and round (MB)")
    ax0.grid(alpha=0.3, which="both")
    ax0.legend(fontsize=7)
    shares = [r for r in rows if r.get("share_pct") is not None]
    for i, d in enumerate(dict.fromkeys(r["definition"] for r in shares)):
        pts = sorted((r["params_b"], r["share_pct"]) for r in shares if r["definition"] == d)
        x, y = zip(*pts, strict=True)
        ax1.plot(x, y, marker="o", ms=3, color=colors[(i + 5) % 10], label=d)
    ax1.set_xscale("log")
    ax1.set_yscale("log")
    ax1.set_xlabel("model parameters (billions)")
    ax1.set_ylabel("share of full HE's upload kept by SHE-LoRA (%)")
    ax1.grid(alpha=0.3, which="both")
    ax1.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    return fig


def rouge_beside_paper(
    ours: Mapping[str, Mapping[int, float]],
    paper: Mapping[str, Mapping[int, float]],
    *,
    title: str = "",
):
    """DAGER ROUGE-1 (%) per method and batch size: ours (solid) beside the paper's (hatched).

    Args:
        ours: label -> batch size -> ROUGE-1 (%).
        paper: label -> batch size -> ROUGE-1 (%) (labels matching ``ours`` are paired).
        title: figure title.

    A ROUGE-1 of 0 is drawn as a 0.5-high bar so that it stays visible.
    """
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    labels = list(dict.fromkeys([*ours, *paper]))
    batches = sorted({b for d in (*ours.values(), *paper.values()) for b in d})
    colors = plt.get_cmap("viridis")(np.linspace(0.1, 0.9, max(len(batches), 1)))
    fig, ax = plt.subplots(figsize=(1.3 * len(labels) + 3, 4.2), layout="constrained")
    slot = 0.8 / max(2 * len(batches), 1)
    for i, lab in enumerate(labels):
        for j, b in enumerate(batches):
            for k, (src, hatch) in enumerate(((ours, None), (paper, "//"))):
                v = src.get(lab, {}).get(b)
                if v is None:
                    continue
                x = i - 0.4 + slot * (2 * j + k + 0.5)
                ax.bar(
                    x, max(v, 0.5), slot, color=colors[j], hatch=hatch,
                    edgecolor="black" if hatch else colors[j], lw=0.5,
                )  # fmt: skip
    handles = [Patch(color=colors[j], label=f"batch {b}") for j, b in enumerate(batches)]
    handles += [
        Patch(facecolor="white", edgecolor="black", label="ours (solid)"),
        Patch(facecolor="white", edgecolor="black", hatch="//", label="paper (hatched)"),
    ]
    ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("DAGER ROUGE-1 (%)")
    ax.set_ylim(0, 105)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    if title:
        ax.set_title(title)
    return fig


def threat_matrix(
    cells: Mapping[tuple[str, str], float],
    *,
    rows: Sequence[str],
    cols: Sequence[str],
    threshold: float = 10.0,
    recovered: float = 50.0,
    title: str = "",
):
    """Worst ROUGE-1 (%) per (row, column) as a coloured grid: rows are what was attacked
    (variant and update), columns the attackers; cells never measured stay grey ("not run").

    Args:
        cells: ``(row, col) -> ROUGE-1 (%)``.
        rows, cols: the order shown.
        threshold: values below it are "defeated" (green).
        recovered: values from it up are "recovered" (red); between the two, "partial".
        title: figure title.
    """
    import matplotlib.pyplot as plt
    from matplotlib.colors import BoundaryNorm, ListedColormap

    grid = np.full((len(rows), len(cols)), np.nan)
    for (r, c), v in cells.items():
        grid[rows.index(r), cols.index(c)] = v
    cmap = ListedColormap(["#2a9d8f", "#e9c46a", "#e76f51"])
    cmap.set_bad("#dddddd")
    norm = BoundaryNorm([0, threshold, recovered, 100.0001], cmap.N)
    fig, ax = plt.subplots(
        figsize=(2.0 * len(cols) + 3.5, 0.45 * len(rows) + 1.6), layout="constrained"
    )
    ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, norm=norm, aspect="auto")
    for i in range(len(rows)):
        for j in range(len(cols)):
            v = grid[i, j]
            ax.text(j, i, "not run" if np.isnan(v) else f"{v:.0f}", ha="center", va="center",
                    fontsize=8, color="#555555" if np.isnan(v) else "black")  # fmt: skip
    ax.set_xticks(range(len(cols)), cols, fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    ax.tick_params(length=0)
    ax.set_title(
        title
        or f"worst ROUGE-1 (%) over batch sizes and budgets: green < {threshold:g} (defeated), "
        f"yellow partial, red >= {recovered:g} (recovered)",
        fontsize=9,
    )
    return fig


def save(fig, path: str | Path) -> Path:
    """Save ``fig`` as PNG (150 dpi), creating the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150, bbox_inches="tight")
    return path
