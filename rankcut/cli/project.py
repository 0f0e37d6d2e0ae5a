"""``rankcut project``: replace target layers by rank-k pairs in a basis chosen by a method."""

from __future__ import annotations

import fnmatch
from typing import Annotated, Optional

import torch
import typer
from rich.table import Table

from rankcut.compress.budget import NO_LOSS, loss_units, plan_budget, ranks_from_keep
from rankcut.files.checkpoint import load_with_meta, save
from rankcut.cli.console import Reporter
from rankcut.model.edits import get_module
from rankcut.errors import RankcutError
from rankcut.files.fileio import check_output, file_digest
from rankcut.model.layers import LowRank, current_rank
from rankcut.model.cost import count_macs, count_params
from rankcut.compress.methods import DATA_FREE, METHODS
from rankcut.compress.project import LayerReport, layer_cost, project_model
from rankcut.files.statsfile import StatsFile, check_fits, load_stats
from rankcut.model.targets import Target, select
from rankcut.cli.options import Checkpoint, Exclude, Force, Json, Layers, Output, Quiet, Seed, Structure
from rankcut.cli.project_channels import project_channels
from rankcut.model.graph import check_structure


def _stats_targets(stats: StatsFile, layers: list[str] | None, exclude: list[str] | None, path: str) -> list[Target]:
    names = list(stats.layers)
    for p in (layers or []) + (exclude or []):
        if not any(fnmatch.fnmatchcase(n, p) for n in names):
            raise RankcutError(f"{p!r} matches no layer in {path} (it has: {', '.join(names[:6])}"
                               f"{', ...' if len(names) > 6 else ''})")
    keep = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in layers or ["*"])
            and not any(fnmatch.fnmatchcase(n, p) for p in exclude or [])]
    if not keep:
        raise RankcutError("no layers selected")
    return [stats.layers[n].target for n in keep]


def _check_stats(stats: StatsFile, checkpoint: str, stats_path: str) -> None:
    digest = file_digest(checkpoint)
    if stats.checkpoint != digest:
        raise RankcutError(f"{stats_path} was computed for another checkpoint (digest {stats.checkpoint[:12]}), "
                           f"not {checkpoint} ({digest[:12]}); rerun rankcut stats on {checkpoint}")


def _budget(keep: float | None, macs: float | None, params: float | None) -> tuple[str, float] | None:
    """The global budget asked for, as (kind, fraction), or None for --keep; one-line errors for bad mixes."""
    if macs is not None and params is not None:
        raise RankcutError("give one budget: --macs or --params, not both")
    kind, fraction = ("macs", macs) if macs is not None else ("params", params)
    if fraction is None:
        if keep is None:
            raise RankcutError("say how much to keep: --keep F, --macs F or --params F")
        return None
    if keep is not None:
        raise RankcutError(f"--keep and --{kind} are alternatives: give one")
    if not 0 < fraction < 1:
        raise RankcutError(f"--{kind} must be in (0, 1), got {fraction}")
    return kind, fraction


def _budget_reports(reports: list[LayerReport], model, targets: list[Target]) -> list[LayerReport]:
    """One report per target in order: the projected ones, and the ones the budget left as they were."""
    by_name = {r.layer: r for r in reports}
    out = []
    for t in targets:
        layer = get_module(model, t.name)
        rank, what = current_rank(layer), "pair" if isinstance(layer, LowRank) else "whole"
        out.append(by_name.get(t.name) or LayerReport(t.name, rank, rank, f"{what}: kept by the budget"))
    return out


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


def project(
    checkpoint: Checkpoint,
    output: Output,
    stats_path: Annotated[Optional[str], typer.Option("--stats", "-s", help="Statistics from rankcut stats (not needed for svd, random).")] = None,
    method: Annotated[str, typer.Option("--method", "-m", help=f"Basis: {', '.join(METHODS)}.")] = "pca",
    keep: Annotated[Optional[float], typer.Option("--keep", help="Each layer keeps round(F x current rank), F in (0, 1].")] = None,
    macs: Annotated[Optional[float], typer.Option("--macs", help=(
        "Global budget instead of --keep: the output keeps at most this fraction F in (0, 1) of the input's total "
        "MACs; each layer's rank (or staying as it is) minimises the summed predicted loss. Losses are compared "
        "across layers as: fisher, hessian: predicted output change; pca: discarded variance fraction; svd: "
        "discarded weight-energy fraction; l1: discarded L1-mass fraction (random predicts none)."))] = None,
    params: Annotated[Optional[float], typer.Option("--params", help=(
        "Like --macs, for the fraction of the input's total parameters."))] = None,
    layers: Layers = None,
    exclude: Exclude = None,
    structure: Structure = "pair",
    damping: Annotated[float, typer.Option("--damping", help="fisher: damping of G, relative to its mean eigenvalue.")] = 1e-3,
    seed: Seed = 0,
    force: Force = False,
    json_out: Json = False,
    quiet: Quiet = False,
) -> None:
    """Rank-reduce target layers: fold their BatchNorm, then replace each by k filters plus a 1x1 back up.

    How much to keep: --keep F (every layer the same fraction of its rank), or a global budget, --macs F or
    --params F (a fraction of the input checkpoint's totals, the whole model counted), spent where the
    method predicts the least loss per MAC or parameter saved.

    --structure channels removes channels instead: each producer -> consumer chain keeps the channels that
    best predict the others by least squares, and the consumer is refitted (no layer is added).
    """
    report = Reporter(quiet, json_out)
    if method not in METHODS:
        raise RankcutError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    budget = _budget(keep, macs, params)
    if keep is not None and not 0 < keep <= 1:
        raise RankcutError(f"--keep must be in (0, 1], got {keep}")
    if budget is not None and method == "random":
        raise RankcutError(NO_LOSS)
    if damping < 0:
        raise RankcutError("--damping must be non-negative")
    check_structure(structure)
    check_output(output, [checkpoint, stats_path], force)
    model, meta = load_with_meta(checkpoint)
    if stats_path is None and (method not in DATA_FREE or structure == "channels"):
        needs = "--structure channels" if structure == "channels" else f"--method {method}"
        raise RankcutError(f"{needs} needs --stats (make them with: rankcut stats {checkpoint} --data D -o S.npz)")
    if stats_path is not None:
        stats = load_stats(stats_path)
        _check_stats(stats, checkpoint, stats_path)
        check_fits(stats, model, meta.input, stats_path)
        if structure == "channels":  # its own pipeline: rankcut/cli/project_channels.py
            return project_channels(model, meta, stats, checkpoint=checkpoint, stats_path=stats_path, output=output,
                                    keep=keep, budget=budget, layers=layers, exclude=exclude, report=report)
        targets, layer_stats = _stats_targets(stats, layers, exclude, stats_path), stats.layers
    else:
        targets, layer_stats = select(model, meta.input, layers, exclude), {}
    macs_before, per_before = count_macs(model, meta.input)
    params_before = count_params(model)
    costs_before = {t.name: layer_cost(model, t.name, per_before) for t in targets}
    plan, chosen = None, targets
    if budget is None:
        ranks = ranks_from_keep(model, [t.name for t in targets], keep)
    else:
        kind, fraction = budget
        plan = plan_budget(model, targets, layer_stats, method, kind, fraction,
                           macs_before if kind == "macs" else params_before, per_before, damping=damping, seed=seed)
        ranks = plan.ranks
        chosen = [t for t in targets if ranks[t.name] < current_rank(get_module(model, t.name))]
    with torch.no_grad():
        edits, reports = project_model(model, chosen, layer_stats, method, ranks, damping=damping, seed=seed,
                                       bases=None if plan is None else plan.bases)
    if plan is not None:
        reports = _budget_reports(reports, model, targets)
    macs_after, per_after = count_macs(model, meta.input)
    for r in reports:
        (r.macs_before, r.params_before), (r.macs_after, r.params_after) = costs_before[r.layer], layer_cost(model, r.layer, per_after)
    params_after = count_params(model)
    budget_info = None
    if plan is not None:
        achieved = macs_after if plan.kind == "macs" else params_after
        if achieved > plan.budget:  # the cost model is exact; this guards the promise, not the arithmetic
            raise RankcutError(f"internal error: the projected model has {achieved:,} {plan.kind}, over the budget "
                               f"{plan.budget:,} (predicted {plan.total:,}); nothing written")
        budget_info = {"kind": plan.kind, "fraction": plan.fraction, "total_before": plan.total_before,
                       "target": plan.budget, "achieved": achieved, "of_target": achieved / plan.budget,
                       "loss": plan.loss, "loss_units": loss_units(method), "note": plan.note}
        if plan.note:
            report.warn(plan.note)
    if not edits:
        report.warn("no layer changed: at these ranks no pair would save MACs")
    history = {"method": method, **({"keep": keep} if plan is None else {plan.kind: plan.fraction}),
               "stats": None if stats_path is None else file_digest(stats_path)[:16],
               "layers": sum(r.status == "projected" for r in reports)}
    save(model, meta.with_edits(*edits).with_history("project", **history), output)
    totals = {"macs_before": macs_before, "macs_after": macs_after, "macs_ratio": macs_after / macs_before,
              "params_before": params_before, "params_after": params_after, "params_ratio": params_after / params_before}
    rows = [r.to_dict() for r in reports]
    if plan is not None:
        for row in rows:
            row["budget_loss"] = plan.chosen(row["layer"])["loss"]
    report.result({"output": output, "method": method, "keep": keep, "budget": budget_info, "layers": rows,
                   "totals": totals}, _table(rows, totals, budget_info))
