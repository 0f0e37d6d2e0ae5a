"""``compress.refit``: the closed-form refit reaches exact solutions, changes nothing that is already right,
never increases its objective, re-estimates BatchNorm exactly, solves the same in its primal (Gram matrix)
and dual (rows) forms, and refuses what it cannot do."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import torch.nn.functional as F

from rankcut.api import DEFAULT_REFIT_DAMPING, RefitConfig, refit
from rankcut.compress.refit import (Problem, RefitTarget, Sums, _rows, gram, layer_sums, products_dtype, refit_one,
                                    refit_pair, teacher_cache_fits, teacher_outputs)
from rankcut.dist import Context
from rankcut.errors import RankcutError
from rankcut.model.archs import InputContract
from rankcut.model.edits import FoldBatchNorm, LowRankPair, set_module
from rankcut.model.layers import project_layer

CONTRACT = InputContract((2, 6, 6), (0.0, 0.0), (1.0, 1.0))


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.fc1 = nn.Linear(6 * 36, 8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv2(torch.relu(self.conv1(x)))))
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def _teacher(seed: int = 0, conv2_rank: int | None = None) -> nn.Module:
    torch.manual_seed(seed)
    model = Tiny()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.2, 0.2)
        model.bn.running_var.uniform_(0.5, 1.5)
        model.bn.weight.uniform_(0.5, 1.5)
        if conv2_rank is not None:  # a teacher whose conv2 is exactly rank conv2_rank
            w = torch.randn(6, conv2_rank) @ torch.randn(conv2_rank, 6 * 9) / 5
            model.conv2.weight.copy_(w.reshape(6, 6, 3, 3))
    return model.eval()


def _data(n: int = 96, seed: int = 1) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, *CONTRACT.shape, generator=g), torch.zeros(n, dtype=torch.long))


def _random_pair(model: nn.Module, name: str, rank: int, seed: int = 5) -> None:
    """Fold conv2's BatchNorm (as project does) and put a random rank-``rank`` pair in its place."""
    if name == "conv2":
        FoldBatchNorm("conv2", "bn").apply(model)
    LowRankPair(name, rank).apply(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.get_submodule(name).parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _outputs(model: nn.Module, data: TensorDataset) -> torch.Tensor:
    with torch.no_grad():
        return model(data.tensors[0])


def test_refit_reaches_an_exact_low_rank_solution():
    """conv2 is exactly rank 2 and its input is the teacher's: one round from a random pair reaches it."""
    teacher, data = _teacher(conv2_rank=2), _data()
    model = copy.deepcopy(teacher)
    _random_pair(model, "conv2", 2)
    assert (_outputs(model, data) - _outputs(teacher, data)).abs().max() > 1e-2
    result = refit(model, teacher, CONTRACT, data, RefitConfig(damping=0.0, rounds=1))
    (row,) = result.layers
    assert (row.layer, row.kind, row.capture, row.status) == ("conv2", "pair", "bn", "refit")
    assert row.error_before > 0.1 and row.error_after < 1e-9
    assert torch.allclose(_outputs(model, data), _outputs(teacher, data), atol=1e-5, rtol=0)


def test_refit_of_a_whole_layer_reaches_the_teacher_on_changed_inputs():
    """A changed plain layer (as a channel-pruned consumer is) is refitted to the teacher's weights exactly."""
    teacher, data = _teacher(), _data()
    model = copy.deepcopy(teacher)
    with torch.no_grad():
        model.fc2.weight.mul_(-2.0)
        model.fc2.bias.add_(1.0)
    result = refit(model, teacher, CONTRACT, data, RefitConfig(damping=0.0))
    assert [(r.layer, r.kind, r.status) for r in result.layers] == [("fc2", "layer", "refit")]
    assert torch.allclose(model.fc2.weight, teacher.fc2.weight, atol=1e-5)
    assert torch.allclose(_outputs(model, data), _outputs(teacher, data), atol=1e-5, rtol=0)


def test_refit_of_an_uncompressed_copy_changes_nothing():
    teacher, data = _teacher(), _data()
    model = copy.deepcopy(teacher)
    result = refit(model, teacher, CONTRACT, data, RefitConfig())
    assert result.layers == [] and result.batchnorms == []
    for key, value in teacher.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


@pytest.mark.parametrize("damping", [0.0, 1e-3])
def test_refit_of_full_rank_pairs_changes_nothing(damping):
    """keep=1.0: every pair reproduces its layer exactly, so refit leaves the outputs as they are (< 1e-6)."""
    teacher, data = _teacher(), _data()
    model = copy.deepcopy(teacher)
    FoldBatchNorm("conv2", "bn").apply(model)
    for name in ("conv1", "conv2", "fc1"):
        layer = model.get_submodule(name)
        width = layer.weight.shape[0]
        eye = torch.eye(width, dtype=torch.float64)
        set_module(model, name, project_layer(layer, eye, eye, torch.zeros(width)))
    before = _outputs(model, data)
    assert (before - _outputs(teacher, data)).abs().max() < 1e-5
    result = refit(model, teacher, CONTRACT, data, RefitConfig(damping=damping))
    assert [r.layer for r in result.layers] == ["conv1", "conv2", "fc1"]
    assert (_outputs(model, data) - before).abs().max() < 1e-6


def test_the_objective_never_increases_and_the_error_goes_down():
    """Upstream compressed too (conv1), so conv2 sees changed inputs; every half step lowers f or keeps it."""
    teacher, data = _teacher(), _data()
    model = copy.deepcopy(teacher)
    _random_pair(model, "conv1", 2, seed=3)
    _random_pair(model, "conv2", 2)
    _random_pair(model, "fc1", 3, seed=7)
    result = refit(model, teacher, CONTRACT, data, RefitConfig(damping=1e-2, rounds=4))
    assert [r.layer for r in result.layers] == ["conv1", "conv2", "fc1"]
    for row in result.layers:
        steps = row.objective
        assert len(steps) == 1 + 2 * 4
        assert all(b <= a + 1e-12 * abs(a) for a, b in zip(steps, steps[1:])), (row.layer, steps)
        assert steps[-1] < steps[0]
        assert row.error_after < row.error_before


def test_the_teachers_outputs_kept_from_one_pass_give_the_same_refit(monkeypatch):
    """Kept for all layers at once (the default where they fit) or the teacher run beside each layer's pass
    (``CACHE_BYTES`` 0): the same weights, bit for bit."""
    teacher, data = _teacher(), _data()
    model = copy.deepcopy(teacher)
    _random_pair(model, "conv1", 2, seed=3)
    _random_pair(model, "conv2", 2)
    _random_pair(model, "fc1", 3, seed=7)
    kept, alongside = copy.deepcopy(model), copy.deepcopy(model)
    refit(kept, teacher, CONTRACT, data, RefitConfig(batch_size=32))
    monkeypatch.setattr("rankcut.compress.refit.CACHE_BYTES", 0)
    refit(alongside, teacher, CONTRACT, data, RefitConfig(batch_size=32))
    for key, value in kept.state_dict().items():
        assert torch.equal(alongside.state_dict()[key], value), key


def test_bn_only_sets_the_exact_statistics_of_the_inputs():
    teacher, data = _teacher(), _data()
    model = copy.deepcopy(teacher)
    result = refit(model, None, CONTRACT, data, RefitConfig(bn_only=True, batch_size=10))
    assert result.batchnorms == ["bn"] and result.layers == []
    with torch.no_grad():
        z = teacher.conv2(torch.relu(teacher.conv1(data.tensors[0]))).double()
    flat = z.transpose(0, 1).reshape(6, -1)
    assert torch.allclose(model.bn.running_mean.double(), flat.mean(1), atol=1e-5)
    assert torch.allclose(model.bn.running_var.double(), flat.var(1), rtol=1e-5)
    assert torch.equal(model.bn.num_batches_tracked, teacher.bn.num_batches_tracked)
    assert not model.bn.training


def test_batchnorm_before_the_first_change_is_left_alone():
    """Only BatchNorms at or after the first compressed module are re-estimated (here: none; bn is before fc1)."""
    teacher, data = _teacher(), _data()
    model = copy.deepcopy(teacher)
    _random_pair(model, "fc1", 3)
    result = refit(model, teacher, CONTRACT, data, RefitConfig())
    assert result.batchnorms == [] and torch.equal(model.bn.running_var, teacher.bn.running_var)


def test_refusals():
    for bad in (dict(damping=-1.0), dict(damping=float("nan")), dict(damping=float("inf")), dict(rounds=0),
                dict(batch_size=0)):
        with pytest.raises(RankcutError):
            RefitConfig(**bad)
    teacher = _teacher()
    model = copy.deepcopy(teacher)
    _random_pair(model, "conv2", 2)
    with pytest.raises(RankcutError, match="--teacher"):
        refit(model, None, CONTRACT, _data(), RefitConfig())
    bad = _data()
    bad.tensors[0][3, 0, 0, 0] = float("nan")
    with pytest.raises(RankcutError, match="NaN"):
        refit(model, teacher, CONTRACT, bad, RefitConfig())
    other = nn.Sequential(nn.Conv2d(2, 4, 3))
    with pytest.raises(RankcutError, match="teacher"):
        refit(model, other, CONTRACT, _data(), RefitConfig())


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def _sums(xs: torch.Tensor, ys: torch.Tensor, max_rows: int, batch: int = 15) -> Sums:
    p, c = xs.shape[1], ys.shape[1]
    z = lambda *shape: torch.zeros(*shape, dtype=torch.float64)  # noqa: E731
    sums = Sums(z(c, p), z(()), z(c), z(()), rows_x=z(0, p), rows_y=z(0, c))
    for x, y in zip(xs.split(batch), ys.split(batch)):
        sums.add(x, y, max_rows)
    return sums


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("damping", [0.0, 1e-3, 0.3])
def test_primal_and_dual_forms_solve_the_same_problem(bias, damping):
    """45 rows of 60 inputs (+1): kept as rows (dual), turned into the Gram matrix after 30 rows, or summed as
    the Gram matrix from the start (primal): the same maps, pair steps and objectives to 1e-6 relative."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(45, 60, generator=g, dtype=torch.float64) + 0.5  # a non-zero mean: the bias matters
    xs = torch.cat([x, torch.ones(45, 1, dtype=torch.float64)], 1)
    ys = x @ torch.randn(60, 7, generator=g, dtype=torch.float64) + torch.randn(45, 7, generator=g,
                                                                                  dtype=torch.float64)
    forms = {"dual": _sums(xs, ys, 10**6), "switched": _sums(xs, ys, 30), "primal": _sums(xs, ys, 0)}
    assert [s.dual for s in forms.values()] == [True, False, False]
    assert forms["dual"].xx is None  # no 61 x 61 Gram matrix in the dual form
    problems = {k: Problem.of(s, damping, bias) for k, s in forms.items()}
    primal = problems["primal"]
    p = primal.b.shape[1]
    down = torch.randn(3, p, generator=g, dtype=torch.float64)
    up, up_bias = torch.randn(7, 3, generator=g, dtype=torch.float64), torch.randn(7, generator=g, dtype=torch.float64)
    expected = refit_pair(primal, down, up, up_bias, rounds=2)
    left = torch.randn(3, 7, generator=g, dtype=torch.float64)
    for name, problem in problems.items():
        assert problem.delta == pytest.approx(primal.delta, rel=1e-12)
        assert _relative(problem.solve(), primal.solve()) < 1e-6, name
        assert _relative(problem.solve(left), left @ primal.solve()) < 1e-6, name  # a pair's k-row down solve
        assert _relative(problem.gram(down), primal.gram(down)) < 1e-9, name
        got = refit_pair(problem, down, up, up_bias, rounds=2)
        for a, b in zip(got[:3], expected[:3]):
            assert _relative(a, b) < 1e-6, name
        assert got[3] == pytest.approx(expected[3], rel=1e-6, abs=1e-9), name
    # Both solve the normal equations: B = M (A + delta D), D the identity on the weights only.
    a = forms["primal"].xx / 45
    a = a if bias else a[:-1, :-1]
    mask = torch.ones(p, dtype=torch.float64)
    if bias:
        mask[-1] = 0
    a_reg = a + torch.diag(mask * primal.delta)
    residual = primal.b - problems["dual"].solve() @ a_reg
    assert residual.norm() < 1e-8 * primal.b.norm()
    for problem in problems.values():
        assert _relative(problem.gram(down), down @ a_reg @ down.T) < 1e-9
        assert _relative(problem.gram(down, damped=False), down @ a @ down.T) < 1e-9


@pytest.mark.parametrize("width", [5, 64, 129])
def test_gram_is_x_transpose_x(width):
    """Off-diagonal blocks computed once and mirrored (leaves of 16 columns here): x'x to rounding."""
    x = torch.randn(40, width, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    assert _relative(gram(x, leaf=16), x.T @ x) < 1e-14


def test_a_wide_layer_is_refitted_from_its_rows_the_same_as_from_its_gram_matrix():
    """Tiny's fc1 reads 216 inputs; 96 samples give 96 rows, so the pass keeps the rows (dual form). Forcing
    the Gram matrix (primal form) gives the same pair to 1e-6 relative, with and without damping."""
    teacher, data = _teacher(), _data()
    batches = torch.utils.data.DataLoader(data, batch_size=32)
    ctx = Context(0, 1, torch.device("cpu"))
    for damping in (0.0, 1e-3):
        models = {}
        for form, max_rows in (("dual", None), ("primal", 0)):
            model = copy.deepcopy(teacher)
            _random_pair(model, "fc1", 3)
            target = RefitTarget("fc1", "pair", "fc1")
            sums = layer_sums(model, teacher, target, batches, ctx, max_rows=max_rows, dtype=torch.float64)
            assert sums.dual == (form == "dual")
            report = refit_one(model, target, sums, damping, rounds=2)
            assert report.status == "refit" and report.error_after < report.error_before
            models[form] = (model, report)
        (dual, r_dual), (primal, r_primal) = models["dual"], models["primal"]
        for key, value in primal.state_dict().items():
            assert _relative(dual.state_dict()[key].double(), value.double()) < 1e-6, (damping, key)
        assert r_dual.objective == pytest.approx(r_primal.objective, rel=1e-6)
        assert r_dual.error_after == pytest.approx(r_primal.error_after, rel=1e-6)


def test_teacher_outputs_kept_at_the_sampled_positions_give_the_same_sums():
    """With --positions the teacher's conv outputs are kept only at the rows the layer's sums draw (4 of 36 per
    sample here): the sums are those from its whole outputs, bit for bit, and the memory check counts 4 of 36."""
    teacher, data = _teacher(), _data()
    model = copy.deepcopy(teacher)
    _random_pair(model, "conv2", 2)
    target = RefitTarget("conv2", "pair", "bn")
    batches = torch.utils.data.DataLoader(data, batch_size=40)  # uneven: 40, 40, 16
    ctx = Context(0, 1, torch.device("cpu"))
    whole = teacher_outputs(teacher, [target], batches, ctx)
    cut = teacher_outputs(teacher, [target], batches, ctx, positions=4, seed=3)
    channels = whole[0]["bn"].shape[1]
    assert [c["bn"].rows.shape for c in cut] == [(40 * 4, channels), (40 * 4, channels), (16 * 4, channels)]
    sums = [layer_sums(model, teacher, target, batches, ctx, max_rows=0, taught=taught, positions=4, seed=3,
                       dtype=torch.float64) for taught in (whole, cut)]
    assert torch.equal(sums[0].xx, sums[1].xx) and torch.equal(sums[0].yx, sums[1].yx)
    assert torch.equal(sums[0].yy, sums[1].yy) and sums[1].count.item() == 96 * 4
    kept_bytes = 96 * channels * 4 * 4  # float32 at 4 positions
    assert teacher_cache_fits(teacher, [target], CONTRACT, 96, limit=kept_bytes, positions=4)
    assert not teacher_cache_fits(teacher, [target], CONTRACT, 96, limit=kept_bytes)


def test_float32_products_under_the_default_ridge_give_the_float64_objective():
    """Each batch's products in float32 (the default damping's ``products_dtype``), summed in float64: conv2's
    refit reaches the objective of float64 products to 1e-6 relative, and plain least squares stays float64."""
    teacher, data = _teacher(), _data()
    batches = torch.utils.data.DataLoader(data, batch_size=32)
    ctx = Context(0, 1, torch.device("cpu"))
    target = RefitTarget("conv2", "pair", "bn")
    assert products_dtype(DEFAULT_REFIT_DAMPING) is None and products_dtype(0.0) == torch.float64
    reports = {}
    for dtype in (None, torch.float64):
        model = copy.deepcopy(teacher)
        _random_pair(model, "conv2", 2)
        sums = layer_sums(model, teacher, target, batches, ctx, max_rows=0, dtype=dtype)
        assert sums.xx.dtype == torch.float64
        reports[dtype] = refit_one(model, target, sums, DEFAULT_REFIT_DAMPING, rounds=2)
    single, double = reports[None], reports[torch.float64]
    assert single.objective == pytest.approx(double.objective, rel=1e-6)
    assert single.error_after == pytest.approx(double.error_after, rel=1e-6) and double.error_after < 0.5


@pytest.mark.parametrize("conv", [dict(), dict(padding=1), dict(stride=2, padding=(2, 1)), dict(dilation=2, padding=1),
                                  dict(kernel_size=(1, 3), stride=(2, 1))])
def test_conv_rows_are_unfold_order_patches_with_a_one(conv):
    """The rows refit sums are the conv's input patches in its weight's order: patch x weight = its output."""
    layer = nn.Conv2d(3, 5, **{"kernel_size": 3, **conv})
    x = torch.randn(2, 3, 9, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = layer(x)
    xs, ys = _rows(layer, x, y)
    expected = F.unfold(x, layer.kernel_size, layer.dilation, layer.padding, layer.stride).transpose(1, 2)
    assert xs.dtype == x.dtype and torch.equal(xs[:, :-1], expected.reshape(-1, xs.shape[1] - 1))
    assert torch.equal(xs[:, -1], torch.ones(len(xs)))
    w = torch.cat([layer.weight.reshape(5, -1), layer.bias[:, None]], 1).detach()
    assert torch.allclose(xs @ w.T, ys, atol=1e-5)


def test_sampled_positions_reach_the_exact_solution_and_do_not_depend_on_the_batches():
    """--positions: an exact low-rank solution is still reached from 4 of 36 rows per sample (any rows that
    span the inputs determine it), the rows kept are the same whatever the batch size, and with at least as
    many positions as a layer has the sums are those of every row."""
    teacher, data = _teacher(conv2_rank=2), _data()
    model = copy.deepcopy(teacher)
    _random_pair(model, "conv2", 2)
    exact = copy.deepcopy(model)
    refit(exact, teacher, CONTRACT, data, RefitConfig(damping=0.0, rounds=1, positions=4))
    assert torch.allclose(_outputs(exact, data), _outputs(teacher, data), atol=1e-5, rtol=0)
    target = RefitTarget("conv2", "pair", "bn")
    ctx = Context(0, 1, torch.device("cpu"))

    def sums(batch_size, positions, seed=0):  # float64 products: other batch boundaries then round alike
        batches = torch.utils.data.DataLoader(data, batch_size=batch_size)
        return layer_sums(model, teacher, target, batches, ctx, max_rows=0, positions=positions, seed=seed,
                          dtype=torch.float64)

    few, few_other_batches = sums(96, 4), sums(7, 4)
    assert few.count.item() == 96 * 4
    assert torch.allclose(few.xx, few_other_batches.xx, rtol=1e-12, atol=0)
    assert not torch.allclose(few.xx, sums(96, 4, seed=1).xx, rtol=1e-3, atol=0), "the seed should choose the rows"
    assert torch.equal(sums(96, 36).xx, sums(96, None).xx)
