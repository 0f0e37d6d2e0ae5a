"""``rankcut info``: what a checkpoint holds (architecture, input, size, cost, layers, history)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich.table import Table
from torch import nn

from rankcut.files.checkpoint import load_with_meta, original_widths
from rankcut.cli.console import Reporter
from rankcut.errors import RankcutError, one_line
from rankcut.model.edits import ChannelPrune
from rankcut.model.layers import LowRank, current_rank, is_target_type, out_width
from rankcut.model.cost import count_macs, count_params, target_macs
from rankcut.cli.options import Force, Json, Quiet
from rankcut.cli.plots import check_plot, checkpoint_plot, spectra_plot
from rankcut.files.fileio import file_digest
from rankcut.cli.stats import stats_info
from rankcut.model.targets import untargeted


def layer_rows(model: nn.Module, per_layer_macs: dict[str, int], notes: dict[str, str] | None = None,
               pruned: set[str] = frozenset(), original: dict[str, int] | None = None) -> list[dict]:
    """One row per conv/linear layer, rank-k pair or fused attention: name, type, weight shape(s), rank, MACs,
    structure (whole, pair, channels), width, and with ``original`` (``checkpoint.original_widths``) the
    width in the base architecture (``original_width``; the width itself for a layer an edit added).

    ``note`` says why a layer is not a target (``targets.untargeted``), empty for targets; ``pruned`` names
    the producers whose channels a ``prune_channels`` edit removed.
    """
    rows = []
    pair_parts = set()
    notes = notes or {}
    for name, module in model.named_modules():
        layer = is_target_type(module) or isinstance(module, nn.Conv2d)
        if name in pair_parts or not (layer or name in notes):
            continue
        if not layer:  # listed for its note, e.g. nn.MultiheadAttention (its weight is in_proj_weight)
            shapes = [list(p.shape) for p in module.parameters(recurse=False) if p.dim() > 1]
            rows.append({"name": name, "type": type(module).__name__, "shape": shapes, "rank": None,
                         "macs": per_layer_macs.get(name, 0), "structure": "whole", "width": None,
                         "note": notes[name]})
            continue
        if isinstance(module, LowRank):
            pair_parts |= {f"{name}.down", f"{name}.up"}
            shape = [list(module.down.weight.shape), list(module.up.weight.shape)]
            rows.append({"name": name, "type": f"LowRank({type(module.down).__name__})", "shape": shape,
                         "rank": module.rank, "macs": target_macs(model, name, per_layer_macs),
                         "structure": "pair", "width": out_width(module), "note": notes.get(name, "")})
        else:
            width = module.weight.shape[0]
            structure = "channels" if name in pruned else "whole"
            rows.append({"name": name, "type": type(module).__name__, "shape": [list(module.weight.shape)],
                         "rank": None, "macs": target_macs(model, name, per_layer_macs),
                         "structure": structure, "width": width, "note": notes.get(name, "")})
    if original is not None:
        for row in rows:
            row["original_width"] = original.get(row["name"], row["width"])
    return rows


def checkpoint_info(path: str, report: Reporter) -> dict:
    model, meta = load_with_meta(path)
    try:
        macs, per_layer = count_macs(model, meta.input)
    except RuntimeError as e:  # the recorded input contract does not fit the model
        raise RankcutError(f"{path}: the model cannot run on its recorded input {meta.input.shape}: "
                           f"{one_line(str(e))[:160]}") from None
    rows = layer_rows(model, per_layer, untargeted(model, meta.input),
                      {e.producer for e in meta.edits if isinstance(e, ChannelPrune)}, original_widths(meta))
    data = {"file": path, "sha256": file_digest(path), "arch": meta.arch, "arch_kwargs": meta.arch_kwargs, "input": meta.input.to_dict(),
            "classes": meta.classes, "params": count_params(model), "macs": macs, "layers": rows,
            "edits": [e.kind for e in meta.edits], "history": list(meta.history)}
    summary = Table(show_header=False, box=None, title=path, title_justify="left")
    summary.add_row("sha256", data["sha256"])
    summary.add_row("arch", f"{meta.arch} {meta.arch_kwargs}")
    summary.add_row("input", f"{'x'.join(map(str, meta.input.shape))}  mean {meta.input.mean}  std {meta.input.std}")
    summary.add_row("classes", "not recorded" if meta.classes is None else ", ".join(meta.classes))
    summary.add_row("params", f"{data['params']:,}")
    summary.add_row("MACs", f"{macs:,} ({macs / 1e9:.3f} G)")
    summary.add_row("edits", f"{len(meta.edits)}")
    layers = Table("layer", "type", "structure", "width", "weight shape", "rank", "MACs", "note", title="layers",
                   title_justify="left")
    for r in rows:
        layers.add_row(r["name"], r["type"], r["structure"], "" if r["width"] is None else str(r["width"]),
                       " + ".join("x".join(map(str, s)) for s in r["shape"]),
                       "" if r["rank"] is None else str(r["rank"]), f"{r['macs']:,}", r["note"])
    history = Table("command", "time", "details", title="history", title_justify="left")
    for h in meta.history:
        details = ", ".join(f"{k}={v}" for k, v in h.items() if k not in ("command", "time"))
        history.add_row(str(h.get("command")), str(h.get("time")), details)
    report.result(data, summary, layers, history)
    return data


def chosen_ranks(checkpoint: str, stats_path: str) -> dict[str, int]:
    """The rank of every cut layer of ``checkpoint`` (a pair's k, a pruned producer's channels), which must have
    been projected with the statistics at ``stats_path`` (a ``project`` step of its history records their
    digest); layers left whole are not listed."""
    model, meta = load_with_meta(checkpoint)
    digest = file_digest(stats_path)[:16]
    if not any(h.get("command") == "project" and h.get("stats") == digest for h in meta.history):
        raise RankcutError(f"{checkpoint} was not projected with {stats_path} (no project step in its history used "
                           "these statistics): give the checkpoint rankcut project wrote from them")
    pruned = {e.producer for e in meta.edits if isinstance(e, ChannelPrune)}
    return {name: current_rank(layer) for name, layer in model.named_modules()
            if isinstance(layer, LowRank) or name in pruned}


def info(file: Annotated[str, typer.Argument(help="A checkpoint (.safetensors) or statistics file (.npz).",
                                              show_default=False)],
         plot: Annotated[Optional[str], typer.Option("--plot", help=(
             "Draw to this .png or .svg (needs matplotlib: pip install 'rankcut[plot]'): for a statistics file, "
             "each layer's eigenvalue spectrum and the variance dropped at each rank (log scale); for a "
             "checkpoint, each layer's width before and after (a pair's rank, a pruned layer's kept channels) "
             "and its share of the MACs."),
             show_default=False)] = None,
         checkpoint: Annotated[Optional[str], typer.Option("--checkpoint", help=(
             "With a statistics file and --plot: a checkpoint rankcut project made from these statistics; "
             "each layer's chosen rank is marked on the spectra."), show_default=False)] = None,
         force: Force = False, json_out: Json = False, quiet: Quiet = False) -> None:
    """Show a checkpoint (architecture, input, parameters, MACs, ranks, history) or a statistics file."""
    report = Reporter(quiet, json_out)
    if checkpoint is not None and (plot is None or not file.endswith(".npz")):
        raise RankcutError("--checkpoint marks chosen ranks on a statistics file's spectra: give S.npz and --plot")
    if file.endswith(".npz"):
        if plot is not None:
            check_plot(plot, [file, checkpoint], force)
        ranks = None if checkpoint is None else chosen_ranks(checkpoint, file)
        stats = stats_info(file, report)
        if plot is not None:
            spectra_plot(stats, plot, title=f"{file}: output spectra", ranks=ranks)
    else:
        if plot is not None:
            check_plot(plot, [file], force)
        data = checkpoint_info(file, report)
        if plot is not None:
            checkpoint_plot(data, plot, title=f"{file}: {data['arch']}")
