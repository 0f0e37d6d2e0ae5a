"""Projecting a model: at full rank (BatchNorm folded first) the outputs return; non-finite pairs are refused."""

from __future__ import annotations

import pytest
import torch
from builders import CPU, batches
from torch import nn

from rankcut.compress.project import project_model
from rankcut.errors import RankcutError
from rankcut.files.checkpoint import load_with_meta
from rankcut.files.statsfile import LayerStats
from rankcut.model import archs
from rankcut.model.archs import InputContract
from rankcut.model.edits import get_module
from rankcut.model.layers import LowRank
from rankcut.model.targets import Target, select
from rankcut.stats.collect import collect_moments


def trained_bn_stats(model: nn.Module):
    """Give every BatchNorm non-trivial running statistics so folding is really tested."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


def full_projection(model, contract, data):
    targets = select(model, contract)
    moments = collect_moments(model, targets, data, CPU)
    stats = {t.name: LayerStats(t, moments[t.name]) for t in targets}
    ranks = {t.name: get_module(model, t.name).weight.shape[0] for t in targets}
    edits, _ = project_model(model, targets, stats, "pca", ranks, only_if_saves=False)
    return edits


@pytest.mark.parametrize("arch,contract", [
    ("rankcut:mnist-cnn", archs.MNIST),
    ("torchvision:resnet18", InputContract((3, 64, 64), archs.IMAGENET_MEAN, archs.IMAGENET_STD)),
])
def test_keep_one_reproduces_outputs(arch, contract):
    torch.manual_seed(0)
    model = trained_bn_stats(archs.build(arch, {}))
    data = batches(contract, 24, 8)
    x = torch.cat([b[0] for b in data])
    with torch.no_grad():
        before = model(x)
        edits = full_projection(model, contract, data)
        after = model(x)
    assert any(e.kind == "fold_bn" for e in edits) == (arch != "rankcut:mnist-cnn")
    assert all(isinstance(get_module(model, e.layer), LowRank) for e in edits if e.kind == "low_rank")
    rel = (after - before).norm() / before.norm()
    assert rel < 1e-4, f"relative output error {rel:.2e}"


def test_project_refuses_to_write_non_finite_pairs(small_files):
    model, meta = load_with_meta(small_files["ckpt"])
    with torch.no_grad():
        get_module(model, "layer1.conv1").weight[0, 0, 0, 0] = torch.nan
    with pytest.raises(RankcutError, match="--method svd failed on layer layer1.conv1"):
        project_model(model, [Target("layer1.conv1", "layer1.bn1")], {}, "svd", {"layer1.conv1": 2})
    model, _ = load_with_meta(small_files["ckpt"])
    with torch.no_grad():
        get_module(model, "layer2.conv1").weight.fill_(3e38)  # finite, but its pair's weights overflow
    with pytest.raises(RankcutError, match="NaN or Inf weights for layer layer2.conv1"):
        project_model(model, [Target("layer2.conv1")], {}, "random", {"layer2.conv1": 2})
