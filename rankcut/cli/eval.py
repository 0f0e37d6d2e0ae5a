"""``rankcut eval``: accuracy, cross-entropy, size, cost and latency of checkpoints, optionally against a reference."""

from __future__ import annotations

import statistics
from typing import Annotated, Optional

import typer
from rich.table import Table
from torch import nn

from rankcut import dist
from rankcut.model.archs import InputContract
from rankcut.files.checkpoint import load_with_meta
from rankcut.cli.console import Reporter
from rankcut.run.data import open_data, subset
from rankcut.errors import RankcutError
from rankcut.run.evaluate import check_dataset_labels, evaluate_many, output_classes
from rankcut.run.latency import measure_latency
from rankcut.model.cost import count_macs, count_params
from rankcut.cli.options import BatchSize, Data, Device, Json, Quiet, Samples, Seed, Workers


def _cost(model: nn.Module, contract: InputContract) -> dict:
    return {"params": count_params(model), "macs": count_macs(model, contract)[0]}


def _latencies(models: list[nn.Module], contract: InputContract, batch_size: int, device, rounds: int = 5) -> list[dict]:
    """Each model's latency; several are timed in alternating rounds, so load from other processes hits all alike."""
    rounds = rounds if len(models) > 1 else 1
    runs: list[list[dict]] = [[] for _ in models]
    for i in range(rounds):
        for model, out in zip(models, runs):
            out.append(measure_latency(model, contract, batch_size, device, warmup=3 if i == 0 else 1,
                                       min_repeats=5 if rounds == 1 else 1, min_seconds=1.0 / rounds))
    figures = []
    for out in runs:
        batch_ms = statistics.median(r["batch_ms"] for r in out)
        figures.append({"batch_size": batch_size, "batch_ms": batch_ms, "image_ms": batch_ms / batch_size,
                        "repeats": sum(r["repeats"] for r in out)})
    return figures


def _fmt(value, kind: str) -> str:
    if value is None:
        return "-"
    return {"pct": f"{100 * value:.2f}%", "num": f"{value:,}", "loss": f"{value:.4f}", "ms": f"{value:.3f}",
            "x": f"{value:.3f}x"}[kind]


def _load_all(checkpoints: list[str], reference: str | None, device) -> tuple[list[nn.Module], nn.Module | None, object, int]:
    """Load every checkpoint (and the reference); they must take the same input and score the same classes."""
    models, metas = zip(*(load_with_meta(c, device) for c in checkpoints))
    first, meta = checkpoints[0], metas[0]
    classes = output_classes(models[0], meta.input)
    for path, m, other in zip(checkpoints[1:], models[1:], metas[1:]):
        if other.input != meta.input:
            raise RankcutError(f"{path} expects input {other.input.to_dict()}, {first} {meta.input.to_dict()}; "
                               "compare checkpoints with the same input, or evaluate them separately")
        if output_classes(m, meta.input) != classes:
            raise RankcutError(f"{path} and {first} score different numbers of classes")
    ref_model = None
    if reference is not None:
        ref_model, ref_meta = load_with_meta(reference, device)
        if ref_meta.input != meta.input:
            raise RankcutError(f"the reference {reference} expects input {ref_meta.input.to_dict()}, "
                               f"{first} {meta.input.to_dict()}")
        if output_classes(ref_model, meta.input) != classes:
            raise RankcutError(f"the reference {reference} and {first} score different numbers of classes")
    return list(models), ref_model, meta, classes


def evaluate(
    checkpoints: Annotated[list[str], typer.Argument(help="One or more rankcut checkpoints (.safetensors); several are compared in one table.", show_default=False)],
    data: Data,
    reference: Annotated[Optional[str], typer.Option("--reference", "-r", help="Compare with this checkpoint (e.g. the uncompressed base).")] = None,
    latency: Annotated[bool, typer.Option("--latency", help="Also time inference at --batch-size on --device (median after warm-up).")] = False,
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
    ctx = dist.setup(device)
    try:
        report = Reporter(quiet, json_out, primary=ctx.primary)
        models, ref_model, meta, classes = _load_all(checkpoints, reference, ctx.device)
        dataset = subset(open_data(data, meta.input, train=False, num_classes=classes, seed=seed,
                                   classes=meta.classes), samples, seed)
        check_dataset_labels(dataset, classes, False, f"the data {data}")
        with report.progress() as progress:
            figures = evaluate_many(models, dataset, classes, device=ctx.device, batch_size=batch_size,
                                    workers=workers, reference=ref_model, ctx=ctx, progress=progress)
        timed = models + ([ref_model] if ref_model is not None else [])
        costs = [_cost(m, meta.input) for m in timed]
        if latency and ctx.primary:
            for cost, lat in zip(costs, _latencies(timed, meta.input, batch_size, ctx.device)):
                cost["latency"] = lat
        results = []
        for path, result, cost in zip(checkpoints, figures, costs):
            result = {"checkpoint": path, "data": data, "device": str(ctx.device), "classes": classes, **result, **cost}
            if ref_model is not None:
                ref = result["reference"] = {**result["reference"], "checkpoint": reference, **costs[-1]}
                result["ratios"] = {"macs": result["macs"] / ref["macs"], "params": result["params"] / ref["params"]}
                if "latency" in ref:
                    result["ratios"]["latency"] = result["latency"]["batch_ms"] / ref["latency"]["batch_ms"]
            results.append(result)
    finally:
        dist.teardown(ctx)
    for r in results:
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
        for label, key in ((f"ms / batch of {r['latency']['batch_size']}", "batch_ms"), ("ms / image", "image_ms")):
            cells = [_fmt(r["latency"][key], "ms")]
            if ref:
                cells += [_fmt(ref["latency"][key], "ms"), _fmt(ratios["latency"], "x")]
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
        columns.append(f"ms / batch of {first['latency']['batch_size']}")
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
            cells.append(with_ratio(_fmt(r["latency"]["batch_ms"], "ms"), "latency"))
        return cells

    if ref:
        table.add_row(*row(f"{ref['checkpoint']} (ref)", ref, None), "", "")
        table.add_section()
    for r in results:
        extra = [_fmt(r["agreement"], "pct"), _fmt(r["kl"], "loss")] if ref else []
        table.add_row(*row(r["checkpoint"], r, r.get("ratios")), *extra)
    return table
