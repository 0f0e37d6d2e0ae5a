"""Pictures rankcut writes with ``--plot``: the sweep's accuracy/cost frontier, the statistics' spectra and a
checkpoint's layer widths and MACs.

matplotlib is an optional extra (``pip install 'rankcut[plot]'``); without it ``--plot`` is refused before any
work, in one line that says how to install it. Figures are drawn with matplotlib's object API on the Agg
renderer (no pyplot: no global state, no display needed) and written atomically like every output.
"""

from __future__ import annotations

import io
import os
from html import escape
from pathlib import Path

import torch

from rankcut.errors import RankcutError
from rankcut.files.fileio import atomic_write, check_output

FORMATS = ("png", "svg")
PAGE = "html"  # a sweep's frontier can also be one self-contained page, the figure inline beside the table
INSTALL = "--plot needs matplotlib: pip install 'rankcut[plot]' (or: pip install matplotlib)"


def _figure(**kwargs):
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise RankcutError(INSTALL) from None
    return Figure(**kwargs)


def check_plot(path: str | os.PathLike, inputs: list, force: bool, html: bool = False) -> None:
    """Refuse, before any work, a plot rankcut cannot write: no matplotlib, another format, a bad folder."""
    suffix = Path(path).suffix.lower().lstrip(".")
    allowed = FORMATS + ((PAGE,) if html else ())
    if suffix not in allowed:
        raise RankcutError(f"--plot writes {', '.join('.' + f for f in allowed[:-1])} or .{allowed[-1]} (by its "
                           f"suffix), got {path}")
    _figure()
    check_output(path, inputs, force)


def _save(figure, path: str | os.PathLike) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    fmt = Path(path).suffix.lower().lstrip(".")
    atomic_write(path, lambda tmp: figure.savefig(tmp, format=fmt, dpi=120, bbox_inches="tight"))


COST_AXES = {"macs": "MACs, fraction of the original", "latency": "measured latency, ratio to the original"}


def _frontier_axes(ax, result: dict, cost: str) -> None:
    """Top-1 against ``cost``'s ratio on ``ax``: a line per structure/method, Pareto points ringed (as marked,
    whichever cost marked them), the recommendation a star, the original a reference line."""
    from rankcut.run.frontier import label

    lines: dict[str, list[dict]] = {}
    for p in result["points"]:
        lines.setdefault(label(p), []).append(p)
    for name, points in lines.items():
        points = sorted(points, key=lambda p: p["ratios"][cost])
        ax.plot([p["ratios"][cost] for p in points], [100 * p["top1"] for p in points], marker="o",
                markersize=4, label=name)
    best = [p for p in result["points"] if p["pareto"]]
    if best:
        ax.scatter([p["ratios"][cost] for p in best], [100 * p["top1"] for p in best], s=90, facecolors="none",
                   edgecolors="black", linewidths=1, label="Pareto-optimal", zorder=3)
    rec = result.get("recommendation")
    if rec:
        ax.scatter([rec["ratios"][cost]], [100 * rec["top1"]], marker="*", s=160, color="gold",
                   edgecolors="black", zorder=4, label=f"recommended (within {result['within']:g} pts)")
    original = 100 * result["original"]["top1"]
    ax.axhline(original, color="gray", linestyle="--", linewidth=1, label=f"original ({original:.2f}%)")
    ax.scatter([1.0], [original], color="gray", s=20, zorder=3)
    ratios = [p["ratios"][cost] for p in result["points"]]
    if ratios and min(ratios) < 0.1:  # budgets spanning decades: a log axis, so the cheap end is readable
        from matplotlib.ticker import FuncFormatter

        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
        ax.set_xlim(min(ratios) / 1.3, 1.3)
    else:
        ax.set_xlim(0, 1.05 * max(ratios + [1.0]))
    ax.set_xlabel(COST_AXES[cost])
    ax.set_ylabel("top-1 (%)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small", loc="best")


def frontier_figure(result: dict, title: str = ""):
    """The frontier: top-1 against MACs, and beside it against the measured latency ratio when points were
    timed (``sweep --measure-latency``)."""
    costs = ["macs"] + (["latency"] if any("latency" in p["ratios"] for p in result["points"]) else [])
    figure = _figure(figsize=(6.4 * len(costs), 4.4), layout="constrained")
    for i, cost in enumerate(costs):
        _frontier_axes(figure.add_subplot(1, len(costs), i + 1), result, cost)
    if title:
        figure.suptitle(title, fontsize="medium")
    return figure


def frontier_plot(result: dict, path: str | os.PathLike, title: str = "",
                  table: tuple[list[str], list[list[str]], list[bool], str] | None = None) -> None:
    """Write the frontier to ``path``: a .png or .svg, or a .html page with the figure inline (SVG) above
    ``table`` (header, rows, Pareto marks, caption), all in one file that loads nothing else."""
    figure = frontier_figure(result, title)
    if Path(path).suffix.lower() != f".{PAGE}":
        _save(figure, path)
        return
    page = _page(figure, title, *(table or ([], [], [], "")))
    atomic_write(path, lambda tmp: Path(tmp).write_text(page, encoding="utf-8"))


def _page(figure, title: str, header: list[str], rows: list[list[str]], marks: list[bool], note: str) -> str:
    """One HTML page: the figure as inline SVG and the table, Pareto rows in bold; nothing to fetch."""
    from matplotlib.backends.backend_svg import FigureCanvasSVG

    FigureCanvasSVG(figure)
    buffer = io.StringIO()
    figure.savefig(buffer, format="svg", bbox_inches="tight", metadata={"Date": None})
    svg = buffer.getvalue()
    svg = svg[svg.index("<svg"):]  # the inline element, without the XML declaration and doctype
    cells = "".join(f"<th>{escape(h)}</th>" for h in header)
    tags = {True: '<tr class="pareto">', False: "<tr>"}
    body = "\n".join(tags[bool(mark)] + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>"
                     for row, mark in zip(rows, marks))
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8"/>
<title>{escape(title or "rankcut sweep")}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; }}
table {{ border-collapse: collapse; font-size: 0.9em; }}
th, td {{ padding: 0.2em 0.6em; border-bottom: 1px solid #ddd; text-align: right; }}
th:first-child, td:first-child {{ text-align: left; }}
tr.pareto {{ font-weight: bold; background: #f3f7ff; }}
</style>
</head>
<body>
<h1>{escape(title or "rankcut sweep")}</h1>
{svg}
<table>
<thead><tr>{cells}</tr></thead>
<tbody>
{body}
</tbody>
</table>
<p>{escape(note)}; Pareto-optimal rows in bold</p>
</body>
</html>
"""


def spectra_figure(stats, ranks: dict[str, int] | None = None, title: str = ""):
    """Each measured layer's output-covariance spectrum and its PCA predicted loss against rank, on log scales.

    Left: eigenvalues over their sum, in descending order. Right: the variance a rank-k projection drops
    (the tail sum over the total, pca's predicted loss as a fraction), which is where each layer can be cut.
    ``ranks`` (a projected checkpoint's, by layer) are marked on the right where each layer was cut: a layer
    kept whole drops nothing and has no mark.
    """
    figure = _figure(figsize=(10, 4.2))
    left, right = figure.add_subplot(1, 2, 1), figure.add_subplot(1, 2, 2)
    marks: list[tuple[int, float, str]] = []
    for name, s in stats.layers.items():
        values = torch.linalg.eigvalsh(s.moments.covariance).flip(0).clamp_min(0).double()
        total = values.sum().item()
        if total <= 0:
            continue
        share = (values / total).numpy()
        tail = (1 - torch.cumsum(values, 0) / total).clamp_min(0)[:-1].numpy()
        ranks_axis = range(1, len(share) + 1)
        left.plot(list(ranks_axis), share, linewidth=1, label=name)
        (line,) = right.plot(list(ranks_axis)[:len(tail)], tail, linewidth=1, label=name)
        k = (ranks or {}).get(name)
        if k is not None and k <= len(tail):
            marks.append((k, float(tail[k - 1]), line.get_color()))
    if marks:
        right.scatter([m[0] for m in marks], [m[1] for m in marks], c=[m[2] for m in marks], marker="D", s=36,
                      edgecolors="black", zorder=3, label="chosen rank")
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
    return figure


def spectra_plot(stats, path: str | os.PathLike, title: str = "", ranks: dict[str, int] | None = None) -> None:
    """Write ``spectra_figure`` to a .png or .svg."""
    _save(spectra_figure(stats, ranks, title), path)


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
