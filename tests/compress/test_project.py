"""Projecting a model: at full rank (BatchNorm folded first) the outputs return; non-finite pairs are refused."""

from __future__ import annotations

import pytest
import torch
from builders import CPU, batches
from torch import nn

from rankcut.compress.methods import METHODS
from rankcut.compress.project import project_model
from rankcut.errors import RankcutError
from rankcut.files.checkpoint import load_with_meta
from rankcut.files.statsfile import LayerStats
from rankcut.model import archs
from rankcut.model.archs import InputContract
from rankcut.model.edits import get_module
from rankcut.model.layers import LowRank, project_layer
from rankcut.model.targets import Target, select
from rankcut.stats.collect import collect_moments
from rankcut.stats.moments import Moments


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


def _grad_sums(c: int, seed: int) -> dict[str, torch.Tensor]:
    """Gradient statistics with distinct random SPD ``hessian`` and ``grad_m2`` (count 1)."""
    g = torch.Generator().manual_seed(seed)
    a, b = (torch.randn(c, c, generator=g, dtype=torch.float64) for _ in range(2))
    return {"hessian": a @ a.T, "grad_m2": b @ b.T, "grad_count": torch.tensor(1.0, dtype=torch.float64)}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_projecting_again_equals_the_two_projections_in_sequence(method):
    """Re-projecting a pair (its up-bias, mean and mixing included) computes U2 D2 (pair1(x) - mu2) + mu2."""
    g = torch.Generator().manual_seed(7)
    layer = nn.Conv2d(3, 8, 3, padding=1).double()
    with torch.no_grad():
        layer.bias.copy_(torch.randn(8, generator=g, dtype=torch.float64) * 3)
    x = torch.randn(4, 3, 6, 6, generator=g, dtype=torch.float64)

    def stats_of(module, seed):
        with torch.no_grad():
            moments = Moments.of(module(x))
        return LayerStats(None, moments, _grad_sums(8, seed))

    first = project_layer(layer, *METHODS[method].basis(layer, stats_of(layer, 1)).pair(5))
    up2, down2, mu2 = METHODS[method].basis(first, stats_of(first, 2)).pair(3)
    second = project_layer(first, up2, down2, mu2)
    assert isinstance(second, LowRank) and second.rank == 3
    with torch.no_grad():
        z1 = first(x).movedim(1, -1)
        expected = ((z1 - mu2) @ down2.T @ up2.T + mu2).movedim(-1, 1)
        assert first.up.bias.abs().max() > 0.1  # the old pair's up-bias matters here
        torch.testing.assert_close(second(x), expected, rtol=1e-6, atol=1e-6)


def _effective(pair: LowRank) -> tuple[torch.Tensor, torch.Tensor]:
    up = pair.up.weight.reshape(pair.up.weight.shape[0], -1).double()
    return up @ pair.down.weight.reshape(pair.down.weight.shape[0], -1).double(), \
        up @ pair.down.bias.double() + pair.up.bias.double()


@pytest.mark.parametrize("again", [["--keep", "0.5"], ["--macs", "0.5"]])
def test_cli_reprojection_equals_the_second_projection_applied_to_the_first(tmp_path, mnist_ckpt, run_cli, again):
    """svd twice through the CLI: each pair of the second file is U_k U_k^T (W1 x) + b1, where W1, b1 is the first
    file's pair multiplied out and U its left singular vectors (computed here, independently of the methods)."""
    first, second = tmp_path / "p1.safetensors", tmp_path / "p2.safetensors"
    run_cli(["project", mnist_ckpt, "--method", "svd", "--keep", "0.5", "-o", first, "--quiet"])
    run_cli(["project", first, "--method", "svd", *again, "-o", second, "--quiet"])
    m1, m2 = load_with_meta(first)[0], load_with_meta(second)[0]
    checked = 0
    for name, pair2 in m2.named_modules():
        pair1 = get_module(m1, name) if isinstance(pair2, LowRank) else None
        if not isinstance(pair1, LowRank) or pair2.rank == pair1.rank:
            continue
        w1, b1 = _effective(pair1)
        u = torch.linalg.svd(w1, full_matrices=False).U[:, :pair2.rank]
        w2, b2 = _effective(pair2)
        torch.testing.assert_close(w2, u @ u.T @ w1, rtol=0, atol=1e-5 * w1.abs().max().item())
        torch.testing.assert_close(b2, b1, rtol=0, atol=1e-5)
        checked += 1
    assert checked >= 1, "no layer was projected twice"
