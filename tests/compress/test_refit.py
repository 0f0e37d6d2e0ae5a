"""``compress.refit``: the closed-form refit reaches exact solutions, changes nothing that is already right,
never increases its objective, re-estimates BatchNorm exactly, and refuses what it cannot do."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from rankcut.api import RefitConfig, refit
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
