"""Global rank allocation (project --macs / --params): exact costs, budgets met, optimal where checkable."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

from rankcut.compress.budget import (
    LayerOptions,
    _frontier,
    _lagrangian,
    allocate,
    comparable_loss,
    layer_options,
    plan_budget,
    ranks_from_keep,
)
from rankcut.compress.methods import target_basis
from rankcut.compress.project import project_model
from rankcut.errors import RankcutError
from rankcut.files.statsfile import LayerStats
from rankcut.model import archs
from rankcut.model.contract import InputContract
from rankcut.model.cost import count_macs, count_params
from rankcut.model.edits import get_module
from rankcut.model.layers import LowRank, current_rank, out_width
from rankcut.model.targets import select
from rankcut.stats.collect import Moments

SMALL = InputContract((3, 64, 64), archs.IMAGENET_MEAN, archs.IMAGENET_STD)


def synthetic_stats(model: nn.Module, targets, spectrum) -> dict[str, LayerStats]:
    """Statistics whose output covariance has eigenvalues ``spectrum(name, channels)`` (no data pass)."""
    g = torch.Generator().manual_seed(0)
    stats = {}
    for t in targets:
        c = out_width(get_module(model, t.name))
        eig = torch.as_tensor(spectrum(t.name, c), dtype=torch.float64)
        q, _ = torch.linalg.qr(torch.randn(c, c, generator=g, dtype=torch.float64))
        count = 100.0
        stats[t.name] = LayerStats(t, Moments(count, torch.randn(c, generator=g, dtype=torch.float64),
                                              count * (q * eig) @ q.T))
    return stats


def geometric(ratio: float):
    return lambda name, c: ratio ** np.arange(c)


def resnet18():
    torch.manual_seed(0)
    model = archs.build("torchvision:resnet18", {}).eval()
    g = torch.Generator().manual_seed(1)
    for m in model.modules():  # non-trivial BatchNorms, so folding changes the weights
        if isinstance(m, nn.BatchNorm2d):
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model


def mixed(name: str, c: int):
    """Steeper spectra in some layers than in others, so the allocation has something to choose."""
    return (0.75 + 0.24 * ((sum(map(ord, name)) % 7) / 6)) ** np.arange(c)


def measured(model: nn.Module, contract: InputContract, kind: str) -> int:
    return count_macs(model, contract)[0] if kind == "macs" else count_params(model)


def project_to(model, targets, stats, ranks, method="pca"):
    """Project the targets whose rank changes, like the CLI does."""
    changed = [t for t in targets if ranks[t.name] < current_rank(get_module(model, t.name))]
    with torch.no_grad():
        project_model(model, changed, stats, method, ranks)


def bn_model():
    """Two target convs with BatchNorms (projection folds them in), a stride and a linear output layer:
    resnet18's cost structure in miniature, fast enough for the mutation run."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 24, 3, padding=1, bias=False), nn.BatchNorm2d(24), nn.ReLU(),
                          nn.Conv2d(24, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval()
    return model, InputContract((8, 8, 8), (0.0,) * 8, (1.0,) * 8)


@pytest.mark.parametrize("rounds", [1, 2])
@pytest.mark.parametrize("arch", ["resnet18", "bn_model"])
def test_cost_model_is_exact(rounds, arch):
    """Predicted MACs and parameters equal count_macs/count_params of the projected model, pairs re-projected too."""
    (model, contract), rng = (resnet18(), SMALL) if arch == "resnet18" else bn_model(), np.random.default_rng(0)
    assert all(t.bn for t in select(model, contract))  # the first round folds BatchNorms
    for _ in range(rounds):
        targets = select(model, contract)
        stats = synthetic_stats(model, targets, mixed)
        macs, per = count_macs(model, contract)
        params = count_params(model)
        options = [layer_options(model, t, per, comparable_loss("pca", target_basis(model, t, stats[t.name], "pca")))
                   for t in targets]
        pick = {o.name: int(rng.integers(len(o.ranks))) for o in options}  # whole (last index) included
        pick[options[0].name] = len(options[0].ranks) - 1
        pick[options[-1].name] = int(rng.integers(len(options[-1].ranks) - 1))  # a pair somewhere, whatever the draw
        want_macs = macs - sum(int(o.macs[-1] - o.macs[pick[o.name]]) for o in options)
        want_params = params - sum(int(o.params[-1] - o.params[pick[o.name]]) for o in options)
        project_to(model, targets, stats, {o.name: int(o.ranks[pick[o.name]]) for o in options})
        assert count_macs(model, contract)[0] == want_macs
        assert count_params(model) == want_params
    assert any(isinstance(get_module(model, t.name), LowRank) for t in targets)


@pytest.mark.parametrize("kind,fractions", [("macs", [0.5, 0.25, 0.125, 0.0625]), ("params", [0.5, 0.25, 0.1])])
def test_budget_is_met_on_resnet18(kind, fractions):
    base = resnet18()
    targets = select(base, SMALL)
    stats = synthetic_stats(base, targets, mixed)
    total, per = measured(base, SMALL, kind), count_macs(base, SMALL)[1]
    for fraction in fractions:
        model = resnet18()
        plan = plan_budget(model, targets, stats, "pca", kind, fraction, total, per)
        project_to(model, targets, stats, plan.ranks)
        got = measured(model, SMALL, kind)
        assert got == plan.total, f"{kind} {fraction}: predicted {plan.total:,}, measured {got:,}"
        assert 0.98 * fraction * total <= got <= fraction * total, f"{kind} {fraction}: {got / total:.4f} of the model"
        assert plan.note is None


def test_repeated_budget_is_relative_to_the_input():
    model = resnet18()
    for fraction in (0.5, 0.5):
        targets = select(model, SMALL)
        stats = synthetic_stats(model, targets, mixed)
        before, per = count_macs(model, SMALL)
        plan = plan_budget(model, targets, stats, "pca", "macs", fraction, before, per)
        project_to(model, targets, stats, plan.ranks)
        after = count_macs(model, SMALL)[0]
        assert 0.98 * fraction * before <= after <= fraction * before
    pairs = [get_module(model, t.name) for t in targets if isinstance(get_module(model, t.name), LowRank)]
    assert pairs and all(isinstance(p.down, nn.Conv2d) and isinstance(p.up, nn.Conv2d) for p in pairs)


def two_layer_model():
    """Two target convs of different geometry (and a linear output layer, which is not a target)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval()
    return model, InputContract((8, 8, 8), (0.0,) * 8, (1.0,) * 8)


@pytest.mark.parametrize("kind", ["macs", "params"])
@pytest.mark.parametrize("flat", ["0", "2"])
def test_matches_brute_force_optimum(kind, flat):
    """Flat spectrum in one layer, steep in the other: the allocation equals the best of all rank pairs."""
    model, contract = two_layer_model()
    targets = select(model, contract)
    assert [t.name for t in targets] == ["0", "2"]
    stats = synthetic_stats(model, targets, lambda name, c: np.ones(c) if name == flat else 0.7 ** np.arange(c))
    total = measured(model, contract, kind)
    per = count_macs(model, contract)[1]
    a, b = [layer_options(model, t, per, comparable_loss("pca", target_basis(model, t, stats[t.name], "pca")))
            for t in targets]
    fixed = total - int(a.cost(kind)[-1]) - int(b.cost(kind)[-1])
    cost = fixed + a.cost(kind)[:, None] + b.cost(kind)[None, :]
    loss = a.loss[:, None] + b.loss[None, :]
    checked, kinds = 0, set()
    for fraction in np.linspace(0.06, 0.98, 47):
        budget = int(fraction * total)
        if cost.min() > budget:
            with pytest.raises(RankcutError, match="below what rank 1"):
                allocate([a, b], kind, budget, fixed)
            continue
        best = loss[cost <= budget].min()
        choice, note = allocate([a, b], kind, budget, fixed)
        i, j = choice["0"], choice["2"]
        assert cost[i, j] <= budget
        assert loss[i, j] == pytest.approx(best, abs=1e-12), (
            f"{kind} {fraction:.3f}: ranks {a.ranks[i]}, {b.ranks[j]} lose {loss[i, j]:.6f}, optimum {best:.6f}")
        assert (note is None) == (cost[i, j] >= 0.98 * budget), note
        checked += 1
        kinds.add((i == len(a.ranks) - 1, j == len(b.ranks) - 1))
    assert checked > 30
    assert {(False, False), (True, False)} <= kinds or {(False, False), (False, True)} <= kinds, kinds


def test_concentrated_spectrum_is_cut_harder():
    """Two layers of one geometry: the one whose variance is concentrated keeps fewer directions."""
    model = resnet18()
    targets = select(model, SMALL)
    macs, per = count_macs(model, SMALL)
    a, b = "layer1.0.conv1", "layer1.0.conv2"

    def ranks(steep: str) -> dict[str, int]:
        spectrum = lambda name, c: (0.6 if name == steep else 0.99 if name in (a, b) else 0.9) ** np.arange(c)
        stats = synthetic_stats(model, targets, spectrum)
        return plan_budget(model, targets, stats, "pca", "macs", 0.4, macs, per).ranks

    first, second = ranks(a), ranks(b)
    assert first[a] < first[b] / 2 and second[b] < second[a] / 2
    assert (first[a], first[b]) == (second[b], second[a])


def test_loss_currency():
    """pca compares variance fractions (scale-free); fisher compares raw predictions (scale matters)."""
    model, contract = two_layer_model()
    targets = select(model, contract)
    macs, per = count_macs(model, contract)

    def stats_with(scale: float) -> dict[str, LayerStats]:
        stats = synthetic_stats(model, targets, lambda name, c: 0.8 ** np.arange(c) * (scale if name == "2" else 1))
        for s in stats.values():
            c = s.channels
            s.grad = {"grad_count": torch.tensor(10.0, dtype=torch.float64), "hessian": torch.eye(c, dtype=torch.float64),
                      "grad_m2": 10 * torch.eye(c, dtype=torch.float64)}
        return stats

    def plan(method: str, scale: float) -> dict[str, int]:
        return plan_budget(model, targets, stats_with(scale), method, "macs", 0.3, macs, per).ranks

    assert plan("pca", 1.0) == plan("pca", 1000.0)
    assert plan("fisher", 1000.0)["2"] > plan("fisher", 1.0)["2"]
    stats = stats_with(1.0)
    for method in ("pca", "svd", "l1"):
        loss = comparable_loss(method, target_basis(model, targets[1], stats["2"], method))
        assert loss[0] == pytest.approx(1.0) and loss[-1] == 0 and np.all(np.diff(loss) <= 1e-12)
    basis = target_basis(model, targets[1], stats["2"], "fisher")
    np.testing.assert_array_equal(comparable_loss("fisher", basis), basis.loss.numpy())
    with pytest.raises(RankcutError, match="random predicts no loss"):
        plan("random", 1.0)


def menu(name: str, costs, losses) -> LayerOptions:
    """A hand-made layer menu (ranks 1..n; MACs and parameters both ``costs``)."""
    costs = np.array(costs, dtype=np.int64)
    return LayerOptions(name, np.arange(1, len(costs) + 1), costs, costs.copy(), np.array(losses, dtype=np.float64))


def test_frontier_is_the_lower_convex_hull_without_dominated_or_collinear_points():
    cost = np.array([1, 2, 3, 4, 5, 5, 7])
    loss = np.array([10.0, 9.0, 5.0, 4.5, 1.0, 2.0, 1.0])  # (5, 2) and (7, 1) are dominated by (5, 1)
    assert _frontier(cost, loss) == [0, 2, 4]
    assert _frontier(np.array([3, 1, 2]), np.array([2.0, 4.0, 3.0])) == [1, 0]  # collinear: the middle goes
    assert _frontier(np.array([4, 4]), np.array([1.0, 0.5])) == [1]  # same cost: the less lossy one


@pytest.mark.parametrize("unit", [1, 7, 7 * 1009])
def test_allocate_matches_brute_force_on_random_menus(unit):
    """Three layers with non-convex menus (options off the hull), many budgets: the least summed loss that fits.

    Costs are multiples of ``unit``: 1 (steps of 1 happen), 7, and 7063, where the slack is past the knapsack's
    16384 cells and only counting in the costs' common divisor keeps it exact."""
    seed = unit
    rng = np.random.default_rng(seed)
    for trial in range(25):
        layers = []
        for i in range(3):
            n = int(rng.integers(2, 6))
            costs = np.sort(rng.choice(np.arange(1, 60), n, replace=False)) * unit
            losses = np.sort(rng.random(n))[::-1].copy()
            losses[-1] = 0.0
            layers.append(menu(f"l{i}", costs, losses))
        fixed = int(rng.integers(0, 100)) * unit
        combos = list(itertools.product(*[range(len(o.ranks)) for o in layers]))
        total = {c: fixed + sum(int(o.macs[j]) for o, j in zip(layers, c)) for c in combos}
        loss = {c: sum(float(o.loss[j]) for o, j in zip(layers, c)) for c in combos}
        for budget in np.linspace(min(total.values()), max(total.values()) + 50 * unit, 9).astype(np.int64):
            best = min(loss[c] for c in combos if total[c] <= budget)
            choice, note = allocate(layers, "macs", int(budget), fixed)
            got = tuple(choice[o.name] for o in layers)
            assert total[got] <= budget, f"seed {seed} trial {trial} budget {budget}: {total[got]} over"
            assert loss[got] == pytest.approx(best, abs=1e-12), f"seed {seed} trial {trial} budget {budget}"
            assert (note is None) == (total[got] >= 0.98 * budget), f"seed {seed} trial {trial}: {note}"


def test_allocate_with_coarse_knapsack_units_stays_within_the_budget():
    """Costs far past the knapsack's 16384 cells: its rounded units never let the answer exceed the budget."""
    rng = np.random.default_rng(1)
    layers = [menu(f"l{i}", np.sort(rng.choice(10 ** 9, 6, replace=False)) + 1, np.linspace(1, 0, 6)) for i in range(4)]
    for fraction in (0.3, 0.5, 0.8):
        budget = int(fraction * sum(int(o.macs[-1]) for o in layers))
        choice, _ = allocate(layers, "macs", budget, 0)
        assert sum(int(o.macs[choice[o.name]]) for o in layers) <= budget


def test_allocate_explains_an_unreachable_or_unspent_budget():
    with pytest.raises(RankcutError) as e:
        allocate([menu("a", [1000, 3000], [1, 0]), menu("b", [2000, 2500], [1, 0])], "params", 3999, 1000)
    assert str(e.value) == ("the budget (3,999 params) is below what rank 1 in every selected layer can reach "
                            "(4,000 params); raise it or select more layers")
    choice, note = allocate([menu("a", [100, 300], [1.0, 0.0])], "macs", 1000, 0)
    assert choice == {"a": 1} and note == ("700 macs of the budget stay unused (70.0%): every layer is already at "
                                           "its least lossy option")
    choice, note = allocate([menu("a", [1000, 5000], [1.0, 0.0]), menu("b", [2000, 2500], [1.0, 0.5])],
                            "macs", 6000, 0)
    assert choice == {"a": 0, "b": 1} and note == (
        "2,500 macs of the budget stay unused (41.7%): the cheapest step that lowers the predicted loss "
        "(a to rank 2) costs 4,000 macs")


def test_allocate_walks_down_the_menus_as_the_budget_shrinks():
    """A hand-made pair of menus with one best answer per budget (no ties to break)."""
    a = menu("a", [10, 20, 30], [1.0, 0.5, 0.0])
    b = menu("b", [10, 40], [1.0, 0.2])
    assert allocate([a, b], "macs", 50, 0)[0] == {"a": 2, "b": 0}  # loss 1.0; a rank 1 with b whole: 1.2
    assert allocate([a, b], "macs", 60, 0)[0] == {"a": 1, "b": 1}  # loss 0.7
    assert allocate([a, b], "macs", 70, 0)[0] == {"a": 2, "b": 1}  # loss 0.2: everything as it is
    # Equal loss 1 either way: the total nearer the budget wins (35, from the knapsack; the Lagrangian stops at 30).
    assert allocate([menu("a", [10, 25], [1.0, 0.0]), menu("b", [10, 20], [1.0, 0.0])], "macs", 35, 0)[0] == {
        "a": 1, "b": 0}


def test_lagrangian_walks_down_the_hulls_from_the_least_lossy_options():
    """The Lagrangian solver alone (in ``allocate`` the knapsack and the fix-up would hide its mistakes)."""
    a = menu("a", [10, 20, 30], [1.0, 0.5, 0.0])  # collinear: its hull is the two ends
    b = menu("b", [10, 40], [1.0, 0.2])
    costs = [a.macs, b.macs]
    assert _lagrangian([a, b], costs, 70) == [2, 1]  # room for everything: lambda = 0
    assert _lagrangian([a, b], costs, 60) == [2, 0]  # b's segment is the cheaper loss per unit cost saved
    assert _lagrangian([a, b], costs, 30) == [0, 0]
    # The cheaper loss per unit cost saved goes first: a difference of losses over a difference of costs.
    a, b = menu("a", [10, 30], [1.0, 0.0]), menu("b", [10, 20], [1.0, 0.9])  # slopes 0.05 and 0.01
    assert _lagrangian([a, b], [a.macs, b.macs], 40) == [1, 0]
    a, b = menu("a", [1000, 1100], [1.0, 0.0]), menu("b", [1, 2], [1.0, 0.995])  # slopes 0.01 and 0.005
    assert _lagrangian([a, b], [a.macs, b.macs], 1101) == [1, 0]
    # Hulls of three vertices walk one step at a time; a one-option layer never moves.
    a, b, c = menu("a", [10, 20, 40], [1.0, 0.4, 0.0]), menu("b", [10, 30], [1.0, 0.5]), menu("c", [5], [0.0])
    layers = [a, b, c]
    assert _lagrangian(layers, [o.macs for o in layers], 65) == [1, 1, 0]  # a's 0.02 first, then b's 0.025
    assert _lagrangian(layers, [o.macs for o in layers], 55) == [1, 1, 0]
    assert _lagrangian(layers, [o.macs for o in layers], 35) == [1, 0, 0]


def test_allocate_reads_the_cost_column_its_budget_names():
    """MACs, parameters and measured latency are separate columns; each kind of budget reads its own."""
    def layer(latency):
        return LayerOptions("a", np.array([1, 2]), np.array([10, 40]), np.array([40, 10]), np.array([1.0, 0.0]),
                            np.array(latency))

    assert allocate([layer([25, 30])], "macs", 30, 0)[0] == {"a": 0}
    assert allocate([layer([25, 30])], "params", 30, 0)[0] == {"a": 1}
    assert allocate([layer([25, 30])], "latency", 30, 0)[0] == {"a": 1}
    assert allocate([layer([25, 35])], "latency", 30, 0)[0] == {"a": 0}


def test_ranks_from_keep_rounds_half_up_and_keeps_at_least_one():
    model, contract = two_layer_model()
    assert ranks_from_keep(model, ["0", "2"], 10.5 / 32) == {"0": 11, "2": 11}  # round() would give 10
    assert ranks_from_keep(model, ["0"], 0.001) == {"0": 1}
    assert ranks_from_keep(model, ["2"], 1.0) == {"2": 32}
    targets = select(model, contract)
    stats = synthetic_stats(model, targets, geometric(0.8))
    project_to(model, targets[1:], stats, {"2": 10})
    assert ranks_from_keep(model, ["0", "2"], 0.5) == {"0": 16, "2": 5}  # a pair: half its rank


def test_plan_budget_reports_what_it_chose():
    model, contract = bn_model()
    targets = select(model, contract)
    stats = synthetic_stats(model, targets, mixed)
    total = count_params(model)
    per = count_macs(model, contract)[1]
    plan = plan_budget(model, targets, stats, "pca", "params", 0.5, total, per)
    assert plan.kind == "params" and plan.fraction == 0.5 and plan.total_before == total
    assert plan.budget == math.floor(0.5 * total)
    assert plan.fixed == 32 * 10 + 10  # the linear output layer: not a target
    assert plan.total == plan.fixed + sum(plan.chosen(t.name)["params"] for t in targets) <= plan.budget
    assert plan.loss == pytest.approx(sum(plan.chosen(t.name)["loss"] for t in targets))
    assert plan.ranks == {t.name: plan.chosen(t.name)["rank"] for t in targets}
    for o in plan.layers:
        i = plan.choice[o.name]
        assert plan.chosen(o.name) == {"rank": int(o.ranks[i]), "loss": float(o.loss[i]), "macs": int(o.macs[i]),
                                       "params": int(o.params[i])}
    assert sorted(plan.bases) == sorted(t.name for t in targets)
    whole = plan_budget(model, targets, stats, "pca", "params", 1.0, total, per,
                        adjust=lambda o: LayerOptions(o.name, o.ranks[-1:], o.macs[-1:], o.params[-1:], o.loss[-1:]))
    assert whole.ranks == {"0": 24, "3": 32} and whole.total == total and whole.loss == 0
    for s in stats.values():  # the method's options reach its bases: fisher's damping scales its loss here
        s.grad = {"grad_count": torch.tensor(1.0, dtype=torch.float64), "grad_m2": torch.eye(s.channels, dtype=torch.float64),
                  "hessian": torch.eye(s.channels, dtype=torch.float64)}
    damped = plan_budget(model, targets, stats, "fisher", "params", 0.5, total, per, options={"damping": 0.5})
    for t in targets:
        want = target_basis(model, t, stats[t.name], "fisher", {"damping": 0.5}).loss
        torch.testing.assert_close(damped.bases[t.name].loss, want, rtol=1e-12, atol=0)
    with pytest.raises(RankcutError, match=r"^--method random predicts no loss, so it cannot share a budget: use "
                       r"--keep, or a method with a predicted loss \(pca, hessian, fisher, svd, l1\)$"):
        plan_budget(model, targets, stats, "random", "params", 0.5, total, per)
