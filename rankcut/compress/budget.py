"""How many directions each layer keeps: a uniform fraction (``--keep``) or a global budget (``--macs``/``--params``).

A global budget is a fraction of the whole model's MACs or parameters. Each selected layer has a menu of
options: a rank-k pair for every k whose pair saves MACs (DESIGN §4), or staying as it is (whole, or the
pair it already is) at zero predicted loss. Each option has an exact cost (from the layer's geometry) and
a predicted loss in one currency shared by all layers:

- methods registered with ``budget="raw"`` (fisher, hessian): the method's own prediction (output-loss units);
- ``budget="fraction"`` (pca, svd, l1): the discarded fraction of what the method measures, ``loss[k] / loss[0]``
  (output variance, weight energy, filter L1 mass);
- ``budget=None`` (random) predicts nothing, so it cannot share a budget.

``allocate`` minimises the summed loss under the budget: the Lagrangian sweep (every layer picks the option
minimising ``loss + lambda * cost``, solved exactly on each layer's lower convex hull) beside a small
knapsack that also sees the options off the hull, each followed by a greedy fix-up that spends what is
left; the better answer wins. The total never exceeds the budget, and lands within 2% below it unless
one step of the layers that could still use it costs more than that (``Allocation.note`` says so).
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import numpy as np
from torch import nn

from rankcut.errors import RankcutError
from rankcut.model.cost import geometry, pair_saves, target_cost
from rankcut.model.edits import get_module
from rankcut.model.layers import current_rank
from rankcut.model.targets import Target
from rankcut.compress.methods import METHODS, Basis, Method, foldable_bn, get_method, target_basis
from rankcut.stats.moments import LayerStats

BUDGET_KINDS = ("macs", "params", "latency")  # latency: measured, from a profile (compress/timed.py)
NEAR = 0.02  # the allocation should land within this fraction below the budget


def no_loss(method: Method) -> str:
    """Why ``method`` cannot share a budget (it predicts no loss)."""
    able = ", ".join(m.name for m in METHODS.values() if m.budget)
    return (f"--method {method.name} predicts no loss, so it cannot share a budget: use --keep, or a method with a "
            f"predicted loss ({able})")


def ranks_from_keep(model: nn.Module, names: list[str], keep: float) -> dict[str, int]:
    """``round(keep x current rank)`` for every named layer, at least 1 (``--keep``)."""
    return {n: max(1, math.floor(keep * current_rank(get_module(model, n)) + 0.5)) for n in names}


# ---------------------------------------------------------------------------------------------- costs


def whole_cost(model: nn.Module, target: Target, per_layer_macs: dict[str, int]) -> tuple[int, int]:
    """(MACs, parameters) of a target as it is now, with the BatchNorm a projection would fold into it."""
    macs, params = target_cost(model, target.name, per_layer_macs)
    bn = foldable_bn(model, target)
    if bn is not None:
        params += sum(p.numel() for p in bn.parameters())
        macs += per_layer_macs.get(target.bn, 0)
    return macs, params


# ---------------------------------------------------------------------------------------------- losses


def comparable_loss(method: Method | str, basis: Basis) -> np.ndarray:
    """``loss[k]`` for k = 0..C in the currency shared across layers (see the module docstring)."""
    method = get_method(method)
    if basis.loss is None or method.budget is None:
        raise RankcutError(no_loss(method))
    loss = basis.loss.double().numpy().copy()
    if method.budget == "raw":
        return loss
    return loss / loss[0] if loss[0] > 0 else np.zeros_like(loss)


# ---------------------------------------------------------------------------------------------- options


@dataclass(frozen=True)
class LayerOptions:
    """One layer's menu: ranks with their exact MACs, parameters and comparable loss.

    The last option is the layer as it is now (``ranks[-1] == current rank``, loss 0).
    """

    name: str
    ranks: np.ndarray
    macs: np.ndarray
    params: np.ndarray
    loss: np.ndarray
    latency: np.ndarray | None = None  # nanoseconds measured by a profile, when there is one

    def cost(self, kind: str) -> np.ndarray:
        return {"macs": self.macs, "params": self.params, "latency": self.latency}[kind]


def layer_options(model: nn.Module, target: Target, per_layer_macs: dict[str, int], loss: np.ndarray) -> LayerOptions:
    """Every rank with a profitable pair, plus "as now"; ``loss`` is the comparable loss for k = 0..C."""
    layer = get_module(model, target.name)
    geo = geometry(model, target.name, per_layer_macs)
    now = current_rank(layer)
    ks = [k for k in range(1, now) if pair_saves(layer, k)]
    macs_now, params_now = whole_cost(model, target, per_layer_macs)
    return LayerOptions(
        target.name,
        np.array(ks + [now], dtype=np.int64),
        np.array([geo.pair_macs(k) for k in ks] + [macs_now], dtype=np.int64),
        np.array([geo.pair_params(k) for k in ks] + [params_now], dtype=np.int64),
        np.array([float(loss[k]) for k in ks] + [0.0]),
    )


# ---------------------------------------------------------------------------------------------- allocation


@dataclass
class Allocation:
    """The chosen option per layer and what it adds up to (predicted exactly by the cost model)."""

    kind: str
    fraction: float
    budget: int           # the most the whole model may cost
    total_before: int     # the whole model now
    fixed: int            # what the layers outside the budget's choice cost
    layers: list[LayerOptions]
    choice: dict[str, int]  # layer -> index into its options
    note: str | None = None
    bases: dict[str, Basis] | None = None  # what the losses came from, so projecting need not redo them

    @property
    def ranks(self) -> dict[str, int]:
        return {o.name: int(o.ranks[self.choice[o.name]]) for o in self.layers}

    @property
    def total(self) -> int:
        """The model's predicted total (MACs or parameters, by ``kind``) after projection."""
        return self.fixed + sum(int(o.cost(self.kind)[self.choice[o.name]]) for o in self.layers)

    @property
    def loss(self) -> float:
        return float(sum(o.loss[self.choice[o.name]] for o in self.layers))

    def chosen(self, name: str) -> dict:
        """Rank, comparable loss, MACs and parameters of the option chosen for layer ``name``."""
        o = next(o for o in self.layers if o.name == name)
        i = self.choice[name]
        return {"rank": int(o.ranks[i]), "loss": float(o.loss[i]), "macs": int(o.macs[i]), "params": int(o.params[i])}


def _frontier(cost: np.ndarray, loss: np.ndarray) -> list[int]:
    """Indices of the lower convex hull of (cost, loss), from the cheapest option to the least lossy.

    Dominated options (another is no dearer and no lossier) are dropped first; collinear points too.
    """
    order = sorted(range(len(cost)), key=lambda i: (cost[i], loss[i]))
    pareto: list[int] = []
    for i in order:
        if not pareto or loss[i] < loss[pareto[-1]]:
            if pareto and cost[i] == cost[pareto[-1]]:
                continue
            pareto.append(i)
    hull: list[int] = []
    for i in pareto:
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # b is above the segment a -> i (or on it): not a hull vertex
            if (loss[b] - loss[a]) * (cost[i] - cost[a]) >= (loss[i] - loss[a]) * (cost[b] - cost[a]):
                hull.pop()
            else:
                break
        hull.append(i)
    return hull


def allocate(layers: list[LayerOptions], kind: str, budget: int, fixed: int) -> tuple[dict[str, int], str | None]:
    """Option per layer minimising the summed loss with ``fixed + sum(costs) <= budget``; plus a note or None.

    Two solvers, the better answer wins (lower loss, then the total nearer the budget):

    - the Lagrangian sweep (DESIGN §5): for a multiplier lambda every layer takes the option minimising
      ``loss + lambda * cost``; as lambda grows a layer's choice walks down its lower convex hull, one vertex
      each time lambda passes the slope of the next hull segment. Rather than bisecting lambda numerically
      we take those breakpoints in order and stop at the first whose total meets the budget (the
      bisection's limit, no tolerance). Exact at the hull's vertices, but blind to options off the hull,
      and "stay whole" usually is off it: its cost jumps above the dearest profitable pair;
    - a knapsack over all options (dynamic programming on costs in units of their greatest common divisor,
      or of 1/16384 of the slack when that is finer, costs rounded up so the answer stays within budget):
      exact when the units are exact, within a few units otherwise.

    Each answer then gets a greedy fix-up: while the total stays within the budget, take the upgrade (any
    option) that buys the most loss per unit cost. That spends what the last step or the rounding left over.
    """
    costs = [o.cost(kind) for o in layers]
    floor = fixed + sum(int(c.min()) for c in costs)
    if floor > budget:
        raise RankcutError(f"the budget ({budget:,} {kind}) is below what rank 1 in every selected layer can reach "
                           f"({floor:,} {kind}); raise it or select more layers")
    best = None
    for solve in (_lagrangian, _knapsack):
        choice = solve(layers, costs, budget - fixed)
        total = _fix_up(layers, costs, choice, fixed + sum(int(c[j]) for c, j in zip(costs, choice)), budget)
        key = (round(sum(float(o.loss[j]) for o, j in zip(layers, choice)), 12), -total)
        if best is None or key < best[0]:
            best = (key, choice, total)
    _, choice, total = best
    return {o.name: j for o, j in zip(layers, choice)}, _shortfall_note(layers, costs, choice, total, budget, kind)


def _lagrangian(layers: list[LayerOptions], costs: list[np.ndarray], room: int) -> list[int]:
    """The Lagrangian choice with the smallest lambda whose layers' costs sum to at most ``room``."""
    hulls = [_frontier(c, o.loss) for c, o in zip(costs, layers)]
    pos = [len(h) - 1 for h in hulls]  # lambda = 0: every layer at its least lossy option
    spent = sum(int(c[h[p]]) for c, h, p in zip(costs, hulls, pos))

    def step(i: int) -> tuple[float, int]:
        h, c, loss = hulls[i], costs[i], layers[i].loss
        a, b = h[pos[i]], h[pos[i] - 1]
        return (loss[b] - loss[a]) / (c[a] - c[b]), i

    heap = [step(i) for i in range(len(layers)) if pos[i] > 0]
    heapq.heapify(heap)
    while spent > room:
        _, i = heapq.heappop(heap)
        c, h = costs[i], hulls[i]
        spent -= int(c[h[pos[i]]] - c[h[pos[i] - 1]])
        pos[i] -= 1
        if pos[i] > 0:
            heapq.heappush(heap, step(i))
    return [h[p] for h, p in zip(hulls, pos)]


KNAPSACK_CELLS = 1 << 14


def _knapsack(layers: list[LayerOptions], costs: list[np.ndarray], room: int) -> list[int]:
    """Minimum summed loss with the costs' sum at most ``room``, by dynamic programming over cost units."""
    extra = [c - c.min() for c in costs]
    slack = room - sum(int(c.min()) for c in costs)
    steps = np.concatenate([e[e > 0] for e in extra] + [np.zeros(1, dtype=np.int64)])
    unit = max(int(np.gcd.reduce(steps)), -(-slack // KNAPSACK_CELLS), 1)
    cells = slack // unit
    best = np.zeros(cells + 1)  # best[b]: least loss of the layers so far within b units
    picks = []
    for o, e in zip(layers, extra):
        units = -(-e // unit)
        new, pick = np.full(cells + 1, np.inf), np.zeros(cells + 1, dtype=np.int32)
        for j in np.flatnonzero(units <= cells):
            u = int(units[j])
            cand = best[: cells + 1 - u] + o.loss[j]
            better = cand < new[u:]
            new[u:][better], pick[u:][better] = cand[better], j
        best = new
        picks.append((pick, units))
    choice, b = [], cells
    for pick, units in reversed(picks):
        j = int(pick[b])
        choice.append(j)
        b -= int(units[j])
    return choice[::-1]


def _fix_up(layers: list[LayerOptions], costs: list[np.ndarray], choice: list[int], total: int, budget: int) -> int:
    """Spend the slack: repeatedly take the upgrade with the best loss reduction per unit cost that fits."""
    while True:
        slack = budget - total
        best = None
        for i, (o, c) in enumerate(zip(layers, costs)):
            now = choice[i]
            extra = c - c[now]
            gain = o.loss[now] - o.loss
            ok = (extra > 0) & (extra <= slack) & (gain >= 0)
            if not ok.any():
                continue
            ratio = np.where(ok, gain / np.where(ok, extra, 1), -np.inf)
            j = int(np.lexsort((extra, ratio))[-1])  # best ratio; among equals the biggest step
            key = (ratio[j], extra[j])
            if best is None or key > best[0]:
                best = (key, i, j)
        if best is None:
            return total
        _, i, j = best
        total += int(costs[i][j] - costs[i][choice[i]])
        choice[i] = j


def _shortfall_note(layers: list[LayerOptions], costs: list[np.ndarray], choice: list[int], total: int, budget: int,
                    kind: str) -> str | None:
    """Why the total lands more than 2% below the budget, or None when it does not."""
    if total >= (1 - NEAR) * budget:
        return None
    slack = budget - total
    steps = [(int(c[j] - c[i]), o.name, int(o.ranks[j])) for o, c, i in zip(layers, costs, choice)
             for j in range(len(c)) if c[j] > c[i] and o.loss[j] < o.loss[i]]
    if not steps:
        return (f"{slack:,} {kind} of the budget stay unused ({slack / budget:.1%}): every layer is already at its "
                f"least lossy option")
    cost, name, rank = min(steps)
    return (f"{slack:,} {kind} of the budget stay unused ({slack / budget:.1%}): the cheapest step that lowers the "
            f"predicted loss ({name} to rank {rank}) costs {cost:,} {kind}")


def plan_budget(model: nn.Module, targets: list[Target], stats: dict[str, LayerStats], method: Method | str, kind: str,
                fraction: float, total_before: int, per_layer_macs: dict[str, int],
                options: dict | None = None, adjust=None) -> Allocation:
    """Choose every target's rank so the model costs at most ``fraction`` of ``total_before`` (``--macs``/``--params``).

    ``total_before`` is the model's MACs or parameters (by ``kind``), ``per_layer_macs`` the per-leaf table
    of ``cost.count_macs``. ``options`` go to the method (``damping``, ``seed``); the caller validated them.
    ``adjust`` (LayerOptions -> LayerOptions) may drop options and attach latency costs
    (``compress.timed.timed_options``).
    """
    method = get_method(method)
    if method.budget is None:
        raise RankcutError(no_loss(method))
    layers, bases = [], {}
    for t in targets:
        bases[t.name] = target_basis(model, t, stats.get(t.name), method, options)
        layers.append(layer_options(model, t, per_layer_macs, comparable_loss(method, bases[t.name])))
        if adjust is not None:
            layers[-1] = adjust(layers[-1])
    whole = sum(int(o.cost(kind)[-1]) for o in layers)
    fixed = total_before - whole
    budget = math.floor(fraction * total_before)
    choice, note = allocate(layers, kind, budget, fixed)
    return Allocation(kind, fraction, budget, total_before, fixed, layers, choice, note, bases)
