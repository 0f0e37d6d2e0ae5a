"""``rankcut project``: replace target layers by rank-k pairs in a basis chosen by a method."""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich.table import Table

from rankcut.api import Budget, ProjectConfig, project as project_model
from rankcut.cli.console import Reporter
from rankcut.cli.options import Checkpoint, Exclude, Force, Json, Layers, Output, Quiet, Seed
from rankcut.compress.methods import METHODS
from rankcut.errors import RankcutError
from rankcut.files.checkpoint import load_with_meta, save
from rankcut.files.fileio import check_output, file_digest
from rankcut.files.statsfile import check_digest, load_stats

METHOD_HELP = "Basis: " + "; ".join(f"{m.name}: {m.summary}" for m in METHODS.values()) + "."
BUDGET_HELP = ("Global budget instead of --keep: the output keeps at most this fraction F in (0, 1) of the input's "
               "total MACs; each layer's rank (or staying as it is) minimises the summed predicted loss. Losses are "
               "compared across layers as: " + "; ".join(
                   f"{m.name}: {m.budget_units}" for m in METHODS.values() if m.budget) + " (" + ", ".join(
                   m.name for m in METHODS.values() if not m.budget) + " predicts none).")


def _config(method: str, keep: float | None, macs: float | None, params: float | None, **rest) -> ProjectConfig:
    if macs is not None and params is not None:
        raise RankcutError("give one budget: --macs or --params, not both")
    budget = Budget("macs", macs) if macs is not None else Budget("params", params) if params is not None else None
    return ProjectConfig(method=method, keep=keep, budget=budget, **rest)


def project(
    checkpoint: Checkpoint,
    output: Output,
    stats_path: Annotated[Optional[str], typer.Option("--stats", "-s", help="Statistics from rankcut stats (not needed for svd, random).")] = None,
    method: Annotated[str, typer.Option("--method", "-m", help=METHOD_HELP)] = "pca",
    keep: Annotated[Optional[float], typer.Option("--keep", help="Each layer keeps round(F x current rank), F in (0, 1].")] = None,
    macs: Annotated[Optional[float], typer.Option("--macs", help=BUDGET_HELP)] = None,
    params: Annotated[Optional[float], typer.Option("--params", help="Like --macs, for the fraction of the input's total parameters.")] = None,
    layers: Layers = None,
    exclude: Exclude = None,
    damping: Annotated[Optional[float], typer.Option("--damping", help="fisher: damping of G, relative to its mean eigenvalue (default 1e-3).")] = None,
    seed: Seed = 0,
    force: Force = False,
    json_out: Json = False,
    quiet: Quiet = False,
) -> None:
    """Rank-reduce target layers: fold their BatchNorm, then replace each by k filters plus a 1x1 back up.

    How much to keep: --keep F (every layer the same fraction of its rank), or a global budget, --macs F or
    --params F (a fraction of the input checkpoint's totals, the whole model counted), spent where the
    method predicts the least loss per MAC or parameter saved.
    """
    report = Reporter(quiet, json_out)
    config = _config(method, keep, macs, params, layers=tuple(layers) if layers else None,
                     exclude=tuple(exclude) if exclude else None, damping=damping, seed=seed)
    check_output(output, [checkpoint, stats_path], force)
    if stats_path is None and config.entry.needs != "none":
        raise RankcutError(f"--method {method} needs --stats (make them with: rankcut stats {checkpoint} --data D "
                           "-o S.npz)")
    model, meta = load_with_meta(checkpoint)
    stats = None
    if stats_path is not None:
        stats = load_stats(stats_path)
        check_digest(stats, checkpoint, stats_path)
    result = project_model(model, meta.input, stats, config, where=stats_path or "the statistics")
    if result.budget and result.budget["note"]:
        report.warn(result.budget["note"])
    if not result.edits:
        report.warn("no layer changed: at these ranks no pair would save MACs")
    history = {**result.history(), "stats": None if stats_path is None else file_digest(stats_path)[:16]}
    save(model, meta.with_edits(*result.edits).with_history("project", **history), output)
    data = {"output": output, **result.to_dict()}
    report.result(data, _table(data["layers"], data["totals"], data["budget"]))


def _table(rows: list[dict], totals: dict, budget: dict | None) -> Table:
    columns = ["layer", "rank", "kept var", "predicted loss"] + (["budget loss"] if budget else [])
    caption = None
    if budget:
        caption = (f"{budget['kind']} budget {100 * budget['fraction']:.2f}% of {budget['total_before']:,} = "
                   f"{budget['target']:,}; achieved {budget['achieved']:,} ({100 * budget['of_target']:.2f}% of the "
                   f"budget); summed budget loss {budget['loss']:.4g} {budget['loss_units']}")
        if budget["note"]:
            caption += f"\n{budget['note']}"
    table = Table(*columns, "MACs before", "MACs after", "params before", "params after", "status",
                  title="projection", title_justify="left", caption=caption, caption_justify="left")
    for r in rows:
        kept = "" if r["kept_variance"] is None else f"{100 * r['kept_variance']:.2f}%"
        loss = "" if r["predicted_loss"] is None else f"{r['predicted_loss']:.4g} {r['loss_units']}"
        extra = [f"{r['budget_loss']:.4g}"] if budget else []
        table.add_row(r["layer"], f"{r['old_rank']} -> {r['new_rank']}", kept, loss, *extra, f"{r['macs_before']:,}",
                      f"{r['macs_after']:,}", f"{r['params_before']:,}", f"{r['params_after']:,}", r["status"])
    table.add_section()
    table.add_row("total", "", "", "", *([""] if budget else []), f"{totals['macs_before']:,}",
                  f"{totals['macs_after']:,}", f"{totals['params_before']:,}", f"{totals['params_after']:,}",
                  f"MACs x{totals['macs_ratio']:.3f}, params x{totals['params_ratio']:.3f}")
    return table
