"""Linears on any input rank: channels on the last axis, every leading axis a sample position.

Two tiny models no one here wrote the layout for: a ConvNeXt-like block (conv, permute to channels-last,
LayerNorm, Linear MLP, permute back) and a token model (patches as (N, T, D), a Linear MLP over tokens, a
BatchNorm1d after a Linear on (N, C)). Statistics, gradient statistics, projection and MACs must treat
the last axis as the channels.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rankcut.dist import Context
from rankcut.compress.project import project_model
from rankcut.files.statsfile import StatsFile, check_fits
from rankcut.stats.moments import LayerStats
from rankcut.model.archs import InputContract
from rankcut.model.cost import count_macs
from rankcut.model.edits import get_module
from rankcut.model.targets import select, trace
from rankcut.stats.collect import GradientSums, Moments, collect_gradients, collect_moments

CONTRACT = InputContract((3, 16, 16), (0.0,) * 3, (1.0,) * 3)
CPU = Context(0, 1, torch.device("cpu"))


class ChannelsLast(nn.Module):
    """Stem conv, then a ConvNeXt-style MLP on (N, H, W, C), then a pooled head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 12, 4, 4)
        self.norm = nn.LayerNorm(12)
        self.fc1 = nn.Linear(12, 24)
        self.fc2 = nn.Linear(24, 12)
        self.head = nn.Linear(12, 10)

    def forward(self, x):
        y = self.stem(x).permute(0, 2, 3, 1)
        y = y + self.fc2(nn.functional.gelu(self.fc1(self.norm(y))))
        return self.head(y.permute(0, 3, 1, 2).mean((2, 3)))


class Tokens(nn.Module):
    """Patches as tokens (N, T, D), a token MLP, a pooled Linear + BatchNorm1d on (N, C), a head."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, 16, 4, 4)
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 16)
        self.pool_fc = nn.Linear(16, 16)
        self.bn = nn.BatchNorm1d(16)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2)  # (N, 16 tokens, 16)
        t = t + self.fc2(nn.functional.relu(self.fc1(t)))
        return self.head(nn.functional.relu(self.bn(self.pool_fc(t.mean(1)))))


def _model(cls):
    torch.manual_seed(0)
    model = cls().eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm1d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model


def _batches(n=4, size=8):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(size, *CONTRACT.shape, generator=g), torch.zeros(size, dtype=torch.long)) for _ in range(n)]


def _outputs(model, names, batches):
    """Every named layer's raw outputs over the batches, concatenated along the sample axis."""
    seen = {n: [] for n in names}
    handles = [get_module(model, n).register_forward_hook(lambda _, __, out, n=n: seen[n].append(out.detach()))
               for n in names]
    with torch.no_grad():
        logits = torch.cat([model(x) for x, _ in batches])
    for h in handles:
        h.remove()
    return {n: torch.cat(v) for n, v in seen.items()}, logits


@pytest.mark.parametrize("cls", [ChannelsLast, Tokens])
def test_moments_take_channels_from_the_last_axis(cls):
    model, data = _model(cls), _batches()
    targets = select(model, CONTRACT)
    moments = collect_moments(model, targets, data, CPU)
    raw, _ = _outputs(model, [t.capture for t in targets], data)
    for t in targets:
        z = raw[t.capture]
        width = z.shape[1] if isinstance(get_module(model, t.name), nn.Conv2d) else z.shape[-1]
        rows = z.movedim(1, -1) if isinstance(get_module(model, t.name), nn.Conv2d) else z
        rows = rows.reshape(-1, width).double()
        assert moments[t.name].count == len(rows), t.name
        torch.testing.assert_close(moments[t.name].mean, rows.mean(0), rtol=1e-6, atol=1e-6, msg=t.name)
        torch.testing.assert_close(moments[t.name].covariance, torch.cov(rows.T, correction=0), rtol=1e-5, atol=1e-6,
                                   msg=t.name)


def test_channels_last_moments_merge_exactly():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, 7, 9, generator=g, dtype=torch.float64) * 2 + 3  # (N, H, W, C)
    whole = Moments.of(x, last=True)
    halves = Moments.of(x[:2], last=True).merge(Moments.of(x[2:], last=True))
    torch.testing.assert_close(whole.covariance, torch.cov(x.reshape(-1, 9).T, correction=0), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(halves.m2, whole.m2, rtol=1e-10, atol=1e-9)
    assert halves.count == whole.count == 6 * 5 * 7


def test_gradient_sums_sum_over_token_positions_per_sample():
    g = torch.Generator().manual_seed(0)
    z, grad = torch.randn(3, 5, 4, generator=g), torch.randn(3, 5, 4, generator=g)  # (N, T, C)
    mean = torch.randn(4, generator=g)
    acc = GradientSums(mean, last=True)
    acc.add(z, grad)
    s = torch.einsum("ntc,ntd->ncd", grad.double(), (z - mean).double())  # S = sum_t g_t (z_t - mu)^T
    sym = (s + s.transpose(1, 2)) / 2
    torch.testing.assert_close(acc.hessian, (sym @ sym).sum(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(acc.grad_m2, torch.einsum("ntc,ntd->cd", grad.double(), grad.double()),
                               rtol=1e-5, atol=1e-6)
    assert acc.count == 3


@pytest.mark.parametrize("cls", [ChannelsLast, Tokens])
def test_gradient_statistics_run_on_channels_last_layers(cls):
    model, data = _model(cls), _batches(2)
    targets = select(model, CONTRACT)
    moments = collect_moments(model, targets, data, CPU)
    grads = collect_gradients(model, targets, data, moments, "kl", 1, 0, CPU)
    for t in targets:
        c = len(moments[t.name].mean)
        assert grads[t.name]["hessian"].shape == (c, c) and grads[t.name]["grad_count"] == 16
        assert grads[t.name]["grad_m2"].trace() > 0, t.name


def test_batchnorm_after_a_linear_on_tokens_is_not_folded():
    """A BatchNorm1d normalises axis 1: after a linear on (N, T, C) it is not the linear's BatchNorm."""

    class Misread(nn.Module):
        def __init__(self):
            super().__init__()
            self.patch = nn.Conv2d(3, 16, 4, 4)
            self.fc = nn.Linear(16, 16)
            self.bn = nn.BatchNorm1d(16)  # 16 tokens == 16 features: only the layout tells them apart
            self.head = nn.Linear(16, 10)

        def forward(self, x):
            t = self.bn(self.fc(self.patch(x).flatten(2).transpose(1, 2)))
            return self.head(t.mean(1))

    found = {t.name: t.bn for t in trace(_model(Misread), CONTRACT)[0]}
    assert found["fc"] is None
    assert {t.name: t.bn for t in trace(_model(Tokens), CONTRACT)[0]}["pool_fc"] == "bn"


def _stats(model, data):
    targets = select(model, CONTRACT)
    moments = collect_moments(model, targets, data, CPU)
    return targets, {t.name: LayerStats(t, moments[t.name]) for t in targets}


@pytest.mark.parametrize("cls", [ChannelsLast, Tokens])
def test_keep_one_reproduces_the_outputs(cls):
    model, data = _model(cls), _batches()
    _, before = _outputs(model, [], data)
    targets, stats = _stats(model, data)
    check_fits(StatsFile("x", 32, stats), model, CONTRACT, "s.npz")
    ranks = {t.name: get_module(model, t.name).weight.shape[0] for t in targets}
    _, reports = project_model(model, targets, stats, "pca", ranks, only_if_saves=False)
    assert all(r.status == "projected" for r in reports)
    _, after = _outputs(model, [], data)
    err = ((after - before).norm() / before.norm()).item()
    assert err < 1e-5, f"keep 1.0 changed the outputs of {cls.__name__}: relative error {err:.3g}"


@pytest.mark.parametrize("cls, layer", [(ChannelsLast, "fc1"), (Tokens, "fc1")])
def test_reconstruction_error_equals_discarded_eigenvalues(cls, layer):
    model, data = _model(cls), _batches()
    targets, stats = _stats(model, data)
    raw, _ = _outputs(model, [layer], data)
    k = 5
    eig = torch.linalg.eigvalsh(stats[layer].moments.covariance).flip(0)
    project_model(model, [t for t in targets if t.name == layer], stats, "pca", {layer: k}, only_if_saves=False)
    projected, _ = _outputs(model, [layer], data)
    mse = ((raw[layer] - projected[layer]).double() ** 2).sum(-1).mean()  # per position: channels on the last axis
    torch.testing.assert_close(mse, eig[k:].sum(), rtol=1e-3, atol=0)


@pytest.mark.parametrize("cls, positions", [(ChannelsLast, 16), (Tokens, 16)])
def test_macs_follow_the_leading_axes(cls, positions):
    model = _model(cls)
    _, per_layer = count_macs(model, CONTRACT)
    assert per_layer["fc1"] == positions * 24 * 12 if cls is ChannelsLast else positions * 32 * 16
    targets, stats = _stats(model, _batches(1))
    width, fan_in = model.fc1.out_features, model.fc1.in_features
    project_model(model, [t for t in targets if t.name == "fc1"], stats, "pca", {"fc1": 3}, only_if_saves=False)
    _, per_layer = count_macs(model, CONTRACT)
    assert per_layer["fc1.down"] + per_layer["fc1.up"] == positions * 3 * (fan_in + width)


class BatchNormAct(nn.BatchNorm2d):
    """A BatchNorm that also applies its activation (as timm's ``BatchNormAct2d``): not foldable."""

    def forward(self, x):
        return nn.functional.relu(super().forward(x))


def test_a_batchnorm_with_its_own_forward_is_not_folded():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)
            self.bn = BatchNormAct(8)
            self.head = nn.Linear(8, 10)

        def forward(self, x):
            return self.head(self.bn(self.conv(x)).mean((2, 3)))

    model, data = _model(Net), _batches(2)
    model.bn.running_mean.uniform_(-0.5, 0.5)
    targets, stats = _stats(model, data)
    assert {t.name: t.bn for t in targets}["conv"] is None
    _, before = _outputs(model, [], data)
    project_model(model, targets, stats, "pca", {"conv": 8}, only_if_saves=False)
    _, after = _outputs(model, [], data)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)
