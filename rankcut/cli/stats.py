"""``rankcut stats``: per-layer output statistics over real batches, written to a ``.npz``."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from rankcut import dist
from rankcut.api import StatsConfig, collect_stats, rank_limits
from rankcut.cli.console import Reporter
from rankcut.cli.coverage import not_targets_table
from rankcut.cli.options import (BatchSize, Checkpoint, Data, Device, Exclude, Force, Json, Layers, Output, Quiet,
                                 Samples, Seed, Structure, Workers)
from rankcut.cli.tables import stats_summary
from rankcut.files.checkpoint import load_with_meta
from rankcut.files.fileio import check_output, file_digest
from rankcut.files.statsfile import load_stats, rank_warning, save_stats
from rankcut.run.data import open_data, subset


def stats(
    checkpoint: Checkpoint,
    data: Data,
    output: Output,
    samples: Samples = None,
    layers: Layers = None,
    exclude: Exclude = None,
    grad: Annotated[Optional[str], typer.Option("--grad", help=(
        "Also gather second-order statistics for --method hessian/fisher: kl (no labels needed) or mse."))] = None,
    probes: Annotated[int, typer.Option("--probes", help="Probes (backward passes) per batch with --grad.")] = 1,
    structure: Structure = "pair",
    batch_size: BatchSize = 64,
    workers: Workers = 0,
    device: Device = "auto",
    seed: Seed = 0,
    force: Force = False,
    json_out: Json = False,
    quiet: Quiet = False,
) -> None:
    """Measure each target layer's output mean and covariance over the data (one forward pass per batch).

    With --grad, a second pass adds probe-gradient statistics (one backward pass per batch and probe).
    With --structure channels, the same first pass also measures the input of every prunable
    chain's consumer (after the non-linearity), which project --structure channels needs.
    Under torchrun the data is sharded across processes and the sums are combined; rank 0 writes.
    """
    config = StatsConfig(grad=grad, probes=probes, layers=tuple(layers) if layers else None,
                         exclude=tuple(exclude) if exclude else None, batch_size=batch_size, workers=workers, seed=seed,
                         structure=structure)
    ctx = dist.setup(device)
    try:
        report = Reporter(quiet, json_out, ctx.primary)
        check_output(output, [checkpoint, data], force)
        model, meta = load_with_meta(checkpoint, ctx.device)
        dataset = subset(open_data(data, meta.input, seed=seed), samples, seed)
        with report.progress() as bar:
            result = collect_stats(model, meta.input, dataset, config, checkpoint=file_digest(checkpoint), ctx=ctx,
                                   progress=bar, info={"data": data})
        if ctx.primary:
            for name, limit in rank_limits(model, result).items():
                warning = rank_warning(name, result.layers[name], len(dataset), limit)
                if warning:
                    report.warn(warning)
            save_stats(result, output)
            summary, table = stats_summary(result, f"{output}: {len(dataset):,} samples")
            report.result({**summary, "output": output}, table, *not_targets_table(result.info["not_targets"], output))
    finally:
        dist.teardown(ctx)


def stats_info(path: str, report: Reporter):
    """``rankcut info S.npz``: the same table ``stats`` printed; returns the statistics read."""
    loaded = load_stats(path)
    summary, table = stats_summary(loaded, path)
    report.result({**summary, "file": path}, table, *not_targets_table(loaded.info.get("not_targets"), path))
    return loaded
