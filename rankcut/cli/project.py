"""``rankcut project``: replace target layers by rank-k pairs in a basis chosen by a method."""

from __future__ import annotations

import fnmatch
from typing import Annotated, Optional

import torch
import typer
from rich.table import Table

from ..budget import ranks_from_keep
from ..checkpoint import load_with_meta, save
from ..console import Reporter
from ..errors import RankcutError
from ..fileio import check_output, file_digest
from ..measure import count_macs, count_params
from ..methods import DATA_FREE, METHODS
from ..project import layer_cost, project_model
from ..statsfile import StatsFile, load_stats
from ..targets import Target, select
from .options import Checkpoint, Exclude, Force, Json, Layers, Output, Quiet, Seed


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


def _table(rows: list[dict], totals: dict) -> Table:
    table = Table("layer", "rank", "kept var", "predicted loss", "MACs before", "MACs after", "status",
                  title="projection", title_justify="left")
    for r in rows:
        kept = "" if r["kept_variance"] is None else f"{100 * r['kept_variance']:.2f}%"
        loss = "" if r["predicted_loss"] is None else f"{r['predicted_loss']:.4g} {r['loss_units']}"
        table.add_row(r["layer"], f"{r['old_rank']} -> {r['new_rank']}", kept, loss, f"{r['macs_before']:,}",
                      f"{r['macs_after']:,}", r["status"])
    table.add_section()
    table.add_row("total", "", "", "", f"{totals['macs_before']:,}", f"{totals['macs_after']:,}",
                  f"MACs x{totals['macs_ratio']:.3f}, params x{totals['params_ratio']:.3f}")
    return table


def project(
    checkpoint: Checkpoint,
    output: Output,
    stats_path: Annotated[Optional[str], typer.Option("--stats", "-s", help="Statistics from rankcut stats (not needed for svd, random).")] = None,
    method: Annotated[str, typer.Option("--method", "-m", help=f"Basis: {', '.join(METHODS)}.")] = "pca",
    keep: Annotated[Optional[float], typer.Option("--keep", help="Each layer keeps round(F x current rank), F in (0, 1].")] = None,
    layers: Layers = None,
    exclude: Exclude = None,
    damping: Annotated[float, typer.Option("--damping", help="fisher: damping of G, relative to its mean eigenvalue.")] = 1e-3,
    seed: Seed = 0,
    force: Force = False,
    json_out: Json = False,
    quiet: Quiet = False,
) -> None:
    """Rank-reduce target layers: fold their BatchNorm, then replace each by k filters plus a 1x1 back up."""
    report = Reporter(quiet, json_out)
    if method not in METHODS:
        raise RankcutError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    if keep is None:
        raise RankcutError("say how much to keep: --keep F")
    if not 0 < keep <= 1:
        raise RankcutError(f"--keep must be in (0, 1], got {keep}")
    if damping < 0:
        raise RankcutError("--damping must be non-negative")
    check_output(output, [checkpoint, stats_path], force)
    model, meta = load_with_meta(checkpoint)
    if stats_path is None and method not in DATA_FREE:
        raise RankcutError(f"--method {method} needs --stats (make them with: rankcut stats {checkpoint} --data D -o S.npz)")
    if stats_path is not None:
        stats = load_stats(stats_path)
        _check_stats(stats, checkpoint, stats_path)
        targets, layer_stats = _stats_targets(stats, layers, exclude, stats_path), stats.layers
    else:
        targets, layer_stats = select(model, meta.input, layers, exclude), {}
    ranks = ranks_from_keep(model, [t.name for t in targets], keep)
    macs_before, per_before = count_macs(model, meta.input)
    params_before = count_params(model)
    costs_before = {t.name: layer_cost(model, t.name, per_before) for t in targets}
    with torch.no_grad():
        edits, reports = project_model(model, targets, layer_stats, method, ranks, damping=damping, seed=seed)
    macs_after, per_after = count_macs(model, meta.input)
    for r in reports:
        (r.macs_before, r.params_before), (r.macs_after, r.params_after) = costs_before[r.layer], layer_cost(model, r.layer, per_after)
    if not edits:
        report.warn("no layer changed: at these ranks no pair would save MACs")
    params_after = count_params(model)
    history = {"method": method, "keep": keep, "stats": None if stats_path is None else file_digest(stats_path)[:16],
               "layers": sum(r.status == "projected" for r in reports)}
    save(model, meta.with_edits(*edits).with_history("project", **history), output)
    totals = {"macs_before": macs_before, "macs_after": macs_after, "macs_ratio": macs_after / macs_before,
              "params_before": params_before, "params_after": params_after, "params_ratio": params_after / params_before}
    rows = [r.to_dict() for r in reports]
    report.result({"output": output, "method": method, "keep": keep, "layers": rows, "totals": totals},
                  _table(rows, totals))
