"""``rankcut sweep``: the accuracy/cost frontier over methods x structures x budgets, with a cache and a plot."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from rankcut import dist
from rankcut.api import COSTS, EvalConfig, SweepConfig, sweep as run_sweep
from rankcut.cli.console import JSON_VERSION, Reporter
from rankcut.cli.options import (BatchSize, Checkpoint, Data, Device, Exclude, Force, Json, Layers, Output, Quiet,
                                 LatencySeconds, Samples, Seed, Workers)
from rankcut.errors import RankcutError
from rankcut.files.checkpoint import load_with_meta
from rankcut.files.fileio import check_output
from rankcut.files.profilefile import check_profile, load_profile
from rankcut.files.statsfile import check_digest, load_stats
from rankcut.run.data import open_data, subset
from rankcut.run.evaluate import output_classes
from rankcut.run.frontier import KINDS, label
from rankcut.run.sweepcache import SweepCache, check_keep_dir, file_inputs

COST_NAMES = {"macs": "MACs", "latency": "measured latency"}


def _names(text: str, flag: str) -> tuple[str, ...]:
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    if not names:
        raise RankcutError(f"{flag} names nothing")
    return names


def _fractions(text: str | None, flag: str) -> list[float]:
    if text is None:
        return []
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise RankcutError(f"{flag} takes comma-separated fractions, e.g. {flag} 0.5,0.25; got {text!r}") from None


def sweep(
    checkpoint: Checkpoint,
    data: Data,
    output: Output,
    stats_path: Annotated[Optional[str], typer.Option("--stats", "-s", help=(
        "Statistics of CHECKPOINT from rankcut stats (--grad kl for hessian/fisher; --structure channels for "
        "--structures channels)."))] = None,
    methods: Annotated[str, typer.Option("--methods", help="Comma-separated methods for rank-k pairs (pca, fisher, ...).")] = "pca",
    structures: Annotated[str, typer.Option("--structures", help="Comma-separated structures: pair, channels.")] = "pair",
    keep: Annotated[Optional[str], typer.Option("--keep", help="Comma-separated --keep fractions to sweep.", show_default=False)] = None,
    macs: Annotated[Optional[str], typer.Option("--macs", help="Comma-separated MACs budgets to sweep, e.g. 0.5,0.25.", show_default=False)] = None,
    params: Annotated[Optional[str], typer.Option("--params", help="Comma-separated parameter budgets to sweep.", show_default=False)] = None,
    latency: Annotated[Optional[str], typer.Option("--latency", help=(
        "Comma-separated latency budgets (fractions of the whole model's latency in --profile): pairs and "
        "channels (with a profile that timed the chains)."), show_default=False)] = None,
    profile_path: Annotated[Optional[str], typer.Option("--profile", help=(
        "A latency profile of CHECKPOINT (rankcut profile): every pair point is projected with it, as project "
        "--profile does (no layer becomes a pair it measured as no faster); --latency needs it."),
        show_default=False)] = None,
    measure_latency: Annotated[bool, typer.Option("--measure-latency", help=(
        "Time every point against CHECKPOINT at --batch-size, as eval --latency --reference does (alternating "
        "passes, median of pairwise ratios): a latency column, and a second frontier plot."))] = False,
    threads: Annotated[Optional[int], typer.Option("--threads", help=(
        "CPU threads while timing (--measure-latency; default: as now)."), show_default=False)] = None,
    seconds: LatencySeconds = EvalConfig.seconds,
    cost: Annotated[str, typer.Option("--cost", help=(
        f"What the Pareto marks and the recommendation count as cost: {' or '.join(COSTS)} (the measured ratio; "
        "needs --measure-latency)."))] = "macs",
    refit: Annotated[bool, typer.Option("--refit", help=(
        "Refit every point after project (rankcut refit against CHECKPOINT, on --train-data)."))] = False,
    refit_samples: Annotated[Optional[int], typer.Option("--refit-samples", help=(
        "Samples of --train-data to refit on (default: all)."), show_default=False)] = None,
    finetune_epochs: Annotated[int, typer.Option("--finetune-epochs", help=(
        "Fine-tune every point (after --refit, if given) for this many epochs on --train-data, with finetune's "
        "defaults and --batch-size, --seed."))] = 0,
    train_data: Annotated[Optional[str], typer.Option("--train-data", help=(
        "Data to refit and fine-tune on (as --data; never the evaluation data)."), show_default=False)] = None,
    within: Annotated[float, typer.Option("--within", help=(
        "Recommend the cheapest point (in --cost) whose top-1 is at most this many percentage points below the "
        "original's."))] = 1.0,
    plot: Annotated[Optional[str], typer.Option("--plot", help=(
        "Also draw the frontier (top-1 vs MACs, and vs measured latency with --measure-latency; a line per "
        "structure/method) to this .png, .svg or .html (one self-contained page: the frontier and the table) "
        "(needs matplotlib: pip install 'rankcut[plot]')."), show_default=False)] = None,
    keep_dir: Annotated[Optional[str], typer.Option("--keep-dir", help=(
        "Keep every point's checkpoint in this folder (e.g. pair-fisher-macs0.5.safetensors), as project (then "
        "refit, finetune) writes it."), show_default=False)] = None,
    per_layer: Annotated[bool, typer.Option("--per-layer", help=(
        "Per-layer sensitivity instead of the frontier: each layer alone at each --keep fraction (default "
        "0.75,0.5,0.25), all others whole; the table is sorted by the top-1 drop, largest first."))] = False,
    damping: Annotated[Optional[float], typer.Option("--damping", help="fisher: damping of G (default 1e-3).")] = None,
    layers: Layers = None,
    exclude: Exclude = None,
    samples: Samples = None,
    batch_size: BatchSize = 64,
    workers: Workers = 0,
    device: Device = "auto",
    seed: Seed = 0,
    force: Force = False,
    json_out: Json = False,
    quiet: Quiet = False,
) -> None:
    """Sweep methods x structures x budgets: project each, evaluate it against CHECKPOINT, mark the frontier.

    Every point is what `rankcut project` with that method, structure and budget (then `rankcut refit`,
    `rankcut finetune` if asked), then `rankcut eval --reference CHECKPOINT`, give (one pass over --data per
    point). The result is written to -o as JSON and shown as a table: points on the Pareto frontier of top-1
    against --cost are marked, and the cheapest point within --within top-1 points of the original is
    recommended. -o is also the cache: rerun with more budgets or methods and only the new points are computed
    (when the checkpoint, statistics, profile, data and options match).

    --per-layer measures each layer's sensitivity instead: every selected layer alone at each --keep fraction
    (as `rankcut project --layers L --keep F` would), the layers sorted by their largest top-1 drop.
    """
    report = Reporter(quiet, json_out)
    texts = (keep, macs, params, latency)
    budgets = tuple((kind, f) for kind, text in zip(KINDS, texts) for f in _fractions(text, f"--{kind}"))
    config = SweepConfig(methods=_names(methods, "--methods"), structures=_names(structures, "--structures"),
                         budgets=budgets, within=within, damping=damping, seed=seed,
                         layers=tuple(layers) if layers else None, exclude=tuple(exclude) if exclude else None,
                         eval=EvalConfig(batch_size=batch_size, workers=workers, latency=measure_latency,
                                         threads=threads, seconds=seconds),
                         per_layer=per_layer, refit=refit, refit_samples=refit_samples,
                         finetune_epochs=finetune_epochs, cost=cost)
    inputs = [checkpoint, stats_path, data, profile_path, train_data]
    check_output(output, inputs, force)
    if not measure_latency and (threads is not None or seconds != EvalConfig.seconds):
        raise RankcutError("--threads and --seconds set --measure-latency's timing; add --measure-latency")
    if latency is not None and profile_path is None:
        raise RankcutError(f"--latency needs --profile P.json (make one with: rankcut profile {checkpoint} -o P.json)")
    if config.trains and train_data is None:
        raise RankcutError("--refit and --finetune-epochs need --train-data T (the data to refit and train on; "
                           "never the evaluation data)")
    if plot is not None and per_layer:
        raise RankcutError("--plot draws the frontier; a --per-layer sweep is shown as a table (and -o's JSON)")
    if plot is not None:
        from rankcut.cli.plots import check_plot

        check_plot(plot, inputs + [output], force, html=True)
    check_keep_dir(keep_dir)
    ctx = dist.setup(device)
    if ctx.distributed:
        dist.teardown(ctx)
        raise RankcutError("rankcut sweep runs as one process; start it without torchrun")
    model, meta = load_with_meta(checkpoint)
    stats = timing = None
    if stats_path is not None:
        stats = load_stats(stats_path)
        check_digest(stats, checkpoint, stats_path)
    if profile_path is not None:
        timing = load_profile(profile_path)
        check_profile(timing, checkpoint, profile_path)
    classes = output_classes(model, meta.input)
    dataset = subset(open_data(data, meta.input, train=False, num_classes=classes, seed=seed, classes=meta.classes),
                     samples, seed)

    def training_data(train: bool, wanted: bool):
        """--train-data as finetune (train=True: training transforms) or refit (evaluation transforms) opens it."""
        return open_data(train_data, meta.input, train=train, num_classes=classes, seed=seed,
                         classes=meta.classes) if wanted else None

    train_set, refit_set = training_data(True, config.finetune_epochs > 0), training_data(False, config.refit)
    head = {"version": JSON_VERSION, "checkpoint": checkpoint, "stats": stats_path, "data": data,
            **({"profile": profile_path} if profile_path else {}), **({"train_data": train_data} if train_data else {}),
            "plot": plot}
    cache = SweepCache(output, file_inputs(checkpoint, stats_path, data, samples, profile=profile_path,
                                           train_data=train_data if config.trains else None),
                       keep_dir=keep_dir, meta=meta, head=head)
    with report.progress() as progress:
        result = run_sweep(model, meta.input, stats, dataset, classes, config, train_set=train_set,
                           refit_set=refit_set, profile=timing, cache=cache, where=stats_path or "the statistics",
                           ctx=ctx, progress=progress)
    if plot is not None:
        from rankcut.cli.plots import frontier_plot

        frontier_plot(result, plot, title=f"{Path(checkpoint).name} on {data}", table=(*point_rows(result),
                                                                                   caption(result)))
    if per_layer:
        report.result({**head, **result}, _sensitivity_table(result), _most_sensitive(result))
    else:
        report.result({**head, **result}, _table(result), _recommendation(result))


def _recommendation(result: dict) -> str:
    best = result["recommendation"]
    if best is None:
        return f"no point is within {result['within']:g} top-1 points of the original"
    change = 100 * (best["top1"] - result["original"]["top1"]) + 0.0  # + 0.0: no "-0.00"
    timed = f", latency x{best['ratios']['latency']:.3f}" if "latency" in best["ratios"] else ""
    return (f"recommended: {label(best)} {best['kind']} {best['fraction']:g}: MACs x{best['ratios']['macs']:.3f}, "
            f"params x{best['ratios']['params']:.3f}{timed}, top-1 {100 * best['top1']:.2f}% ({change:+.2f} points; "
            f"the cheapest in {COST_NAMES[result.get('cost', 'macs')]} within {result['within']:g} of the original)")


def point_rows(result: dict) -> tuple[list[str], list[list[str]], list[bool]]:
    """The frontier table (header, rows of text, whether each row is Pareto-optimal), cheapest last per line:
    the terminal's table and the HTML page's. Columns for refit, fine-tuning and latency appear when swept."""
    original, points = result["original"], result["points"]
    timed = any("latency" in p["ratios"] for p in points)
    steps = [s for s in ("refit", "finetune") if any(s in p for p in points)]
    before = {"refit": "top-1 projected", "finetune": "top-1 refitted" if "refit" in steps else "top-1 projected"}
    header = ["structure/method", "budget", "MACs", "params", *(["latency"] if timed else []),
              *(before[s] for s in steps), "top-1", "vs original", "agreement", "KL", "pareto"]
    rows, marks = [], []
    cost = result.get("cost", "macs")
    for p in sorted(points, key=lambda p: (label(p), -p["ratios"][cost])):
        rows.append([label(p), f"{p['kind']} {p['fraction']:g}", f"x{p['ratios']['macs']:.3f}",
                     f"x{p['ratios']['params']:.3f}", *([f"x{p['ratios']['latency']:.3f}"] if timed else []),
                     *(f"{100 * p[s]['top1_before']:.2f}%" for s in steps), f"{100 * p['top1']:.2f}%",
                     f"{100 * (p['top1'] - original['top1']):+.2f}", f"{100 * p['agreement']:.2f}%", f"{p['kl']:.4f}",
                     "*" if p["pareto"] else ""])
        marks.append(p["pareto"])
    return header, rows, marks


def caption(result: dict) -> str:
    """The line under the frontier table: the original's figures, what the marks mean, what was computed."""
    original = result["original"]
    cost = COST_NAMES[result.get("cost", "macs")]
    return (f"original: top-1 {100 * original['top1']:.2f}%, {original['macs']:,} MACs, {original['params']:,} "
            f"params, {original['samples']:,} samples; * Pareto-optimal (top-1 vs {cost}); {result['computed']} "
            f"point(s) computed, {result['reused']} reused")


def _table(result: dict) -> Table:
    header, rows, _ = point_rows(result)
    table = Table(*header, title="sweep", title_justify="left", caption=caption(result), caption_justify="left")
    for column in table.columns[2:]:
        column.justify = "right"
    for row in rows:
        table.add_row(*row)
    return table


def _most_sensitive(result: dict) -> str:
    layers = result["layers"]
    if not layers:
        return "no layer was swept"
    first, last = layers[0], layers[-1]
    return (f"most sensitive: {first['layer']} ({first['label']}, top-1 {-100 * first['drop'] + 0.0:+.2f} points at "
            f"worst); least: {last['layer']} ({last['label']}, {-100 * last['drop'] + 0.0:+.2f})")


def _sensitivity_table(result: dict) -> Table:
    original = result["original"]
    caption = (f"original: top-1 {100 * original['top1']:.2f}%, {original['macs']:,} MACs, {original['samples']:,} "
               f"samples; each layer alone, all others whole; sorted by the largest top-1 drop; "
               f"{result['computed']} point(s) computed, {result['reused']} reused")
    table = Table("layer", "structure/method", "keep", "rank / width", "MACs", "top-1", "vs original", "agreement",
                  "KL", title="per-layer sensitivity", title_justify="left", caption=caption, caption_justify="left")
    for column in table.columns[3:]:
        column.justify = "right"
    previous = None
    for p in result["points"]:
        group = (label(p), p["layer"])
        if previous is not None and group != previous:
            table.add_section()
        previous = group
        table.add_row(p["layer"], label(p), f"{p['fraction']:g}", f"{p['before']} -> {p['after']}",
                      f"x{p['ratios']['macs']:.3f}", f"{100 * p['top1']:.2f}%", f"{100 * p['change'] + 0.0:+.2f}",
                      f"{100 * p['agreement']:.2f}%", f"{p['kl']:.4f}")
    return table
