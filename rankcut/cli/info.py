"""``rankcut info``: what a checkpoint holds (architecture, input, size, cost, layers, history)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table
from torch import nn

from rankcut.files.checkpoint import load_with_meta
from rankcut.cli.console import Reporter
from rankcut.errors import RankcutError
from rankcut.model.edits import ChannelPrune
from rankcut.model.layers import LowRank, is_target_type, out_width
from rankcut.model.cost import count_macs, count_params
from rankcut.cli.errors import one_line
from rankcut.cli.options import Json, Quiet
from rankcut.cli.stats import stats_info


def layer_rows(model: nn.Module, per_layer_macs: dict[str, int], pruned: set[str] = frozenset()) -> list[dict]:
    """One row per conv/linear layer or rank-k pair: name, type, weight shape(s), rank, MACs, structure, width.

    ``pruned`` names the producers whose channels a ``prune_channels`` edit removed.
    """
    rows = []
    pair_parts = set()
    for name, module in model.named_modules():
        if name in pair_parts or not (is_target_type(module) or isinstance(module, nn.Conv2d)):
            continue
        if isinstance(module, LowRank):
            pair_parts |= {f"{name}.down", f"{name}.up"}
            shape = [list(module.down.weight.shape), list(module.up.weight.shape)]
            macs = per_layer_macs.get(f"{name}.down", 0) + per_layer_macs.get(f"{name}.up", 0)
            rows.append({"name": name, "type": f"LowRank({type(module.down).__name__})", "shape": shape,
                         "rank": module.rank, "macs": macs, "structure": "pair", "width": out_width(module)})
        else:
            width = module.weight.shape[0]
            structure = "channels" if name in pruned else "whole"
            rows.append({"name": name, "type": type(module).__name__, "shape": [list(module.weight.shape)],
                         "rank": None, "macs": per_layer_macs.get(name, 0), "structure": structure, "width": width})
    return rows


def checkpoint_info(path: str, report: Reporter) -> None:
    model, meta = load_with_meta(path)
    try:
        macs, per_layer = count_macs(model, meta.input)
    except RuntimeError as e:  # the recorded input contract does not fit the model
        raise RankcutError(f"{path}: the model cannot run on its recorded input {meta.input.shape}: "
                           f"{one_line(str(e))[:160]}") from None
    rows = layer_rows(model, per_layer, {e.producer for e in meta.edits if isinstance(e, ChannelPrune)})
    data = {"file": path, "arch": meta.arch, "arch_kwargs": meta.arch_kwargs, "input": meta.input.to_dict(),
            "params": count_params(model), "macs": macs, "layers": rows,
            "edits": [e.kind for e in meta.edits], "history": list(meta.history)}
    summary = Table(show_header=False, box=None, title=path, title_justify="left")
    summary.add_row("arch", f"{meta.arch} {meta.arch_kwargs}")
    summary.add_row("input", f"{'x'.join(map(str, meta.input.shape))}  mean {meta.input.mean}  std {meta.input.std}")
    summary.add_row("params", f"{data['params']:,}")
    summary.add_row("MACs", f"{macs:,} ({macs / 1e9:.3f} G)")
    summary.add_row("edits", f"{len(meta.edits)}")
    layers = Table("layer", "type", "structure", "width", "weight shape", "rank", "MACs", title="layers",
                   title_justify="left")
    for r in rows:
        layers.add_row(r["name"], r["type"], r["structure"], str(r["width"]),
                       " + ".join("x".join(map(str, s)) for s in r["shape"]),
                       "" if r["rank"] is None else str(r["rank"]), f"{r['macs']:,}")
    history = Table("command", "time", "details", title="history", title_justify="left")
    for h in meta.history:
        details = ", ".join(f"{k}={v}" for k, v in h.items() if k not in ("command", "time"))
        history.add_row(str(h.get("command")), str(h.get("time")), details)
    report.result(data, summary, layers, history)


def info(file: Annotated[str, typer.Argument(help="A checkpoint (.safetensors) or statistics file (.npz).",
                                              show_default=False)],
         json_out: Json = False, quiet: Quiet = False) -> None:
    """Show a checkpoint (architecture, input, parameters, MACs, ranks, history) or a statistics file."""
    report = Reporter(quiet, json_out)
    if file.endswith(".npz"):
        stats_info(file, report)
    else:
        checkpoint_info(file, report)
