"""``rankcut project``: replace target layers by rank-k pairs in a basis chosen by a method."""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated, Optional

import typer
from rich.table import Table

from rankcut import dist
from rankcut.api import Budget, ProjectConfig, project as project_model, project_calibrated
from rankcut.cli.console import Reporter
from rankcut.cli.options import (BatchSize, Checkpoint, Device, Exclude, Force, Json, Layers, Output, Quiet, Samples,
                                 Seed, Structure, Workers)
from rankcut.cli.tables import auto_table, channel_table
from rankcut.compress.methods import METHODS
from rankcut.errors import RankcutError
from rankcut.files.checkpoint import load_with_meta, save
from rankcut.files.fileio import check_output, file_digest
from rankcut.files.profilefile import check_profile, load_profile
from rankcut.files.statsfile import check_digest, load_stats
from rankcut.run.data import open_data, subset

METHOD_HELP = "Basis: " + "; ".join(f"{m.name}: {m.summary}" for m in METHODS.values()) + "."
BUDGET_HELP = ("Global budget instead of --keep: the output keeps at most this fraction F in (0, 1) of the input's "
               "total MACs; each layer's rank (or staying as it is) minimises the summed predicted loss. Losses are "
               "compared across layers as: " + "; ".join(
                   f"{m.name}: {m.budget_units}" for m in METHODS.values() if m.budget) + " (" + ", ".join(
                   m.name for m in METHODS.values() if not m.budget) + " predicts none).")


def _config(method: str, keep: float | None, fractions: dict[str, float | None], **rest) -> ProjectConfig:
    given = [Budget(kind, f) for kind, f in fractions.items() if f is not None]
    if len(given) > 1:
        raise RankcutError(f"give one budget: {' or '.join(f'--{b.kind}' for b in given)}, "
                           f"not {'both' if len(given) == 2 else 'several'}")
    return ProjectConfig(method=method, keep=keep, budget=given[0] if given else None, **rest)


def project(
    checkpoint: Checkpoint,
    output: Output,
    stats_path: Annotated[Optional[str], typer.Option("--stats", "-s", help="Statistics from rankcut stats (not needed for svd, random).")] = None,
    method: Annotated[str, typer.Option("--method", "-m", help=METHOD_HELP)] = "pca",
    keep: Annotated[Optional[float], typer.Option("--keep", help="Each layer keeps round(F x current rank), F in (0, 1].")] = None,
    macs: Annotated[Optional[float], typer.Option("--macs", help=BUDGET_HELP)] = None,
    params: Annotated[Optional[float], typer.Option("--params", help="Like --macs, for the fraction of the input's total parameters.")] = None,
    latency: Annotated[Optional[float], typer.Option("--latency", help=(
        "Like --macs, for the fraction of the whole model's latency measured by --profile (figures in nanoseconds)."))] = None,
    profile_path: Annotated[Optional[str], typer.Option("--profile", help=(
        "A latency profile of this checkpoint (rankcut profile): with it, no layer is replaced by a pair it "
        "measured as no faster, in every mode; --latency needs it."))] = None,
    calibrate: Annotated[int, typer.Option("--calibrate", help=(
        "With --latency: build the model, time it against this checkpoint as eval --latency does (the profile's "
        "runtime, threads and batch size), and re-solve with a corrected budget up to this many times (secant "
        "steps); the model measured nearest the budget is written and every round reported."))] = 0,
    layers: Layers = None,
    exclude: Exclude = None,
    structure: Structure = "pair",
    round_channels: Annotated[int, typer.Option("--round-channels", help=(
        "channels, auto: every kept channel count is a multiple of N (CPU kernels are faster on such widths)."))] = 1,
    damping: Annotated[Optional[float], typer.Option("--damping", help="fisher: damping of G, relative to its mean eigenvalue (default 1e-3).")] = None,
    sequential: Annotated[bool, typer.Option("--sequential", help=(
        "Measure each layer's statistics again on --data, layer by layer in forward order, on the model whose "
        "earlier layers are already projected (one pass per layer; fisher/hessian: plus the gradient pass, with "
        "the loss and probes of --stats). The ranks are decided from --stats first, as without it, so a budget "
        "is met the same."))] = False,
    data: Annotated[Optional[str], typer.Option("--data", "-d", help=(
        "With --sequential: the data the statistics are measured on (as rankcut stats --data)."))] = None,
    samples: Samples = None,
    batch_size: BatchSize = 64,
    workers: Workers = 0,
    device: Device = "auto",
    seed: Seed = 0,
    force: Force = False,
    json_out: Json = False,
    quiet: Quiet = False,
) -> None:
    """Rank-reduce target layers: fold their BatchNorm, then replace each by k filters plus a 1x1 back up.

    How much to keep: --keep F (every layer the same fraction of its rank), or a global budget, --macs F,
    --params F or --latency F (a fraction of the input checkpoint's totals, the whole model counted; latency as
    measured by --profile), spent where the method predicts the least loss per MAC, parameter or nanosecond saved.

    --structure channels removes channels instead: each producer -> consumer chain keeps the channels that
    best predict the others by least squares, and the consumer is refitted (no layer is added).
    --structure auto (with --method fisher and a budget) chooses per layer: whole, a pair, or channels.

    --sequential --data D: each layer's basis from statistics of the model with the layers before it already
    projected (errors of earlier layers are seen, not compounded); runs under torchrun like rankcut stats.
    """
    config = _config(method, keep, {"macs": macs, "params": params, "latency": latency}, layers=tuple(layers) if layers else None,
                     exclude=tuple(exclude) if exclude else None, damping=damping, seed=seed,
                     structure=structure, round_channels=round_channels, sequential=sequential,
                     batch_size=batch_size, workers=workers)
    if sequential and data is None:
        raise RankcutError("--sequential needs --data D: the statistics are measured again, layer by layer")
    if data is not None and not sequential:
        raise RankcutError("--data is read only with --sequential (plain project takes its statistics from --stats)")
    if sequential and calibrate:
        raise RankcutError("--calibrate re-solves a budget by timing whole models; it does not combine with "
                           "--sequential")
    check_output(output, [checkpoint, stats_path, profile_path, data], force)
    if latency is not None and profile_path is None:
        raise RankcutError(f"--latency needs --profile P.json (make one with: rankcut profile {checkpoint} -o P.json)")
    if calibrate < 0 or calibrate and latency is None:
        raise RankcutError(f"--calibrate takes a number of rounds (0 or more) with --latency, got {calibrate}"
                           + ("" if latency is not None else " without --latency"))
    if stats_path is None and (config.entry.needs != "none" or structure != "pair"):
        needs, extra = {"channels": ("--structure channels", " --structure channels"),
                        "auto": ("--structure auto", " --grad kl --structure channels")}.get(
            structure, (f"--method {method}", ""))
        raise RankcutError(f"{needs} needs --stats (make them with: rankcut stats {checkpoint} --data D{extra} "
                           "-o S.npz)")
    ctx = dist.setup(device if sequential else "cpu")
    try:
        report = Reporter(quiet, json_out, ctx.primary)
        model, meta = load_with_meta(checkpoint, ctx.device)
        stats = None
        if stats_path is not None:
            stats = load_stats(stats_path)
            check_digest(stats, checkpoint, stats_path)
        timing = None
        if profile_path is not None:
            timing = load_profile(profile_path)
            check_profile(timing, checkpoint, profile_path)
        dataset = None if data is None else subset(open_data(data, meta.input, seed=seed), samples, seed)
        rounds = []
        if calibrate:
            model, result, rounds = project_calibrated(model, meta.input, stats, config,
                                                       stats_path or "the statistics", profile=timing, rounds=calibrate)
            for i, r in enumerate(rounds):
                report.log(f"calibration round {i}: budget {r.budget:.3f}, predicted {r.predicted:.3f}, measured "
                           f"{r.measured:.3f} ({r.measured_q25:.3f}-{r.measured_q75:.3f})")
        else:
            with report.progress() as bar:
                result = project_model(model, meta.input, stats, config, where=stats_path or "the statistics",
                                       profile=timing, dataset=dataset, ctx=ctx, progress=bar)
        if not ctx.primary:
            return
        if structure == "pair" and result.budget and result.budget["note"]:
            report.warn(result.budget["note"])
        if structure == "pair" and not result.edits:
            report.warn("no layer changed: at these ranks no pair would save MACs")
        history = {**result.history(), "stats": None if stats_path is None else file_digest(stats_path)[:16],
                   **({} if profile_path is None else {"profile": file_digest(profile_path)[:16]}),
                   **({"calibrate": calibrate, "measured": rounds[-1].measured} if rounds else {}),
                   **({} if data is None else {"data": data, "samples": len(dataset)})}
        save(model.cpu(), meta.with_edits(*result.edits).with_history("project", **history), output)
        summary = {"output": output, **result.to_dict(),
                   **({"calibration": [asdict(r) for r in rounds]} if rounds else {})}
        tables = {"channels": channel_table, "auto": auto_table}
        report.result(summary, tables[structure](summary) if structure in tables else
                      _table(summary["layers"], summary["totals"], summary["budget"]))
    finally:
        dist.teardown(ctx)


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
