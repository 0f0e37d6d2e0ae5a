"""``rankcut stats``: per-layer output statistics over real batches, written to a ``.npz``."""

from __future__ import annotations

from typing import Annotated, Optional

import torch
import typer
from rich.table import Table

from rankcut.run import data as datasets
from rankcut.files.checkpoint import load_with_meta
from rankcut.cli.console import Reporter
from rankcut.dist import setup, teardown
from rankcut.errors import RankcutError
from rankcut.files.fileio import check_output, file_digest
from rankcut.model.layers import max_rank
from rankcut.files.statsfile import ChainStats, LayerStats, StatsFile, load_stats, rank_warning, save_stats
from rankcut.model.graph import check_structure, find_chains, select_chains
from rankcut.stats.inputs import input_moments, observe_inputs
from rankcut.stats.collect import LOSSES, collect_gradients, collect_moments
from rankcut.model.targets import select
from rankcut.cli.options import (BatchSize, Checkpoint, Data, Device, Exclude, Force, Json, Layers, Output, Quiet,
                                 Samples, Seed, Structure, Workers)

SPARK = "▁▂▃▄▅▆▇█"
LEVELS = (0.90, 0.95, 0.99)


def rank_for(values: torch.Tensor, fraction: float) -> int:
    """The smallest number of leading eigenvalues that keeps ``fraction`` of their sum."""
    total = values.sum().item()
    if total <= 0:
        return 1
    kept = torch.cumsum(values, 0) / total
    return int(torch.searchsorted(kept, torch.tensor(fraction - 1e-12, dtype=kept.dtype)).item()) + 1


def spectrum(values: torch.Tensor, width: int = 16) -> str:
    """A small picture of the eigenvalue spectrum: log scale, ``width`` characters."""
    chunks = torch.tensor_split(values.clamp_min(0), min(width, len(values)))
    logs = torch.stack([torch.log10(c.mean() + 1e-12) for c in chunks])
    low, high = logs.min(), logs.max()
    levels = ((logs - low) / (high - low).clamp_min(1e-12) * (len(SPARK) - 1)).round().long()
    return "".join(SPARK[i] for i in levels)


def summary(stats: StatsFile, title: str) -> tuple[dict, Table]:
    """The per-layer table shown by ``stats`` and ``info S.npz``, and the same as a dict."""
    table = Table("layer", "capture", "channels", "positions", *(f"rank@{int(f * 100)}%" for f in LEVELS),
                  "spectrum (log)", title=title, title_justify="left")
    rows = []
    for name, s in stats.layers.items():
        values = torch.linalg.eigvalsh(s.moments.covariance).flip(0).clamp_min(0)
        row = {"layer": name, "capture": s.target.capture, "channels": s.channels, "positions": int(s.moments.count),
               **{f"rank_{int(f * 100)}": rank_for(values, f) for f in LEVELS}}
        rows.append(row)
        table.add_row(name, s.target.capture, str(s.channels), f"{row['positions']:,}",
                      *(str(row[f"rank_{int(f * 100)}"]) for f in LEVELS), spectrum(values))
    data = {"checkpoint": stats.checkpoint, "samples": stats.samples, "loss": stats.loss, "layers": rows,
            "chains": [c.chain.to_dict() for c in stats.chains.values()], **stats.info}
    return data, table


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
    With --structure channels or auto, the same first pass also measures the input of every prunable
    chain's consumer (after the non-linearity), which project --structure channels needs.
    Under torchrun the data is sharded across processes and the sums are combined; rank 0 writes.
    """
    if grad is not None and grad not in LOSSES:
        raise RankcutError(f"--grad must be one of {', '.join(LOSSES)}, got {grad!r}")
    if probes < 1:
        raise RankcutError("--probes must be at least 1")
    check_structure(structure)
    ctx = setup(device)
    try:
        report = Reporter(quiet, json_out, ctx.primary)
        check_output(output, [checkpoint, data], force)
        model, meta = load_with_meta(checkpoint, ctx.device)
        targets = select(model, meta.input, layers, exclude)
        chains = [] if structure == "pair" else select_chains(find_chains(model, meta.input)[0], layers, exclude)
        dataset = datasets.subset(datasets.open_data(data, meta.input, seed=seed), samples, seed)
        batches = datasets.loader(datasets.shard(dataset, ctx.rank, ctx.world), batch_size, workers)
        with report.progress() as bar:
            task = bar.add_task("moments", total=len(batches), info="")
            with observe_inputs(model, chains) as chain_sums:
                moments = collect_moments(model, targets, batches, ctx, lambda: bar.advance(task))
            chain_moments = input_moments(chain_sums, chains, ctx)
            gradients = {}
            if grad is not None:
                task = bar.add_task(f"gradients ({grad})", total=len(batches), info="")
                gradients = collect_gradients(model, targets, batches, moments, grad, probes, seed, ctx,
                                              lambda: bar.advance(task))
        layer_stats = {t.name: LayerStats(t, moments[t.name], gradients.get(t.name, {})) for t in targets}
        chain_stats = {c.producer: ChainStats(c, chain_moments[c.producer]) for c in chains}
        info = {"data": data, "seed": seed, **({"probes": probes} if grad else {})}
        result = StatsFile(file_digest(checkpoint), len(dataset), layer_stats, loss=grad, info=info, chains=chain_stats)
        if ctx.primary:
            for name, s in layer_stats.items():
                warning = rank_warning(name, s, len(dataset), max_rank(model.get_submodule(name)))
                if warning:
                    report.warn(warning)
            save_stats(result, output)
            summary_data, table = summary(result, f"{output}: {len(dataset):,} samples")
            report.result({"output": output, **summary_data}, table)
    finally:
        teardown(ctx)


def stats_info(path: str, report: Reporter) -> None:
    """``rankcut info S.npz``: the same table ``stats`` printed."""
    data, table = summary(load_stats(path), path)
    report.result({"file": path, **data}, table)
