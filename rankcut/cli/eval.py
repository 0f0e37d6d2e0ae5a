"""``rankcut eval``: accuracy, cross-entropy, size, cost and latency of checkpoints, optionally against a reference."""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich.table import Table
from torch import nn

from rankcut import dist
from rankcut.api import EvalConfig, evaluate
from rankcut.cli.console import Reporter
from rankcut.cli.options import BatchSize, Data, Device, Json, LatencySeconds, Quiet, Samples, Seed, Workers
from rankcut.files.checkpoint import load_with_meta
from rankcut.run.data import open_data, subset
from rankcut.run.evaluate import check_dataset_labels, check_peer, output_classes
from rankcut.run.latency import RUNTIMES


def _fmt(value, kind: str) -> str:
    if value is None:
        return "-"
    return {"pct": f"{100 * value:.2f}%", "num": f"{value:,}", "loss": f"{value:.4f}", "ms": f"{value:.3f}",
            "x": f"{value:.3f}x"}[kind]


def _latency_ratio(lat: dict) -> str:
    """The median per-round latency ratio with its 25-75% quantiles."""
    return f"{lat['ratio']:.3f}x ({lat['ratio_q25']:.3f}-{lat['ratio_q75']:.3f}; CPU time {lat['cpu_ratio']:.3f}x)"


def _latency_label(lat: dict) -> str:
    return f"ms / batch of {lat['batch_size']} ({lat['runtime']}, {lat['threads']} threads)"


def _load_all(checkpoints: list[str], reference: str | None, device) -> tuple[list[nn.Module], nn.Module | None, object, int]:
    """Load every checkpoint (and the reference); they must take the same input and score the same classes."""
    models, metas = zip(*(load_with_meta(c, device) for c in checkpoints))
    first, meta = checkpoints[0], metas[0]
    classes = output_classes(models[0], meta.input)
    for path, m, other in zip(checkpoints[1:], models[1:], metas[1:]):
        check_peer(m, other.input, path, meta.input, classes, first)
    ref_model = None
    if reference is not None:
        ref_model, ref_meta = load_with_meta(reference, device)
        check_peer(ref_model, ref_meta.input, f"the reference {reference}", meta.input, classes, first)
    return list(models), ref_model, meta, classes


def evaluate_command(
    checkpoints: Annotated[list[str], typer.Argument(help="One or more rankcut checkpoints (.safetensors); several are compared in one table.", show_default=False)],
    data: Data,
    reference: Annotated[Optional[str], typer.Option("--reference", "-r", help="Compare with this checkpoint (e.g. the uncompressed base).")] = None,
    latency: Annotated[bool, typer.Option("--latency", help=(
        "Also time inference at --batch-size on --device: models take turns in short rounds, each running its "
        "passes back to back; the ratio to the reference (else the first) is the median of pairwise ratios, with "
        "their 25-75% quantiles, and the same in CPU time (robust to other load with --threads 1)."))] = False,
    threads: Annotated[Optional[int], typer.Option("--threads", help="CPU threads while timing (default: as now).")] = None,
    runtime: Annotated[str, typer.Option("--runtime", help=f"Runtime to time with --latency: {', '.join(RUNTIMES)}.")] = "torch",
    seconds: LatencySeconds = EvalConfig.seconds,
    samples: Samples = None,
    batch_size: BatchSize = 64,
    workers: Workers = 0,
    device: Device = "auto",
    seed: Seed = 0,
    json_out: Json = False,
    quiet: Quiet = False,
) -> None:
    """Evaluate checkpoints: top-1/top-5, cross-entropy, parameters, MACs, latency; agreement with a reference.

    Several checkpoints (same input, same classes) are evaluated in one pass over the data and shown as one
    table, a row each; with --json the object is {"version": 1, ..., "results": [...]} however many there
    are, each entry what that checkpoint alone gives ("topk": top-k accuracy, k in "k"). Latencies of
    several models are timed in alternating rounds.
    """
    config = EvalConfig(batch_size=batch_size, workers=workers, latency=latency, threads=threads, runtime=runtime,
                        seconds=seconds)
    ctx = dist.setup(device)
    try:
        report = Reporter(quiet, json_out, primary=ctx.primary)
        models, ref_model, meta, classes = _load_all(checkpoints, reference, ctx.device)
        dataset = subset(open_data(data, meta.input, train=False, num_classes=classes, seed=seed,
                                   classes=meta.classes), samples, seed)
        check_dataset_labels(dataset, classes, False, f"the data {data}")
        with report.progress() as progress:
            figures = evaluate(models, meta.input, dataset, classes, config, reference=ref_model, ctx=ctx,
                               progress=progress)
    finally:
        dist.teardown(ctx)
    results = [{"checkpoint": path, "data": data, "device": str(ctx.device), "classes": classes, **r}
               for path, r in zip(checkpoints, figures)]
    for r in results:
        if reference is not None:
            r["reference"]["checkpoint"] = reference
        if r["nonfinite"]:
            report.warn(f"{r['checkpoint']}{' or the reference' if reference else ''} gave NaN or Inf outputs for "
                        f"{r['nonfinite']:,} of {r['samples']:,} samples (counted as wrong; the loss is not meaningful)")
    first = results[0]  # one JSON shape for one checkpoint or several
    report.result({"data": data, "device": first["device"], "classes": classes, "samples": first["samples"],
                   "labeled": first["labeled"], "k": first["k"], "reference": first.get("reference"),
                   "results": results}, _table(first) if len(results) == 1 else _comparison(results))


def _table(r: dict) -> Table:
    ref, ratios = r.get("reference"), r.get("ratios", {})
    table = Table("", r["checkpoint"], *([ref["checkpoint"], "ratio"] if ref else []),
                  title=f"{r['data']}: {r['samples']:,} samples ({r['labeled']:,} labelled), {r['classes']} classes",
                  title_justify="left")
    rows = [("top-1", "top1", "pct"), (f"top-{r['k']}", "topk", "pct"), ("cross-entropy", "loss", "loss"),
            ("params", "params", "num"), ("MACs", "macs", "num")]
    for label, key, kind in rows:
        cells = [_fmt(r[key], kind)]
        if ref:
            cells += [_fmt(ref[key], kind), _fmt(ratios.get(key), "x")]
        table.add_row(label, *cells)
    if "latency" in r:
        for label, key in ((_latency_label(r["latency"]), "batch_ms"), ("ms / image", "image_ms")):
            cells = [_fmt(r["latency"][key], "ms")]
            if ref:
                cells += [_fmt(ref["latency"][key], "ms"), _latency_ratio(r["latency"])]
            table.add_row(label, *cells)
    if ref:
        table.add_row("top-1 agreement", _fmt(r["agreement"], "pct"), "", "")
        table.add_row("KL(reference || model)", _fmt(r["kl"], "loss"), "", "")
    return table


def _comparison(results: list[dict]) -> Table:
    """One row per checkpoint (the reference first, when there is one)."""
    first = results[0]
    ref, timed = first.get("reference"), "latency" in first
    columns = ["checkpoint", "top-1", f"top-{first['k']}", "cross-entropy", "params", "MACs"]
    if timed:
        columns.append(_latency_label(first["latency"]))
    if ref:
        columns += ["top-1 agreement", "KL(ref || model)"]
    table = Table(*columns, title=f"{first['data']}: {first['samples']:,} samples ({first['labeled']:,} labelled), "
                  f"{first['classes']} classes, on {first['device']}", title_justify="left")
    table.columns[0].no_wrap = True
    for column in table.columns[1:]:
        column.justify = "right"

    def row(name: str, r: dict, ratios: dict | None) -> list[str]:
        def with_ratio(text: str, key: str) -> str:
            return f"{text} ({_fmt(ratios[key], 'x')})" if ratios and key in ratios else text

        cells = [name, _fmt(r["top1"], "pct"), _fmt(r["topk"], "pct"), _fmt(r["loss"], "loss"),
                 with_ratio(_fmt(r["params"], "num"), "params"), with_ratio(_fmt(r["macs"], "num"), "macs")]
        if timed:
            lat = r["latency"]
            cells.append(f"{_fmt(lat['batch_ms'], 'ms')} ({_latency_ratio(lat)})" if ratios else _fmt(lat["batch_ms"], "ms"))
        return cells

    if ref:
        table.add_row(*row(f"{ref['checkpoint']} (ref)", ref, None), "", "")
        table.add_section()
    for r in results:
        extra = [_fmt(r["agreement"], "pct"), _fmt(r["kl"], "loss")] if ref else []
        table.add_row(*row(r["checkpoint"], r, r.get("ratios")), *extra)
    return table
