"""Exact cost of channel-pruned chains, and widths for chains under a ``--macs``/``--params`` budget.

Pruning chain X to k_X channels scales: X's producer's outputs, its carried modules (BatchNorm, PReLU,
depthwise conv) and its consumer's inputs. A layer can be the consumer of one chain and the producer of the
next (``conv2`` in ``conv1 -> conv2 -> fc1``), so its cost is ``k_in * k_out * (cost per in/out pair)``.
MACs come from the ``count_macs`` table scaled by those ratios (exact integers: a conv's count is a
multiple of its in x out channels); parameters from the shapes. A pruned consumer gains a bias.

For a budget each module's cost is charged to one chain (the chain whose consumer it is, else whose
producer or carried module it is), priced at the other chains' current widths. Widths only shrink, so
pricing at full widths never undercounts: the first allocation always fits (with coarse ``--round-channels``
steps it may not; then the fill below starts from every chain at its narrowest width). A few rounds then re-price
at the chosen widths, the best allocation whose exact total fits is kept, and a greedy fill widens chains
one channel at a time (exact costs) while the budget allows. The same planning works in any currency a
``Price`` gives per module (measured latency: ``compress.timed.chain_price``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from torch import nn

from rankcut.compress.budget import LayerOptions, allocate
from rankcut.errors import RankcutError
from rankcut.model.edits import get_module
from rankcut.model.graph import Chain

ROUNDS = 4


@dataclass(frozen=True)
class Touch:
    """How one module's width depends on chains: output width from ``out_of``, input width from ``in_of``."""

    out_of: str | None = None
    in_of: str | None = None
    channelwise: bool = False

    @property
    def owner(self) -> str:
        return self.in_of or self.out_of


def touches(chains: list[Chain]) -> dict[str, Touch]:
    """Every module a chain resizes, by name."""
    found: dict[str, Touch] = {}
    for c in chains:
        found[c.producer] = Touch(c.producer, found.get(c.producer, Touch()).in_of)
        for name in c.carried:
            found[name] = Touch(c.producer, None, True)
        found[c.consumer] = Touch(found.get(c.consumer, Touch()).out_of, c.producer)
    return found


def module_cost(module: nn.Module, name: str, touch: Touch, widths: dict[str, int], full: dict[str, int],
                per_layer_macs: dict[str, int]) -> tuple[int, int]:
    """(MACs, parameters) of one resized module with the chains at ``widths`` (``full``: current widths)."""
    k_out, c_out = (widths[touch.out_of], full[touch.out_of]) if touch.out_of else (1, 1)
    k_in, c_in = (widths[touch.in_of], full[touch.in_of]) if touch.in_of else (1, 1)
    macs = per_layer_macs.get(name, 0) * k_out * k_in // (c_out * c_in)
    if touch.channelwise:
        params = sum(p.numel() for p in module.parameters(recurse=False)) * k_out // c_out
        return macs, params
    weight = module.weight.numel() * k_out * k_in // (c_out * c_in)
    outputs = module.weight.shape[0] * k_out // c_out
    has_bias = module.bias is not None or k_in < c_in  # a pruned consumer gains a bias
    return macs, weight + (outputs if has_bias else 0)


def resized_cost(model: nn.Module, chains: list[Chain], widths: dict[str, int],
                 per_layer_macs: dict[str, int]) -> tuple[int, int]:
    """Summed (MACs, parameters) of every module the chains resize, at ``widths`` (missing: current width)."""
    full = {c.producer: c.channels for c in chains}
    at = {**full, **widths}
    macs = params = 0
    for name, touch in touches(chains).items():
        m, p = module_cost(get_module(model, name), name, touch, at, full, per_layer_macs)
        macs, params = macs + m, params + p
    return macs, params


def kept_widths(channels: int, step: int = 1) -> np.ndarray:
    """The widths a chain may keep: multiples of ``step`` below ``channels``, and ``channels`` itself."""
    return np.append(np.arange(step, channels, step), channels)


Price = Callable[[str, Touch, dict[str, int]], int]  # one module's cost with the chains at the given widths


def counted_price(model: nn.Module, chains: list[Chain], kind: str, per_layer_macs: dict[str, int]) -> Price:
    """The exact MACs or parameters (``kind``) of one resized module, as a ``Price``."""
    full = {c.producer: c.channels for c in chains}
    index = 0 if kind == "macs" else 1
    return lambda name, touch, at: module_cost(get_module(model, name), name, touch, at, full, per_layer_macs)[index]


def priced_total(chains: list[Chain], price: Price, widths: dict[str, int]) -> int:
    """Summed price of every module the chains resize, at ``widths`` (missing: current width)."""
    at = {**{c.producer: c.channels for c in chains}, **widths}
    return sum(price(name, touch, at) for name, touch in touches(chains).items())


def chain_options(chain: Chain, loss: np.ndarray, owned: dict[str, Touch], widths: dict[str, int], kind: str,
                  price: Price, step: int = 1) -> LayerOptions:
    """The chain's menu of widths (``kept_widths``), each with the ``kind`` cost of the modules charged to it
    (others at ``widths``)."""
    ks = kept_widths(chain.channels, step)
    costs = np.array([sum(price(n, t, {**widths, chain.producer: int(k)}) for n, t in owned.items()) for k in ks],
                     dtype=np.int64)
    by_kind = {"macs": np.zeros_like(costs), "params": np.zeros_like(costs), kind: costs}
    return LayerOptions(chain.producer, ks, loss=np.asarray(loss, dtype=np.float64)[ks], **by_kind)


def plan_widths(model: nn.Module, chains: list[Chain], losses: dict[str, np.ndarray], kind: str, fraction: float,
                total_before: int, per_layer_macs: dict[str, int], price: Price | None = None,
                step: int = 1) -> tuple[dict[str, int], int]:
    """Widths minimising the summed loss with the model's exact total within ``fraction`` of ``total_before``.

    ``losses[producer][k]`` is the chain's loss at k = 0..C in one currency; widths are ``kept_widths(C, step)``.
    ``price`` gives each module's cost (default: the exact MACs or parameters, by ``kind``). Returns the widths
    and the total they give.
    """
    price = price or counted_price(model, chains, kind, per_layer_macs)
    full = {c.producer: c.channels for c in chains}
    fixed = total_before - priced_total(chains, price, {})
    budget = math.floor(fraction * total_before)
    charged = touches(chains)
    owned = {c.producer: {n: t for n, t in charged.items() if t.owner == c.producer} for c in chains}
    widths, best = dict(full), None
    for _ in range(ROUNDS):
        options = [chain_options(c, losses[c.producer], owned[c.producer], widths, kind, price, step) for c in chains]
        try:
            choice, _ = allocate(options, kind, budget, fixed)
        except RankcutError:
            break
        chosen = {o.name: int(o.ranks[choice[o.name]]) for o in options}
        total = fixed + priced_total(chains, price, chosen)
        loss = sum(float(losses[p][k]) for p, k in chosen.items())
        if total <= budget and (best is None or loss < best[0]):
            best = (loss, chosen, total)
        if chosen == widths:
            break
        widths = chosen
    if best is None:  # coarse --round-channels steps can defeat the pricing: widen from the narrowest instead
        narrowest = {c.producer: int(kept_widths(c.channels, step)[0]) for c in chains}
        total = fixed + priced_total(chains, price, narrowest)
        if total > budget:
            raise RankcutError(f"no allocation of channels fits the budget of {budget:,} {kind}")
        best = (None, narrowest, total)
    return _fill(chains, losses, best[1], best[2], fixed, budget, price, step)


def _fill(chains: list[Chain], losses: dict[str, np.ndarray], widths: dict[str, int], total: int, fixed: int,
          budget: int, price: Price, step: int) -> tuple[dict[str, int], int]:
    """Spend what the allocation left: widen by one step the chain that buys the most loss per unit, at exact cost."""
    while True:
        best = None
        for c in chains:
            k = widths[c.producer]
            wider = min(k + step, c.channels)
            gain = float(losses[c.producer][k] - losses[c.producer][wider]) if k < c.channels else 0.0
            if gain <= 0:
                continue
            trial = {**widths, c.producer: wider}
            cost = fixed + priced_total(chains, price, trial)
            if cost <= budget and (best is None or gain / max(cost - total, 1) > best[0]):
                best = (gain / max(cost - total, 1), trial, cost)
        if best is None:
            return widths, total
        _, widths, total = best
