"""``rankcut sweep``: the accuracy/cost frontier over methods x structures x budgets, with a cache and a plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from rankcut import dist
from rankcut.api import EvalConfig, SweepConfig, sweep as run_sweep
from rankcut.cli.console import JSON_VERSION, Reporter
from rankcut.cli.options import (BatchSize, Checkpoint, Data, Device, Exclude, Force, Json, Layers, Output, Quiet,
                                 Samples, Seed, Workers)
from rankcut.errors import RankcutError
from rankcut.files.checkpoint import load_with_meta, save
from rankcut.files.fileio import atomic_write, check_output, file_digest
from rankcut.files.statsfile import check_digest, load_stats
from rankcut.run.data import open_data, subset
from rankcut.run.evaluate import output_classes
from rankcut.run.frontier import KINDS, label, point_key, summarize

Fractions = Annotated[Optional[str], typer.Option(show_default=False)]


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


def _fingerprint(checkpoint: str, stats_path: str | None, data: str, samples: int | None, config: SweepConfig,
                 device: str) -> dict:
    """What the points depend on besides their key: a cached point is reused only when all of it matches."""
    data_file = Path(data).is_file()
    return {"checkpoint": file_digest(checkpoint), "stats": None if stats_path is None else file_digest(stats_path),
            "data": data, "data_sha256": file_digest(data) if data_file else None, "samples": samples,
            "seed": config.seed, "damping": config.damping, "layers": config.layers and list(config.layers),
            "exclude": config.exclude and list(config.exclude), "batch_size": config.eval.batch_size,
            "device": device, **({"per_layer": True} if config.per_layer else {})}


def _previous(output: str, fingerprint: dict, keep_dir: str | None, report: Reporter) -> dict | None:
    """The cache: the points of an earlier sweep written to ``output`` from the same inputs."""
    path = Path(output)
    if not path.is_file():
        return None
    try:
        old = json.loads(path.read_text())
        same = old.get("inputs") == fingerprint
        points, original = old["points"], old["original"]
    except (ValueError, KeyError, TypeError, AttributeError):
        report.warn(f"{output} is not a sweep result; it is recomputed and replaced")
        return None
    if not same:
        changed = [k for k in fingerprint if old.get("inputs", {}).get(k) != fingerprint[k]]
        report.warn(f"{output} was made from other inputs ({', '.join(changed)} differ); its points are not reused")
        return None
    if keep_dir is not None:  # a point whose checkpoint is not in --keep-dir is made again, to keep it
        points = [p for p in points if (Path(keep_dir) / _kept_name(p)).is_file()]
    return {"points": points, "original": original}


def _kept_name(point: dict) -> str:
    layer = f"-{point['layer']}" if point.get("layer") else ""
    return f"{label(point).replace('/', '-')}{layer}-{point['kind']}{point['fraction']:g}.safetensors"


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
    within: Annotated[float, typer.Option("--within", help=(
        "Recommend the cheapest point (in MACs) whose top-1 is at most this many percentage points below the "
        "original's."))] = 1.0,
    plot: Annotated[Optional[str], typer.Option("--plot", help=(
        "Also draw the frontier (top-1 vs MACs, a line per structure/method) to this .png or .svg (needs "
        "matplotlib: pip install 'rankcut[plot]')."), show_default=False)] = None,
    keep_dir: Annotated[Optional[str], typer.Option("--keep-dir", help=(
        "Keep every point's checkpoint in this folder (e.g. pair-fisher-macs0.5.safetensors), as project writes it."),
        show_default=False)] = None,
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

    Every point is what `rankcut project` with that method, structure and budget, then `rankcut eval --reference
    CHECKPOINT`, give (one pass over --data per point). The result is written to -o as JSON and shown as a
    table: points on the Pareto frontier of top-1 against MACs are marked, and the cheapest point within
    --within top-1 points of the original is recommended. -o is also the cache: rerun with more budgets or
    methods and only the new points are computed (when the checkpoint, statistics, data and options match).

    --per-layer measures each layer's sensitivity instead: every selected layer alone at each --keep fraction
    (as `rankcut project --layers L --keep F` would), the layers sorted by their largest top-1 drop.
    """
    report = Reporter(quiet, json_out)
    budgets = tuple((kind, f) for kind, text in zip(KINDS, (keep, macs, params)) for f in _fractions(text, f"--{kind}"))
    config = SweepConfig(methods=_names(methods, "--methods"), structures=_names(structures, "--structures"),
                         budgets=budgets, within=within, damping=damping, seed=seed,
                         layers=tuple(layers) if layers else None, exclude=tuple(exclude) if exclude else None,
                         eval=EvalConfig(batch_size=batch_size, workers=workers), per_layer=per_layer)
    inputs = [checkpoint, stats_path, data]
    check_output(output, inputs, force)
    if plot is not None and per_layer:
        raise RankcutError("--plot draws the frontier; a --per-layer sweep is shown as a table (and -o's JSON)")
    if plot is not None:
        from rankcut.cli.plots import check_plot

        check_plot(plot, inputs + [output], force)
    if keep_dir is not None:
        if Path(keep_dir).exists() and not Path(keep_dir).is_dir():
            raise RankcutError(f"--keep-dir {keep_dir} is not a folder")
        if not Path(keep_dir).parent.is_dir():
            raise RankcutError(f"--keep-dir: folder does not exist: {Path(keep_dir).parent}")
    ctx = dist.setup(device)
    if ctx.distributed:
        dist.teardown(ctx)
        raise RankcutError("rankcut sweep runs as one process; start it without torchrun")
    model, meta = load_with_meta(checkpoint)
    stats = None
    if stats_path is not None:
        stats = load_stats(stats_path)
        check_digest(stats, checkpoint, stats_path)
    classes = output_classes(model, meta.input)
    dataset = subset(open_data(data, meta.input, train=False, num_classes=classes, seed=seed, classes=meta.classes),
                     samples, seed)
    fingerprint = _fingerprint(checkpoint, stats_path, data, samples, config, ctx.device.type)
    known = _previous(output, fingerprint, keep_dir, report)
    if keep_dir is not None:
        Path(keep_dir).mkdir(exist_ok=True)
    history_stats = None if stats_path is None else file_digest(stats_path)[:16]
    head = {"checkpoint": checkpoint, "stats": stats_path, "data": data, "inputs": fingerprint}

    def write(result: dict) -> None:
        text = json.dumps({"version": JSON_VERSION, **head, **result}, indent=1)
        atomic_write(output, lambda tmp: Path(tmp).write_text(text + "\n"))

    cache = {point_key(p): p for p in (known or {}).get("points", [])}

    def keep_and_cache(point: dict, projected, result, original: dict) -> None:
        """After each new point: keep its checkpoint if asked, and write the cache (an interrupted sweep keeps it)."""
        if keep_dir is not None:
            path = Path(keep_dir) / _kept_name(point)
            history = {**result.history(), "stats": history_stats}
            save(projected.cpu(), meta.with_edits(*result.edits).with_history("project", **history), path)
            point["checkpoint"] = str(path)
        cache[point_key(point)] = point
        write({**summarize(original, list(cache.values()), config.within, config.per_layer), "complete": False})

    with report.progress() as progress:
        result = run_sweep(model, meta.input, stats, dataset, classes, config, known=known,
                           where=stats_path or "the statistics", ctx=ctx, progress=progress, on_point=keep_and_cache)
    for p in result["points"]:
        if keep_dir is None:
            p.pop("checkpoint", None)  # a path kept by an earlier run is not this run's output
        else:
            p["checkpoint"] = str(Path(keep_dir) / _kept_name(p))
    result["plot"], result["complete"] = plot, True
    write(result)
    if plot is not None:
        from rankcut.cli.plots import frontier_plot

        frontier_plot(result, plot, title=f"{Path(checkpoint).name} on {data}")
    if per_layer:
        report.result({**head, **result}, _sensitivity_table(result), _most_sensitive(result))
    else:
        report.result({**head, **result}, _table(result), _recommendation(result))


def _recommendation(result: dict) -> str:
    best = result["recommendation"]
    if best is None:
        return f"no point is within {result['within']:g} top-1 points of the original"
    change = 100 * (best["top1"] - result["original"]["top1"]) + 0.0  # + 0.0: no "-0.00"
    return (f"recommended: {label(best)} {best['kind']} {best['fraction']:g}: MACs x{best['ratios']['macs']:.3f}, "
            f"params x{best['ratios']['params']:.3f}, top-1 {100 * best['top1']:.2f}% ({change:+.2f} points; the "
            f"cheapest within {result['within']:g} of the original)")


def _table(result: dict) -> Table:
    original = result["original"]
    caption = (f"original: top-1 {100 * original['top1']:.2f}%, {original['macs']:,} MACs, {original['params']:,} "
               f"params, {original['samples']:,} samples; * Pareto-optimal (top-1 vs MACs); {result['computed']} "
               f"point(s) computed, {result['reused']} reused")
    table = Table("structure/method", "budget", "MACs", "params", "top-1", "vs original", "agreement", "KL", "pareto",
                  title="sweep", title_justify="left", caption=caption, caption_justify="left")
    for column in table.columns[2:]:
        column.justify = "right"
    for p in sorted(result["points"], key=lambda p: (label(p), -p["ratios"]["macs"])):
        table.add_row(label(p), f"{p['kind']} {p['fraction']:g}", f"x{p['ratios']['macs']:.3f}",
                      f"x{p['ratios']['params']:.3f}", f"{100 * p['top1']:.2f}%",
                      f"{100 * (p['top1'] - original['top1']):+.2f}", f"{100 * p['agreement']:.2f}%", f"{p['kl']:.4f}",
                      "*" if p["pareto"] else "")
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
