"""``rankcut refit``: refit a compressed checkpoint's layers in closed form against the model it came from."""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich.table import Table

from rankcut import dist
from rankcut.api import DEFAULT_REFIT_DAMPING, RefitConfig, refit as refit_model
from rankcut.cli.console import Reporter
from rankcut.cli.options import BatchSize, Checkpoint, Data, Device, Force, Json, Output, Quiet, Samples, Seed, Workers
from rankcut.errors import RankcutError
from rankcut.files.checkpoint import CheckpointMeta, load_with_meta, save
from rankcut.files.fileio import check_output, file_digest
from rankcut.run.data import open_data, subset


def check_teacher(meta: CheckpointMeta, teacher: CheckpointMeta, path: str, teacher_path: str) -> None:
    """Refuse a teacher that is not the model ``path`` was compressed from (architecture, input, edits)."""
    if (teacher.arch, teacher.arch_kwargs) != (meta.arch, meta.arch_kwargs):
        raise RankcutError(f"the teacher {teacher_path} is a {teacher.arch} {teacher.arch_kwargs}, {path} a {meta.arch} "
                           f"{meta.arch_kwargs}: refit needs the model it was compressed from")
    if teacher.input != meta.input:
        raise RankcutError(f"the teacher {teacher_path} expects input {teacher.input.to_dict()}, {path} "
                           f"{meta.input.to_dict()}")
    if meta.edits[:len(teacher.edits)] != teacher.edits:
        raise RankcutError(f"{path} was not compressed from {teacher_path}: its edits do not start with the "
                           "teacher's")


def refit(
    checkpoint: Checkpoint,
    data: Data,
    output: Output,
    teacher: Annotated[Optional[str], typer.Option("--teacher", "-t", help=(
        "The checkpoint CHECKPOINT was compressed from: each layer is refitted to reproduce its outputs "
        "(needed unless --bn-only)."))] = None,
    samples: Samples = None,
    damping: Annotated[float, typer.Option("--damping", help=(
        "Ridge damping of each layer's least squares, relative to the mean eigenvalue of its input second "
        "moment (at 1e-4 or more each batch's products are float32, summed in float64; below, float64)."))] = DEFAULT_REFIT_DAMPING,
    rounds: Annotated[int, typer.Option("--rounds", help="Alternating rounds (down given up, up given down) per pair.")] = 2,
    bn_only: Annotated[bool, typer.Option("--bn-only", help=(
        "Only re-estimate the running statistics of the BatchNorm layers left unfolded."))] = False,
    every: Annotated[bool, typer.Option("--all", help=(
        "Also refit the unchanged layers after the first compressed one (as whole layers or pairs)."))] = False,
    positions: Annotated[Optional[int], typer.Option("--positions", help=(
        "Use only N random output positions per sample in each layer's least squares (drawn per sample from "
        "--seed; default: every position). A conv layer's cost falls by its positions / N: a 14 x 14 output "
        "with --positions 16 costs 12x less; the fit is then an estimate from fewer rows."))] = None,
    batch_size: BatchSize = 64,
    workers: Workers = 0,
    device: Device = "auto",
    seed: Seed = 0,
    force: Force = False,
    json_out: Json = False,
    quiet: Quiet = False,
) -> None:
    """Refit compressed layers by least squares so each reproduces the teacher's output there (no labels).

    Layer by layer in the order the network computes them, each compressed layer (a rank-k pair: down given
    up, then up given down, --rounds times; a channel-pruned consumer: its whole weight) is fitted on the
    compressed model's own inputs to the teacher's outputs, so errors of earlier layers are corrected, not
    compounded. BatchNorm layers left unfolded after the first change get their running statistics
    re-estimated. A layer keeps its weights when the refit would not lower its error. Structure and ranks
    never change.

    Cost: one forward pass of the compressed model over the N samples per refitted layer (started from the
    kept input of the block holding the layer, e.g. a residual block, where it fits in 512 MiB), one of the teacher
    for all of them (its outputs kept in memory up to 512 MiB, with --positions only at the sampled positions,
    else one per layer), and per layer a float64
    matrix of P x P, P = inputs per output + 1 (8 P^2 bytes: 170 MB for a 3x3 conv reading 512 channels),
    factorised once (P^3 / 3 operations); with no more rows (N x output positions) than P, the rows are kept
    and solved in their space instead (N x N); --positions N' keeps N' rows per sample, so N x N' rows.
    Under torchrun the sums are combined across processes.
    """
    config = RefitConfig(damping=damping, rounds=rounds, bn_only=bn_only, every=every, batch_size=batch_size,
                         workers=workers, positions=positions, seed=seed)
    if teacher is None and not bn_only:
        raise RankcutError("refit needs --teacher BASE (the checkpoint this one was compressed from), "
                           "unless --bn-only")
    check_output(output, [checkpoint, teacher, data], force)
    ctx = dist.setup(device)
    try:
        report = Reporter(quiet, json_out, ctx.primary)
        model, meta = load_with_meta(checkpoint, ctx.device)
        teacher_model = None
        if teacher is not None:
            teacher_model, teacher_meta = load_with_meta(teacher, ctx.device)
            check_teacher(meta, teacher_meta, checkpoint, teacher)
        dataset = subset(open_data(data, meta.input, seed=seed), samples, seed)
        with report.progress() as bar:
            result = refit_model(model, teacher_model, meta.input, dataset, config, ctx=ctx, progress=bar)
        if ctx.primary:
            history = {**result.history(), "data": data,
                       "teacher": None if teacher is None else file_digest(teacher)[:16]}
            save(model, meta.with_history("refit", **history), output)
            summary = {"output": output, **result.to_dict()}
            report.result(summary, _table(summary, output))
    finally:
        dist.teardown(ctx)


def _table(data: dict, output: str) -> Table:
    caption = (f"{data['samples']:,} samples, damping {data['damping']:g}, {data['rounds']} round(s); error: mean "
               "squared difference from the teacher's output there, as a fraction of its variance, on the refit "
               "data, with the earlier layers already refitted")
    if data["batchnorms"]:
        caption += f"\nBatchNorm statistics re-estimated: {', '.join(data['batchnorms'])}"
    for name, why in data["skipped"].items():
        caption += f"\n{name}: {why}"
    table = Table("layer", "kind", "matched at", "error before", "error after", "status", title=f"wrote {output}",
                  title_justify="left", caption=caption, caption_justify="left")
    for r in data["layers"]:
        table.add_row(r["layer"], r["kind"], r["capture"], f"{100 * r['error_before']:.3f}%",
                      f"{100 * r['error_after']:.3f}%", r["status"])
    return table
