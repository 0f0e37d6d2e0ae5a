"""Pictures rankcut writes with ``--plot``: the sweep's accuracy/cost frontier, the statistics' spectra and a
checkpoint's layer widths and MACs.

matplotlib is an optional extra (``pip install 'rankcut[plot]'``); without it ``--plot`` is refused before any
work, in one line that says how to install it. Figures are drawn with matplotlib's object API on the Agg
renderer (no pyplot: no global state, no display needed) and written atomically like every output.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from rankcut.errors import RankcutError
from rankcut.files.fileio import atomic_write, check_output

FORMATS = ("png", "svg")
INSTALL = "--plot needs matplotlib: pip install 'rankcut[plot]' (or: pip install matplotlib)"


def _figure(**kwargs):
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise RankcutError(INSTALL) from None
    return Figure(**kwargs)


def check_plot(path: str | os.PathLike, inputs: list, force: bool) -> None:
    """Refuse, before any work, a plot rankcut cannot write: no matplotlib, another format, a bad folder."""
    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix not in FORMATS:
        raise RankcutError(f"--plot writes {' or '.join('.' + f for f in FORMATS)} (by its suffix), got {path}")
    _figure()
    check_output(path, inputs, force)


def _save(figure, path: str | os.PathLike) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    fmt = Path(path).suffix.lower().lstrip(".")
    atomic_write(path, lambda tmp: figure.savefig(tmp, format=fmt, dpi=120, bbox_inches="tight"))


def frontier_plot(result: dict, path: str | os.PathLike, title: str = "") -> None:
    """Top-1 against the MACs ratio, a line per structure/method, the original as a reference line.

    Pareto-optimal points are ringed; the recommendation (if any) is a star.
    """
    from rankcut.run.frontier import label

    figure = _figure(figsize=(6.4, 4.4))
    ax = figure.add_subplot()
    lines: dict[str, list[dict]] = {}
    for p in result["points"]:
        lines.setdefault(label(p), []).append(p)
    for name, points in lines.items():
        points = sorted(points, key=lambda p: p["ratios"]["macs"])
        ax.plot([p["ratios"]["macs"] for p in points], [100 * p["top1"] for p in points], marker="o",
                markersize=4, label=name)
    best = [p for p in result["points"] if p["pareto"]]
    if best:
        ax.scatter([p["ratios"]["macs"] for p in best], [100 * p["top1"] for p in best], s=90, facecolors="none",
                   edgecolors="black", linewidths=1, label="Pareto-optimal", zorder=3)
    rec = result.get("recommendation")
    if rec:
        ax.scatter([rec["ratios"]["macs"]], [100 * rec["top1"]], marker="*", s=160, color="gold",
                   edgecolors="black", zorder=4, label=f"recommended (within {result['within']:g} pts)")
    original = 100 * result["original"]["top1"]
    ax.axhline(original, color="gray", linestyle="--", linewidth=1, label=f"original ({original:.2f}%)")
    ax.scatter([1.0], [original], color="gray", s=20, zorder=3)
    ratios = [p["ratios"]["macs"] for p in result["points"]]
    if ratios and min(ratios) < 0.1:  # budgets spanning decades: a log axis, so the cheap end is readable
        from matplotlib.ticker import FuncFormatter

        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
        ax.set_xlim(min(ratios) / 1.3, 1.3)
    else:
        ax.set_xlim(0, 1.05)
    ax.set_xlabel("MACs, fraction of the original")
    ax.set_ylabel("top-1 (%)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small", loc="best")
    if title:
        ax.set_title(title, fontsize="medium")
    _save(figure, path)


def spectra_plot(stats, path: str | os.PathLike, title: str = "") -> None:
    """Each measured layer's output-covariance spectrum and its PCA predicted loss against rank, on log scales.

    Left: eigenvalues over their sum, in descending order. Right: the variance a rank-k projection drops
    (the tail sum over the total, pca's predicted loss as a fraction), which is where each layer can be cut.
    """
    figure = _figure(figsize=(10, 4.2))
    left, right = figure.add_subplot(1, 2, 1), figure.add_subplot(1, 2, 2)
    for name, s in stats.layers.items():
        values = torch.linalg.eigvalsh(s.moments.covariance).flip(0).clamp_min(0).double()
        total = values.sum().item()
        if total <= 0:
            continue
        share = (values / total).numpy()
        tail = (1 - torch.cumsum(values, 0) / total).clamp_min(0)[:-1].numpy()
        ranks = range(1, len(share) + 1)
        left.plot(list(ranks), share, linewidth=1, label=name)
        right.plot(list(ranks)[:len(tail)], tail, linewidth=1, label=name)
    left.set_yscale("log")
    right.set_yscale("log")
    left.set_xlabel("eigenvalue index")
    left.set_ylabel("eigenvalue / sum")
    right.set_xlabel("rank k")
    right.set_ylabel("variance dropped at rank k (fraction)")
    for ax in (left, right):
        ax.grid(True, alpha=0.3)
    if len(stats.layers) <= 12:
        right.legend(fontsize="x-small", loc="upper right")
    if title:
        figure.suptitle(title, fontsize="medium")
    _save(figure, path)


def checkpoint_plot(info: dict, path: str | os.PathLike, title: str = "") -> None:
    """Per layer (``info CHECKPOINT``'s rows, in model order): its width in the base architecture against what
    it keeps now (a pair's rank, a pruned producer's channels), and its share of the checkpoint's MACs."""
    rows = [r for r in info["layers"] if r["width"] is not None]
    names = [r["name"] for r in rows]
    before = [r.get("original_width", r["width"]) for r in rows]
    after = [r["rank"] if r["rank"] is not None else r["width"] for r in rows]
    total = max(info["macs"], 1)
    share = [100 * r["macs"] / total for r in rows]
    height = max(2.5, 0.28 * len(rows) + 1.2)
    figure = _figure(figsize=(10, height + 0.4), layout="constrained")
    left, right = figure.add_subplot(1, 2, 1), figure.add_subplot(1, 2, 2)
    y = list(range(len(rows)))
    left.barh(y, before, color="lightgray", edgecolor="gray", label="original width")
    colors = {"pair": "tab:blue", "channels": "tab:orange", "whole": "tab:green"}
    left.barh(y, after, height=0.5, color=[colors[r["structure"]] for r in rows], label="kept (rank or channels)")
    for i, (b, a) in enumerate(zip(before, after)):
        left.text(max(b, a), i, f" {a}/{b}", va="center", fontsize="x-small")
    right.barh(y, share, color=[colors[r["structure"]] for r in rows])
    for i, value in enumerate(share):
        right.text(value, i, f" {value:.1f}%", va="center", fontsize="x-small")
    from matplotlib.patches import Patch

    shown = dict.fromkeys(r["structure"] for r in rows)
    handles = [Patch(color="lightgray", label="original width")] + [
        Patch(color=colors[s], label={"pair": "rank-k pair: rank", "channels": "pruned: channels kept",
                                      "whole": "whole: width"}[s]) for s in shown]
    figure.legend(handles=handles, fontsize="x-small", loc="outside lower center", ncol=len(handles))
    for ax in (left, right):
        ax.set_yticks(y, names, fontsize="x-small")
        ax.invert_yaxis()
        ax.grid(True, axis="x", alpha=0.3)
    left.set_xlabel("output width / rank")
    left.set_xlim(0, 1.15 * max(before + after + [1]))
    right.set_xlabel(f"share of the MACs ({info['macs']:,} in all), %")
    right.set_xlim(0, 1.15 * max(share + [1]))
    if title:
        figure.suptitle(title, fontsize="medium")
    _save(figure, path)
