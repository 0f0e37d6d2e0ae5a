"""``rankcut eval``: accuracy, cross-entropy, size, cost and latency of a checkpoint, optionally against a reference."""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich.table import Table
from torch import nn

from .. import dist
from ..archs import InputContract
from ..checkpoint import load_with_meta
from ..console import Reporter
from ..data import open_data, subset
from ..errors import RankcutError
from ..evaluate import check_dataset_labels, evaluate as run_evaluation, output_classes
from ..latency import measure_latency
from ..measure import count_macs, count_params
from .options import BatchSize, Checkpoint, Data, Device, Json, Quiet, Samples, Seed, Workers


def _cost(model: nn.Module, contract: InputContract, latency: bool, batch_size: int, ctx: dist.Context) -> dict:
    cost = {"params": count_params(model), "macs": count_macs(model, contract)[0]}
    if latency and ctx.primary:
        cost["latency"] = measure_latency(model, contract, batch_size, ctx.device)
    return cost


def _fmt(value, kind: str) -> str:
    if value is None:
        return "-"
    return {"pct": f"{100 * value:.2f}%", "num": f"{value:,}", "loss": f"{value:.4f}", "ms": f"{value:.3f}",
            "x": f"{value:.3f}x"}[kind]


def evaluate(
    checkpoint: Checkpoint,
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
    """Evaluate a checkpoint: top-1/top-5, cross-entropy, parameters, MACs, latency; agreement with a reference."""
    ctx = dist.setup(device)
    try:
        report = Reporter(quiet, json_out, primary=ctx.primary)
        model, meta = load_with_meta(checkpoint, ctx.device)
        classes = output_classes(model, meta.input)
        ref_model = None
        if reference is not None:
            ref_model, ref_meta = load_with_meta(reference, ctx.device)
            if ref_meta.input != meta.input:
                raise RankcutError(f"the reference {reference} expects input {ref_meta.input.to_dict()}, "
                                   f"{checkpoint} {meta.input.to_dict()}")
            if output_classes(ref_model, meta.input) != classes:
                raise RankcutError(f"the reference {reference} and {checkpoint} score different numbers of classes")
        dataset = subset(open_data(data, meta.input, train=False, num_classes=classes, seed=seed), samples, seed)
        check_dataset_labels(dataset, classes, False, f"the data {data}")
        with report.progress() as progress:
            result = run_evaluation(model, dataset, classes, device=ctx.device, batch_size=batch_size,
                                    workers=workers, reference=ref_model, ctx=ctx, progress=progress)
        result = {"checkpoint": checkpoint, "data": data, "device": str(ctx.device), "classes": classes, **result,
                  **_cost(model, meta.input, latency, batch_size, ctx)}
        if ref_model is not None:
            result["reference"] |= {"checkpoint": reference, **_cost(ref_model, meta.input, latency, batch_size, ctx)}
            ref = result["reference"]
            result["ratios"] = {"macs": result["macs"] / ref["macs"], "params": result["params"] / ref["params"]}
            if "latency" in ref:
                result["ratios"]["latency"] = result["latency"]["batch_ms"] / ref["latency"]["batch_ms"]
    finally:
        dist.teardown(ctx)
    if result["nonfinite"]:
        report.warn(f"the model{'s' if reference else ''} gave NaN or Inf outputs for {result['nonfinite']:,} of "
                    f"{result['samples']:,} samples (counted as wrong; the loss is not meaningful)")
    report.result(result, _table(result))


def _table(r: dict) -> Table:
    ref, ratios = r.get("reference"), r.get("ratios", {})
    table = Table("", r["checkpoint"], *([ref["checkpoint"], "ratio"] if ref else []),
                  title=f"{r['data']}: {r['samples']:,} samples ({r['labeled']:,} labelled), {r['classes']} classes",
                  title_justify="left")
    rows = [("top-1", "top1", "pct"), (f"top-{r['k']}", "top5", "pct"), ("cross-entropy", "loss", "loss"),
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
