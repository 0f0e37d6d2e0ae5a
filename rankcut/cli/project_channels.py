"""``rankcut project --structure channels``: remove channels of producer -> consumer chains, refit the consumer."""

from __future__ import annotations

import fnmatch

import numpy as np
import torch
from rich.table import Table
from torch import nn

from rankcut.cli.console import Reporter
from rankcut.compress.channel_budget import plan_widths, resized_cost
from rankcut.compress.channels import Selection, prune_chain, select
from rankcut.errors import RankcutError
from rankcut.files.checkpoint import CheckpointMeta, save
from rankcut.files.fileio import file_digest
from rankcut.files.statsfile import StatsFile
from rankcut.model.cost import count_macs, count_params
from rankcut.model.graph import Chain, find_chains, select_chains

UNITS = "squared output error per sample"


def _fitting_chains(model: nn.Module, meta: CheckpointMeta, stats: StatsFile, stats_path: str, checkpoint: str,
                    layers: list[str] | None, exclude: list[str] | None) -> tuple[list[Chain], dict[str, str]]:
    """The model's chains that the statistics measured, and why every other conv/linear layer is left whole."""
    if not stats.chains:
        raise RankcutError(f"{stats_path} holds no channel statistics; make them with: rankcut stats {checkpoint} "
                           "--data D --structure channels -o S.npz")
    chains, refused = find_chains(model, meta.input)
    names = [c.producer for c in chains] + list(refused)
    for pattern in (layers or []) + (exclude or []):
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            raise RankcutError(f"{pattern!r} matches no conv or linear layer (they are: {', '.join(names[:6])}"
                               f"{', ...' if len(names) > 6 else ''})")
    chosen = []
    for chain in select_chains(chains, layers, exclude):
        measured = stats.chains.get(chain.producer)
        if measured is None:
            refused[chain.producer] = "no channel statistics for it in the statistics file"
        elif measured.chain != chain:
            raise RankcutError(f"{stats_path}: chain {chain.producer} was measured as {measured.chain.to_dict()}, "
                               f"but in the checkpoint it is {chain.to_dict()}")
        else:
            chosen.append(chain)
    if not chosen:
        raise RankcutError("no prunable chain selected" + (
            f" ({next(iter(refused))}: {next(iter(refused.values()))})" if refused else ""))
    return chosen, refused


def _widths(model, chains: list[Chain], selections: dict[str, Selection], keep: float | None,
            budget: tuple[str, float] | None, totals: tuple[int, int], per_layer: dict[str, int]) -> dict[str, int]:
    if budget is None:
        return {c.producer: max(1, int(keep * c.channels + 0.5)) for c in chains}
    kind, fraction = budget
    losses = {}
    for c in chains:  # one currency: the fraction of the consumer's input-driven output variance lost
        loss = selections[c.producer].loss.numpy()
        losses[c.producer] = loss / loss[0] if loss[0] > 0 else np.zeros_like(loss)
    widths, _ = plan_widths(model, chains, losses, kind, fraction, totals[0 if kind == "macs" else 1], per_layer)
    return widths


def project_channels(model: nn.Module, meta: CheckpointMeta, stats: StatsFile, *, checkpoint: str, stats_path: str,
                     output: str, keep: float | None, budget: tuple[str, float] | None, layers: list[str] | None,
                     exclude: list[str] | None, report: Reporter) -> None:
    """Prune every selected chain to its width (``--keep`` or a budget), write the checkpoint, print a table."""
    chains, refused = _fitting_chains(model, meta, stats, stats_path, checkpoint, layers, exclude)
    macs_before, per_layer = count_macs(model, meta.input)
    params_before = count_params(model)
    with torch.no_grad():
        selections = {c.producer: select(model, c, stats.chains[c.producer].moments) for c in chains}
    widths = _widths(model, chains, selections, keep, budget, (macs_before, params_before), per_layer)
    predicted = [a - b + c for a, b, c in zip((macs_before, params_before), resized_cost(model, chains, {}, per_layer),
                                               resized_cost(model, chains, widths, per_layer))]
    edits, rows = [], []
    with torch.no_grad():
        for c in chains:
            k, selection = widths[c.producer], selections[c.producer]
            row = {"producer": c.producer, "consumer": c.consumer, "carried": list(c.carried), "channels": c.channels,
                   "kept": k, "predicted_loss": 0.0, "loss_fraction": 0.0, "status": "whole: nothing to remove"}
            if k < c.channels:
                edit, loss = prune_chain(model, c, stats.chains[c.producer].moments, selection.kept(k))
                edits.append(edit)
                total = selection.loss[0].item()
                row |= {"predicted_loss": loss, "loss_fraction": loss / total if total > 0 else 0.0, "status": "pruned"}
            rows.append(row)
    macs_after, params_after = count_macs(model, meta.input)[0], count_params(model)
    if [macs_after, params_after] != predicted:  # the cost model is exact; this guards the promise
        raise RankcutError(f"internal error: the pruned model has {macs_after:,} MACs and {params_after:,} parameters, "
                           f"the cost model predicted {predicted[0]:,} and {predicted[1]:,}; nothing written")
    if budget is not None and (macs_after if budget[0] == "macs" else params_after) > budget[1] * (
            macs_before if budget[0] == "macs" else params_before):
        raise RankcutError("internal error: the pruned model is over the budget; nothing written")
    history = {"structure": "channels", **({"keep": keep} if budget is None else {budget[0]: budget[1]}),
               "stats": file_digest(stats_path)[:16], "chains": len(edits)}
    save(model, meta.with_edits(*edits).with_history("project", **history), output)
    totals = {"macs_before": macs_before, "macs_after": macs_after, "macs_ratio": macs_after / macs_before,
              "params_before": params_before, "params_after": params_after, "params_ratio": params_after / params_before}
    report.result({"output": output, "structure": "channels", "keep": keep,
                   "budget": None if budget is None else {"kind": budget[0], "fraction": budget[1]},
                   "chains": rows, "refused": refused, "loss_units": UNITS, "totals": totals},
                  _table(rows, refused, totals))


def _table(rows: list[dict], refused: dict[str, str], totals: dict) -> Table:
    caption = (f"MACs {totals['macs_before']:,} -> {totals['macs_after']:,} (x{totals['macs_ratio']:.3f}), params "
               f"{totals['params_before']:,} -> {totals['params_after']:,} (x{totals['params_ratio']:.3f}); "
               f"predicted loss in {UNITS}")
    table = Table("producer", "consumer", "channels", "predicted loss", "of consumer variance", "status",
                  title="channel pruning", title_justify="left", caption=caption, caption_justify="left")
    for r in rows:
        table.add_row(r["producer"], r["consumer"], f"{r['channels']} -> {r['kept']}", f"{r['predicted_loss']:.4g}",
                      f"{100 * r['loss_fraction']:.2f}%", r["status"])
    table.add_section()
    for name, why in refused.items():
        table.add_row(name, "", "", "", "", f"whole: {why}")
    return table
