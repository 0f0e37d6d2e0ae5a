"""Channel pruning of a whole model (``project --structure channels``): every selected chain to its width.

A chain is producer -> channel-wise operations -> one consumer (``model.graph``). Each keeps the channels
that best predict the others by least squares (``compress.channels``), at a width from ``keep`` or from a
global budget (``compress.channel_budget``); the consumer is refitted, and no layer is added.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from rankcut.compress.channel_budget import plan_widths, resized_cost
from rankcut.compress.channels import Selection, prune_chain, select
from rankcut.compress.timed import chain_latency, chain_price, latency_total
from rankcut.errors import RankcutError
from rankcut.files.profilefile import Profile
from rankcut.files.statsfile import StatsFile
from rankcut.model.contract import InputContract
from rankcut.model.cost import count_macs, count_params
from rankcut.model.edits import Edit
from rankcut.model.graph import Chain, find_chains, select_chains

UNITS = "squared output error per sample"


@dataclass
class PruneResult:
    """What channel pruning did: the edits to record, a row per chain, the layers left whole and why, totals."""

    keep: float | None
    budget: tuple[str, float] | None
    edits: list[Edit]
    chains: list[dict]
    refused: dict[str, str]
    totals: dict

    def history(self) -> dict:
        """The checkpoint history entry's details (the ``project`` command adds the statistics digest)."""
        how = {"keep": self.keep} if self.budget is None else {self.budget[0]: self.budget[1]}
        return {"structure": "channels", **how, "chains": len(self.edits)}

    def to_dict(self) -> dict:
        return {"structure": "channels", "keep": self.keep,
                "budget": None if self.budget is None else {"kind": self.budget[0], "fraction": self.budget[1]},
                "chains": self.chains, "refused": self.refused, "loss_units": UNITS, "totals": self.totals}


def fitting_chains(model: nn.Module, contract: InputContract, stats: StatsFile, where: str,
                   layers: list[str] | None, exclude: list[str] | None,
                   required: bool = True) -> tuple[list[Chain], dict[str, str]]:
    """The model's chains that the statistics measured, and why every other conv/linear layer is left whole.

    With ``required``, finding none is an error (``--structure channels``; ``auto`` can still make pairs).
    """
    if not stats.chains:
        raise RankcutError(f"{where} holds no channel statistics; make them with: rankcut stats CHECKPOINT "
                           "--data D --structure channels -o S.npz")
    chains, refused = find_chains(model, contract)
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
            raise RankcutError(f"{where}: chain {chain.producer} was measured as {measured.chain.to_dict()}, "
                               f"but in the checkpoint it is {chain.to_dict()}")
        else:
            chosen.append(chain)
    if not chosen and required:
        raise RankcutError("no prunable chain selected" + (
            f" ({next(iter(refused))}: {next(iter(refused.values()))})" if refused else ""))
    return chosen, refused


def _widths(model, chains: list[Chain], selections: dict[str, Selection], keep: float | None,
            budget: tuple[str, float] | None, totals: tuple[int, int], per_layer: dict[str, int],
            profile: Profile | None, step: int = 1) -> dict[str, int]:
    if budget is None:
        return {c.producer: min(c.channels, step * max(1, int(keep * c.channels / step + 0.5))) for c in chains}
    kind, fraction = budget
    losses = {}
    for c in chains:  # one currency: the fraction of the consumer's input-driven output variance lost
        loss = selections[c.producer].loss.numpy()
        losses[c.producer] = loss / loss[0] if loss[0] > 0 else np.zeros_like(loss)
    if kind == "latency":
        if profile is None:
            raise RankcutError("a --latency budget needs a latency profile of the checkpoint (rankcut profile)")
        widths, _ = plan_widths(model, chains, losses, kind, fraction, latency_total(profile), per_layer,
                                price=chain_price(profile, chains), step=step)
        return widths
    widths, _ = plan_widths(model, chains, losses, kind, fraction, totals[0 if kind == "macs" else 1], per_layer,
                            step=step)
    return widths


def prune_model(model: nn.Module, contract: InputContract, stats: StatsFile, *, keep: float | None,
                budget: tuple[str, float] | None, layers: list[str] | None = None, exclude: list[str] | None = None,
                where: str = "the statistics", profile: Profile | None = None, step: int = 1) -> PruneResult:
    """Prune every selected chain of ``model`` (in place) to its width from ``keep`` or a (kind, fraction) budget.

    Kept widths are multiples of ``step`` (``--round-channels``), or a chain's full width. A ``latency`` budget
    is spent in the measured times of ``profile`` (``compress.timed``); with a profile the totals also hold the
    predicted latency ratio in its cost model.
    """
    chains, refused = fitting_chains(model, contract, stats, where, layers, exclude)
    macs_before, per_layer = count_macs(model, contract)
    params_before = count_params(model)
    with torch.no_grad():
        selections = {c.producer: select(model, c, stats.chains[c.producer].moments) for c in chains}
    widths = _widths(model, chains, selections, keep, budget, (macs_before, params_before), per_layer, profile,
                     step)
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
    macs_after, params_after = count_macs(model, contract)[0], count_params(model)
    if [macs_after, params_after] != predicted:  # the cost model is exact; this guards the promise
        raise RankcutError(f"internal error: the pruned model has {macs_after:,} MACs and {params_after:,} parameters, "
                           f"the cost model predicted {predicted[0]:,} and {predicted[1]:,}; nothing written")
    totals = {"macs_before": macs_before, "macs_after": macs_after, "macs_ratio": macs_after / macs_before,
              "params_before": params_before, "params_after": params_after, "params_ratio": params_after / params_before}
    if profile is not None:
        before, after = latency_total(profile), chain_latency(profile, chains, widths)
        totals |= {"latency_before_ns": before, "latency_after_ns": after, "latency_ratio": after / before}
    key = None if budget is None else "latency_{}_ns" if budget[0] == "latency" else budget[0] + "_{}"
    if key is not None and totals[key.format("after")] > budget[1] * totals[key.format("before")]:
        raise RankcutError("internal error: the pruned model is over the budget; nothing written")
    return PruneResult(keep, budget, edits, rows, refused, totals)
