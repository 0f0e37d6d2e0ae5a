"""``compress.sequential`` and ``project(sequential=True)``: full rank reproduces the model, one target is plain
projection, and a later layer's basis is the PCA of its output on the already-projected upstream."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from rankcut.api import ProjectConfig, StatsConfig, collect_stats, project
from rankcut.compress.sequential import project_sequential
from rankcut.dist import Context
from rankcut.model.archs import InputContract
from rankcut.model.targets import select
from rankcut.run.data import loader

CONV = InputContract((2, 6, 6), (0.0, 0.0), (1.0, 1.0))
FLAT = InputContract((6, 1, 1), (0.0,) * 6, (1.0,) * 6)
CPU = Context(0, 1, torch.device("cpu"))


class Convs(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 36, 3)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return self.fc(x.flatten(1))


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 8)
        self.fc3 = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x.flatten(1))))))


def _model(cls) -> nn.Module:
    torch.manual_seed(0)
    model = cls()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def _data(contract: InputContract, n: int = 80) -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(n, *contract.shape, generator=g), torch.zeros(n, dtype=torch.long))


def test_full_rank_sequential_pairs_reproduce_the_outputs():
    """keep 1.0 (every pair at full rank, kept even where it saves nothing): outputs as the original's, and the
    edits replay the structure on the original (as loading a checkpoint does)."""
    torch.set_num_threads(1)
    model, data = _model(Convs), _data(CONV)
    original = copy.deepcopy(model)
    targets = select(model, CONV)
    ranks = {"conv1": 8, "conv2": 8}
    edits, reports = project_sequential(model, targets, "pca", ranks, loader(data, 16), CPU, only_if_saves=False)
    assert [r.status for r in reports] == ["projected", "projected"] and len(edits) == 3  # conv1's BatchNorm folded
    with torch.no_grad():
        x = data.tensors[0]
        want, got = original(x), model(x)
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-5
    replayed = copy.deepcopy(original)
    for edit in edits:
        edit.apply(replayed)
    replayed.load_state_dict(model.state_dict(), strict=True)


@pytest.mark.parametrize("method", ["pca", "fisher"])
def test_one_target_is_plain_projection(method):
    """With one target nothing upstream changes, so the sequential pass measures what stats measured."""
    torch.set_num_threads(1)
    model, data = _model(Convs), _data(CONV)
    stats = collect_stats(model, CONV, data, StatsConfig(grad="kl", batch_size=16, layers=("conv2",)))
    plain, sequential = copy.deepcopy(model), copy.deepcopy(model)
    project(plain, CONV, stats, ProjectConfig(method=method, keep=0.25, layers=("conv2",)))
    project(sequential, CONV, stats, ProjectConfig(method=method, keep=0.25, layers=("conv2",), sequential=True,
                                                   batch_size=16), dataset=data)
    for (name, a), (_, b) in zip(plain.state_dict().items(), sequential.state_dict().items()):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7, msg=name)


def test_the_second_layer_basis_is_the_pca_of_its_output_on_the_projected_upstream():
    torch.set_num_threads(1)
    model, data = _model(Mlp), _data(FLAT, 200)
    stats = collect_stats(model, FLAT, data, StatsConfig(batch_size=32))
    config = ProjectConfig(method="pca", keep=0.25, sequential=True, batch_size=32)
    sequential = copy.deepcopy(model)
    project(sequential, FLAT, stats, config, dataset=data)
    # Independently: fc1 as plain pca projects it (its upstream is the input), then fc2's outputs on that model.
    upstream = copy.deepcopy(model)
    project(upstream, FLAT, stats, ProjectConfig(method="pca", keep=0.25, layers=("fc1",)))
    with torch.no_grad():
        z = upstream.fc2(torch.relu(upstream.fc1(data.tensors[0].flatten(1)))).double()
    mean = z.mean(0)
    _, vectors = torch.linalg.eigh(torch.cov(z.T, correction=0))
    top = vectors[:, -2:]  # keep 0.25 of 8: rank 2
    pair = sequential.fc2
    up, down = pair.up.weight.detach().double(), pair.down.weight.detach().double()
    assert up.shape == (8, 2)
    torch.testing.assert_close(up @ up.T, top @ top.T, atol=1e-6, rtol=0)  # the same subspace
    torch.testing.assert_close(pair.up.bias.detach().double(), mean, atol=1e-6, rtol=0)
    torch.testing.assert_close(down, up.T @ model.fc2.weight.detach().double(), atol=1e-6, rtol=0)
    plain = copy.deepcopy(model)
    project(plain, FLAT, stats, ProjectConfig(method="pca", keep=0.25))
    assert (plain.fc2.up.weight @ plain.fc2.up.weight.T - up.float() @ up.float().T).abs().max() > 1e-3, \
        "the original's fc2 basis differs from the sequential one (else this test shows nothing)"
