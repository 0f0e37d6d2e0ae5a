"""``rankcut profile``: measured latency of a checkpoint on this machine, whole and per target at a grid of ranks."""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich.table import Table

from rankcut.cli.console import Reporter
from rankcut.cli.options import Checkpoint, Device, Exclude, Json, Layers, Output, Quiet
from rankcut.dist import resolve_device
from rankcut.errors import RankcutError
from rankcut.files.checkpoint import load_with_meta
from rankcut.files.fileio import check_output, file_digest
from rankcut.files.profilefile import PAIR, Profile, save_profile
from rankcut.model.graph import STRUCTURES, find_chains, select_chains
from rankcut.model.targets import select
from rankcut.run.latency import RUNTIMES
from rankcut.run.profile import profile_model


def profile(
    checkpoint: Checkpoint,
    output: Output,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Images per batch to time at.")] = 1,
    device: Device = "cpu",
    threads: Annotated[Optional[int], typer.Option("--threads", help="CPU threads while timing (default: as now).")] = None,
    runtime: Annotated[str, typer.Option("--runtime", help=f"Runtime to time: {', '.join(RUNTIMES)}.")] = "torch",
    ranks: Annotated[int, typer.Option("--ranks", help=(
        "Ranks timed per layer, spread over those whose pair saves MACs; as many kept widths per channel chain."))] = 8,
    structures: Annotated[Optional[str], typer.Option("--structures", help=(
        "What to time: pair (rank-k pairs of every target), channels (every channel chain at kept widths; needs "
        "a model torch.fx can trace), comma-separated. Default: both, channels only where the model traces."))] = None,
    seconds: Annotated[float, typer.Option("--seconds", help="Most seconds per comparison (after 10 rounds).")] = 4.0,
    layers: Layers = None,
    exclude: Exclude = None,
    json_out: Json = False,
    quiet: Quiet = False,
) -> None:
    """Time a checkpoint on this machine, whole, per target at a grid of ranks, per channel chain at a grid of widths.

    The whole model and every layer alone, in one alternating comparison (each layer's time is its ratio to
    the whole); each target as rank-k pairs and each channel chain's modules at fewer channels, each on its
    real input, timed alternately with the layer as it is. project --latency/--profile reads the file. The
    profile records device, threads, runtime, batch size, torch version and the checkpoint's digest, and is
    refused for any other checkpoint.
    """
    report = Reporter(quiet, json_out)
    chosen = [s.strip() for s in (structures or ",".join(STRUCTURES)).split(",") if s.strip()]
    if not chosen or any(s not in STRUCTURES for s in chosen):
        raise RankcutError(f"--structures takes {', '.join(STRUCTURES)} (comma-separated), got {structures!r}")
    if ranks < 1:
        raise RankcutError(f"--ranks must be at least 1, got {ranks}")
    if seconds <= 0:
        raise RankcutError(f"--seconds must be positive, got {seconds}")
    check_output(output, [checkpoint], force=False)
    dev = resolve_device(device)
    model, meta = load_with_meta(checkpoint, dev)
    targets = select(model, meta.input, layers, exclude) if "pair" in chosen else []
    chains = []
    if "channels" in chosen:
        try:
            chains = select_chains(find_chains(model, meta.input)[0], layers, exclude)
        except RankcutError as e:
            if structures is not None:
                raise
            report.warn(f"channel chains not timed: {e}")
    with report.progress() as progress:
        task = progress.add_task("profile", total=len(targets) + len(chains) + 1, info="")

        def step(name: str) -> None:
            progress.update(task, advance=1, info=name)

        result = profile_model(model, meta.input, targets, file_digest(checkpoint), batch_size=batch_size,
                               device=dev, threads=threads, runtime=runtime, points=ranks, seconds=seconds,
                               chains=chains, step=step)
    save_profile(result, output)
    report.result({"output": output, **result.to_dict(), "parts_ms": result.parts_ms,
                   "parts_over_whole": result.parts_ms / result.whole_ms, "scale": result.scale},
                  _table(result, output))


def _table(p: Profile, output: str) -> Table:
    caption = (f"whole model {p.whole_ms:.3f} ms (25-75%: {p.whole_spread_ms[0]:.3f}-{p.whole_spread_ms[1]:.3f}); "
               f"sum of the parts timed alone {p.parts_ms:.3f} ms = {p.parts_ms / p.whole_ms:.2f}x the whole "
               f"(targets {sum(lp.ms for lp in p.layers.values()):.3f} ms, everything else {p.others_ms:.3f} ms); "
               f"budgets price the parts x{p.scale:.3f}\nwritten to {output}")
    table = Table("layer", "as is ms", "ranks (widths) timed", "ms (smallest .. largest)",
                  "largest faster rank", title=f"latency profile: {p.describe()}", title_justify="left",
                  caption=caption, caption_justify="left")
    for name, lp in p.layers.items():
        timed = lp.candidates.get(PAIR, ())
        faster = [c.size for c in timed if c.ms < lp.ms]
        table.add_row(name, f"{lp.ms:.3f}", ", ".join(str(c.size) for c in timed) or "none save MACs",
                      f"{timed[0].ms:.3f} .. {timed[-1].ms:.3f}" if timed else "",
                      str(max(faster)) if faster else "none")
    for producer, cp in p.chains.items():  # a chain's time: its modules', each at the width with the others full
        ms = sum(m.ms for m in cp.modules.values())
        widths = [c.size for c in next(iter(cp.modules.values())).candidates]
        at = {k: sum(m.ms * m.ratio_at(k, cp.channels) for m in cp.modules.values()) for k in widths}
        faster = [k for k, t in at.items() if t < ms]
        table.add_row(f"{producer} -> {cp.consumer} (channels)", f"{ms:.3f}", ", ".join(map(str, widths)),
                      f"{at[widths[0]]:.3f} .. {at[widths[-1]]:.3f}" if widths else "", str(max(faster)) if faster else "none")
    return table
