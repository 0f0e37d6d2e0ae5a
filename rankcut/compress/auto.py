"""``--structure auto``: each target kept whole, made a rank-k pair, or (a chain producer) channel-pruned, chosen
jointly under a ``--macs``/``--params`` budget.

**One currency.** Both structures' losses are fisher's: the expected squared first-order change of the
network's loss (the ``stats --grad`` probe's) caused by the error ``e`` a structure puts into one layer's
output, ``E[(sum_p g_p^T e_p)^2] ~ tr(G Cov(e))``, with ``G`` the second moment of the gradient at that
output, summed over a sample's positions (``grad_m2 / grad_count``).

- A pair on target L errs in L's own output (after its BatchNorm): fisher's predicted loss,
  ``tr(G_L (I - M) Sigma_L (I - M)^T)`` (``methods.fisher``).
- A pruned chain P -> Q errs in Q's output, ``sum_t W_t e_a`` with ``e_a`` the least-squares reconstruction
  error of Q's input: ``tr(M_G R Sigma R^T)``, ``M_G = sum_t W_t^T G_Q W_t`` (``channels.loss_energy``), with
  the same damping of G as fisher's. G_Q is measured after Q's BatchNorm, so it is carried back to Q's own
  output through the BatchNorm's scale. The selection of the kept channels uses the same metric.

So ``auto`` needs statistics made with ``--grad`` and ``--structure channels``, its pairs are fisher's, and a
chain is offered only when its consumer is a measured target (not the output layer, unless ``stats
--layers`` named it); each chain not offered is reported with the reason.

**Which combinations.** A target takes one option: whole, a pair of rank r, or (a chain producer) k kept
channels. Never a pair *and* a pruned producer: the pair's error is before the non-linearity, the
selection's after it, and the least-squares reconstruction of the dropped channels assumes the kept ones
exact, which the pair breaks; neither prediction covers the compound. Allowed: a pair that consumes a
pruned chain (channels are removed first, then the refitted consumer is factorised, its ``down`` reading
the kept channels), and a pruned producer that consumes another pruned chain.

**Joint costs, greedy allocation.** The cost of a choice is not separable: a producer's width scales its
consumer's input side, whether the consumer stays whole or is a pair (``k_in x kh x kw`` inputs per
``down`` filter). So every move is priced on the joint state, exactly (``JointCost``: the integer cost
model of ``channel_budget`` plus pairs on narrowed inputs), and the allocation is greedy over that state:
from everything whole it repeatedly takes, among every target's other options, the move that adds the
least predicted loss per unit of cost saved (a move that saves and lowers the loss first), until the
total fits; then it spends what is left on the upgrades that remove the most loss per unit of cost.
Greedy marginal steps instead of the pair budget's Lagrangian/knapsack, because those need a cost that is
a sum of per-layer terms; a move re-prices only the targets whose cost it changed (itself, the producer
feeding it, the consumer it feeds). Losses add: a plan's predicted loss is the sum of its targets'
predictions (the cross term of a pair on a pruned input is ignored).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from rankcut.compress.budget import comparable_loss
from rankcut.compress.channel_budget import Touch, module_cost, touches
from rankcut.compress.channels import prune_chain, select
from rankcut.compress.methods import foldable_bn, get_method, target_basis
from rankcut.compress.project import project_model
from rankcut.errors import RankcutError
from rankcut.files.statsfile import StatsFile
from rankcut.model.contract import InputContract
from rankcut.model.cost import Geometry, count_macs, count_params, geometry, target_cost
from rankcut.model.edits import Edit, get_module
from rankcut.model.graph import Chain
from rankcut.model.layers import current_rank
from rankcut.model.targets import Target

WHOLE, PAIR, CHANNELS = "whole", "pair", "channels"
METHOD = "fisher"
MENU = 64  # at most this many sizes per structure and layer: wider layers step by ceil(width / MENU)
UNITS = "output change (fisher's currency)"


@dataclass(frozen=True)
class Choice:
    """One target's option: its structure and size (a pair's rank, kept channels, or its current rank if whole)."""

    structure: str
    size: int


def consumer_metric(model: nn.Module, chain: Chain, stats: StatsFile, damping: float) -> torch.Tensor | str:
    """G at the chain consumer's own output (before its BatchNorm), damped as fisher's; or why there is none."""
    layer = stats.layers.get(chain.consumer)
    if layer is None:
        return (f"its consumer {chain.consumer} has no statistics, so its loss cannot be priced in fisher's currency "
                "(the output layer is measured only when stats --layers names it)")
    if "grad_m2" not in layer.grad:
        return f"its consumer {chain.consumer} has no gradient statistics (stats --grad kl)"
    g = layer.grad["grad_m2"].double() / layer.grad["grad_count"].double().clamp_min(1)
    g = g + torch.eye(len(g), dtype=g.dtype) * damping * max(g.trace().item() / len(g), 1e-300)
    bn = foldable_bn(model, layer.target)
    if bn is not None:  # the BatchNorm scales each output: its error, and the gradient seen through it
        scale = 1 / torch.sqrt(bn.running_var.double() + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight.detach().double()
        g = scale[:, None] * g * scale[None, :]
    return g


class JointCost:
    """Exact (MACs, parameters) of every module a choice changes, at any joint state of the targets.

    A state maps each target to a ``Choice``. A module's cost depends on its own target's choice and on the
    width of the chain feeding it, so ``hood[n]`` (the modules whose cost target n's choice moves) is: n,
    its BatchNorm (folded away when n is a pair), the modules its chain carries, and its chain's consumer.
    """

    def __init__(self, model: nn.Module, targets: list[Target], chains: list[Chain], per_layer_macs: dict[str, int]):
        self.model, self.per_layer = model, per_layer_macs
        self.targets = {t.name for t in targets}
        self.chains = {c.producer: c for c in chains}
        self.full = {c.producer: c.channels for c in chains}
        self.touch = touches(chains)
        self.folded_by = {t.bn: t.name for t in targets if foldable_bn(model, t) is not None}
        self.feeds = {c.consumer: c.producer for c in chains}
        self.geometry = {t.name: geometry(model, t.name, per_layer_macs) for t in targets}
        self.hood = {}
        for t in targets:
            chain = self.chains.get(t.name)
            names = [t.name, *([t.bn] if t.bn in self.folded_by else [])]
            names += [] if chain is None else [*chain.carried, chain.consumer]
            self.hood[t.name] = list(dict.fromkeys(names))
        self.modules = list(dict.fromkeys(m for names in self.hood.values() for m in names))
        self.cache: dict[tuple, tuple[int, int]] = {}

    def widths(self, state: dict[str, Choice]) -> dict[str, int]:
        return {p: state[p].size if state[p].structure == CHANNELS else c for p, c in self.full.items()}

    def module(self, name: str, state: dict[str, Choice], widths: dict[str, int]) -> tuple[int, int]:
        """(MACs, parameters) of one module in ``state`` (cached by what it depends on)."""
        touch, folder = self.touch.get(name), self.folded_by.get(name)
        key = (name, state.get(name), folder is not None and state[folder].structure == PAIR,
               widths.get(touch.out_of) if touch else None, widths.get(self.feeds.get(name) or (touch and touch.in_of)))
        if key not in self.cache:
            self.cache[key] = self._module(name, state, widths)
        return self.cache[key]

    def _module(self, name: str, state: dict[str, Choice], widths: dict[str, int]) -> tuple[int, int]:
        choice = state.get(name)
        if choice is not None and choice.structure == PAIR:
            geo, feeder = self.geometry[name], self.feeds.get(name)
            fan_in = geo.fan_in if feeder is None else geo.fan_in * widths[feeder] // self.full[feeder]
            pair = Geometry(fan_in, geo.width, geo.positions)
            return pair.pair_macs(choice.size), pair.pair_params(choice.size)
        if name in self.folded_by and state[self.folded_by[name]].structure == PAIR:
            return 0, 0  # a BatchNorm folded into its pair
        if name in self.targets and name not in self.touch:
            return target_cost(self.model, name, self.per_layer)
        touch = self.touch.get(name) or Touch(channelwise=True)  # else: an untouched BatchNorm
        return module_cost(get_module(self.model, name), name, touch, widths, self.full, self.per_layer)

    def cost(self, names: list[str], state: dict[str, Choice]) -> np.ndarray:
        widths = self.widths(state)
        macs = params = 0
        for n in names:
            m, p = self.module(n, state, widths)
            macs, params = macs + m, params + p
        return np.array([macs, params], dtype=np.int64)

    def deltas(self, name: str, choices: list[Choice], state: dict[str, Choice]) -> np.ndarray:
        """(options x 2) change of (MACs, parameters) if target ``name`` took each of ``choices``."""
        hood, now = self.hood[name], state[name]
        before = self.cost(hood, state)
        out = np.empty((len(choices), 2), dtype=np.int64)
        for i, choice in enumerate(choices):
            state[name] = choice
            out[i] = self.cost(hood, state) - before
        state[name] = now
        return out

    def dependents(self, name: str) -> set[str]:
        """The targets whose moves cost differently after ``name`` moves."""
        chain = self.chains.get(name)
        near = {name, self.feeds.get(name), None if chain is None else chain.consumer}
        return near & self.targets


def allocate_joint(cost: JointCost, menus: dict[str, list[tuple[Choice, float]]], kind: str, budget: int,
                   total: int) -> tuple[dict[str, Choice], int]:
    """A choice per target with the joint total at most ``budget``, by greedy marginal steps (module docstring).

    ``menus[name]``: the target's options with their predicted losses, the first the target as it is
    (loss 0); ``total``: the model's total now. Returns the choices and the total they give.
    """
    index = 0 if kind == "macs" else 1
    state = {n: menu[0][0] for n, menu in menus.items()}
    loss = {n: 0.0 for n in menus}
    table = {n: [c for c, _ in menu] for n, menu in menus.items()}
    losses = {n: np.array([v for _, v in menu]) for n, menu in menus.items()}
    moves: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def price(n: str) -> None:
        moves[n] = (cost.deltas(n, table[n], state)[:, index], losses[n] - loss[n])

    def take(n: str, i: int) -> None:
        nonlocal total
        total += int(moves[n][0][i])
        state[n], loss[n] = table[n][i], float(losses[n][i])
        for m in cost.dependents(n):
            price(m)

    for n in menus:
        price(n)
    while total > budget:  # cut: least added loss per unit saved; among equals the biggest saving
        best = None
        for n, (d, dl) in moves.items():
            ok = d < 0
            if ok.any():
                ratio = np.where(ok, dl / np.where(ok, -d, 1), np.inf)
                i = int(np.lexsort((d, ratio))[0])
                if best is None or (ratio[i], d[i]) < best[0]:
                    best = ((ratio[i], d[i]), n, i)
        if best is None:
            raise RankcutError(f"the budget ({budget:,} {kind}) is below what the smallest option of every selected "
                               f"layer reaches ({total:,} {kind}); raise it or select more layers")
        take(best[1], best[2])
    while True:  # fill: most loss removed per unit spent, within the budget
        best = None
        for n, (d, dl) in moves.items():
            ok = (dl < 0) & (d <= budget - total)
            if ok.any():
                gain = np.where(ok, -dl / np.maximum(d, 1) + np.where(d <= 0, np.inf, 0), -np.inf)
                i = int(np.argmax(gain))
                if best is None or gain[i] > best[0]:
                    best = (gain[i], n, i)
        if best is None:
            return state, total
        take(best[1], best[2])


@dataclass
class AutoResult:
    """What ``--structure auto`` did: the edits to record, a row per target, the chains not offered, totals."""

    budget: tuple[str, float]
    edits: list[Edit]
    layers: list[dict]
    refused: dict[str, str]
    totals: dict
    loss: float           # the allocation's predicted loss (sum of the chosen options' losses)

    def history(self) -> dict:
        counts = {s: sum(r["structure"] == s for r in self.layers) for s in (PAIR, CHANNELS)}
        return {"structure": "auto", "method": METHOD, self.budget[0]: self.budget[1], "pairs": counts[PAIR],
                "chains": counts[CHANNELS]}

    def to_dict(self) -> dict:
        return {"structure": "auto", "method": METHOD, "budget": {"kind": self.budget[0], "fraction": self.budget[1]},
                "layers": self.layers, "refused": self.refused, "loss": self.loss, "loss_units": UNITS,
                "totals": self.totals}


@dataclass
class Candidates:
    """What the allocation chooses from: the chains offered (with their consumer's metric), their greedy
    selections, every target's fisher basis, the menus of options with their losses, and the chains refused."""

    targets: list[Target]
    offered: dict[str, tuple[Chain, torch.Tensor]]
    selections: dict
    bases: dict
    menus: dict[str, list[tuple[Choice, float]]]
    refused: dict[str, str]


def candidates(model: nn.Module, stats: StatsFile, targets: list[Target], chains: list[Chain], refused: dict[str, str],
               options: dict, round_channels: int = 1) -> Candidates:
    """Every target's options and their losses: whole, pairs of rank r < its rank, and channels k < C (in steps
    of ``round_channels``); a layer wider than ``MENU`` steps by ``ceil(width / MENU)``, which keeps each greedy
    step cheap and the number of steps small (resnet18: 512-channel layers step by 8)."""
    get_method(METHOD).check_stats(next(iter(stats.layers.values()), None))
    names = {t.name for t in targets}
    refused, offered = dict(refused), {}
    for c in chains:
        if c.producer not in names:
            continue
        metric = consumer_metric(model, c, stats, options["damping"])
        if isinstance(metric, str):
            refused[c.producer] = metric
        else:
            offered[c.producer] = (c, metric)
    with torch.no_grad():
        selections = {p: select(model, c, stats.chains[p].moments, metric) for p, (c, metric) in offered.items()}
        bases = {t.name: target_basis(model, t, stats.layers[t.name], METHOD, options) for t in targets}
    menus = {}
    for t in targets:
        now = current_rank(get_module(model, t.name))
        pair_loss = comparable_loss(METHOD, bases[t.name])
        grain = -(-now // MENU)
        menu = [(Choice(WHOLE, now), 0.0)] + [(Choice(PAIR, r), float(pair_loss[r])) for r in range(grain, now, grain)]
        if t.name in offered:
            curve, width = selections[t.name].loss, offered[t.name][0].channels
            step = max(round_channels, -(-width // MENU))
            menu += [(Choice(CHANNELS, k), float(curve[k])) for k in range(step, width, step)]
        menus[t.name] = menu
    return Candidates(targets, offered, selections, bases, menus, refused)


def apply_choices(model: nn.Module, stats: StatsFile, found: Candidates, state: dict[str, Choice],
                  options: dict) -> tuple[list[Edit], list[dict]]:
    """Make ``state`` in place: prune the chains first, then factorise the pairs (which may read pruned inputs).

    Returns the edits and a row per target with its structure, width before, size after and predicted loss.
    """
    edits = []
    rows = {t.name: {"layer": t.name, "structure": WHOLE, "width": found.menus[t.name][0][0].size,
                     "size": found.menus[t.name][0][0].size, "predicted_loss": 0.0} for t in found.targets}
    with torch.no_grad():
        for p, (chain, metric) in found.offered.items():
            if state[p].structure == CHANNELS:
                edit, loss = prune_chain(model, chain, stats.chains[p].moments,
                                         found.selections[p].kept(state[p].size), metric=metric)
                edits.append(edit)
                rows[p] |= {"structure": CHANNELS, "size": state[p].size, "predicted_loss": loss}
        paired = [t for t in found.targets if state[t.name].structure == PAIR]
        pair_edits, reports = project_model(model, paired, stats.layers, METHOD,
                                            {t.name: state[t.name].size for t in paired}, options,
                                            only_if_saves=False, bases=found.bases)
    for r in reports:
        rows[r.layer] |= {"structure": PAIR, "size": r.new_rank, "predicted_loss": r.predicted_loss}
    return edits + pair_edits, list(rows.values())


def auto_model(model: nn.Module, contract: InputContract, stats: StatsFile, targets: list[Target], chains: list[Chain],
               refused: dict[str, str], budget: tuple[str, float], options: dict, round_channels: int = 1) -> AutoResult:
    """Choose, jointly under ``budget`` (kind, fraction), whole / pair / channels for every target; apply in place.

    ``targets`` are the measured targets ``project`` works on, ``chains`` the measured chains (with ``refused``,
    why other layers are not producers); ``options`` fisher's (``damping``). Channel widths are multiples
    of ``round_channels``.
    """
    kind, fraction = budget
    found = candidates(model, stats, targets, chains, refused, options, round_channels)
    macs_before, per_layer = count_macs(model, contract)
    params_before = count_params(model)
    cost = JointCost(model, targets, [c for c, _ in found.offered.values()], per_layer)
    before = {"macs": macs_before, "params": params_before}[kind]
    state, _ = allocate_joint(cost, found.menus, kind, math.floor(fraction * before), before)
    now = {n: menu[0][0] for n, menu in found.menus.items()}
    predicted = np.array([macs_before, params_before]) - cost.cost(cost.modules, now) + cost.cost(cost.modules, state)
    planned = sum(v for n, menu in found.menus.items() for c, v in menu if c == state[n])
    edits, rows = apply_choices(model, stats, found, state, options)
    macs_after, params_after = count_macs(model, contract)[0], count_params(model)
    if [macs_after, params_after] != [int(v) for v in predicted]:  # the joint cost model is exact; this guards it
        raise RankcutError(f"internal error: the model has {macs_after:,} MACs and {params_after:,} parameters, the "
                           f"joint cost model predicted {int(predicted[0]):,} and {int(predicted[1]):,}; nothing written")
    totals = {"macs_before": macs_before, "macs_after": macs_after, "macs_ratio": macs_after / macs_before,
              "params_before": params_before, "params_after": params_after, "params_ratio": params_after / params_before}
    return AutoResult(budget, edits, rows, found.refused, totals, planned)
