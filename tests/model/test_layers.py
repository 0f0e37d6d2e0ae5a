"""The rank-k pair and its algebra: BatchNorm folding, ``up @ down @ (z - mu) + mu``, composition."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from builders import randomize_

from rankcut.model.layers import (LowRank, current_rank, empty_pair, fan_in, fold_batchnorm, is_target_type, max_rank,
                                  out_width, plain_batchnorm, project_layer, with_bias)


def _seeded(module: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights and (for BatchNorm) running statistics far from the defaults, in float64."""
    return randomize_(module, seed, scale=1.0).double()


LAYERS = {
    "conv": (lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1), (2, 4, 9, 9)),
    "conv without bias": (lambda: nn.Conv2d(4, 6, 3, padding=1, bias=False), (2, 4, 5, 5)),
    "linear": (lambda: nn.Linear(5, 6), (3, 5)),
    "dilated conv": (lambda: nn.Conv2d(4, 6, 3, stride=1, padding=2, dilation=2), (2, 4, 9, 9)),
    "circular conv": (lambda: nn.Conv2d(4, 6, 3, padding=1, padding_mode="circular"), (2, 4, 5, 5)),
}


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_folding_a_batchnorm_without_affine_parameters(kind):
    make, shape = LAYERS[kind]
    layer = _seeded(make())
    bn = _seeded((nn.BatchNorm2d if layer.weight.dim() == 4 else nn.BatchNorm1d)(6, affine=False), seed=5)
    assert bn.weight is None and bn.running_mean.abs().max() > 0.1
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(fold_batchnorm(layer, bn)(x), bn(layer(x)), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_folded_layer_equals_layer_then_batchnorm(kind):
    make, shape = LAYERS[kind]
    layer = _seeded(make())
    bn = _seeded(nn.BatchNorm2d(6) if layer.weight.dim() == 4 else nn.BatchNorm1d(6), seed=1)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(fold_batchnorm(layer, bn)(x), bn(layer(x)), rtol=1e-12, atol=1e-12)
    assert all(torch.equal(v, before[k]) for k, v in layer.state_dict().items()), "folding changed the input layer"


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_pair_computes_up_down_of_the_centred_output(kind):
    """z' = U D (z - mu) + mu exactly, with the original kernel, stride and padding in ``down``."""
    make, shape = LAYERS[kind]
    layer = _seeded(make())
    g = torch.Generator().manual_seed(3)
    up, down = torch.randn(6, 2, generator=g, dtype=torch.float64), torch.randn(2, 6, generator=g, dtype=torch.float64)
    mu = torch.randn(6, generator=g, dtype=torch.float64)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    pair = project_layer(layer, up, down, mu)
    assert isinstance(pair, LowRank) and pair.rank == 2 and type(pair.down) is type(layer)
    with torch.no_grad():
        z = layer(x).movedim(1, -1)
        expected = ((z - mu) @ down.T @ up.T + mu).movedim(-1, 1)
        torch.testing.assert_close(pair(x), expected, rtol=1e-10, atol=1e-10)


def test_projecting_a_pair_composes_into_one_pair():
    layer = _seeded(nn.Conv2d(3, 8, 3, padding=1))
    g = torch.Generator().manual_seed(4)
    u1 = torch.linalg.qr(torch.randn(8, 5, generator=g, dtype=torch.float64)).Q
    u2 = torch.linalg.qr(torch.randn(8, 3, generator=g, dtype=torch.float64)).Q
    mu1, mu2 = torch.randn(8, generator=g, dtype=torch.float64), torch.randn(8, generator=g, dtype=torch.float64)
    first = project_layer(layer, u1, u1.T, mu1)
    second = project_layer(first, u2, u2.T, mu2)
    assert second.rank == 3 and second.down.kernel_size == (3, 3) and second.down.in_channels == 3
    assert not any(isinstance(m, LowRank) for m in (second.down, second.up)), "pairs must not nest"
    x = torch.randn(2, 3, 6, 6, generator=g, dtype=torch.float64)
    with torch.no_grad():
        z1 = first(x).movedim(1, -1)
        expected = ((z1 - mu2) @ u2 @ u2.T + mu2).movedim(-1, 1)
        torch.testing.assert_close(second(x), expected, rtol=1e-10, atol=1e-10)


def test_widths_and_ranks():
    conv = nn.Conv2d(3, 16, 3)
    pair = empty_pair(conv, 5)
    assert (out_width(conv), current_rank(conv), max_rank(conv)) == (16, 16, 16)
    assert (out_width(pair), current_rank(pair), max_rank(pair)) == (16, 5, 5)
    assert max_rank(nn.Conv2d(1, 16, 3)) == 9  # nine inputs per output: the outputs span at most nine directions
    assert max_rank(nn.Linear(4, 10)) == 4
    assert (fan_in(nn.Linear(4, 1)), max_rank(nn.Linear(4, 1)), fan_in(empty_pair(conv, 1))) == (4, 1, 27)  # one output
    assert [is_target_type(m) for m in (conv, pair, nn.Linear(2, 2), nn.Conv2d(4, 4, 3, groups=2),
                                        nn.Conv2d(4, 4, 3, groups=4), nn.BatchNorm2d(4))] == [True] * 3 + [False] * 3


def test_with_bias_keeps_a_biased_layer_and_gives_a_biasless_one_a_zero_bias():
    biased = _seeded(nn.Conv2d(3, 4, 3))
    assert with_bias(biased) is biased
    plain = _seeded(nn.Conv2d(3, 4, 3, padding=1, bias=False))
    new = with_bias(plain)
    assert new is not plain and plain.bias is None and new.weight.dtype == torch.float64
    torch.testing.assert_close(new.bias, torch.zeros(4, dtype=torch.float64), rtol=0, atol=0)
    x = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(new(x), plain(x), rtol=0, atol=0)


def test_only_batchnorms_with_torchs_own_forward_fold():
    class WithActivation(nn.BatchNorm2d):  # like timm's BatchNormAct2d: the forward does more than normalise
        def forward(self, x):
            return torch.relu(super().forward(x))

    assert plain_batchnorm(nn.BatchNorm2d(4)) and plain_batchnorm(nn.BatchNorm1d(4))
    assert not plain_batchnorm(WithActivation(4)) and not plain_batchnorm(nn.Conv2d(4, 4, 1))
