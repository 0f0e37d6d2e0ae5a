"""Parameters and MACs (torch.utils.flop_counter) against counts done by hand."""

from __future__ import annotations

import pytest
from torch import nn

from rankcut.errors import RankcutError
from rankcut.model.archs import InputContract
from rankcut.model.cost import Geometry, count_macs, count_params, geometry, pair_saves, target_cost, target_macs
from rankcut.model.layers import empty_pair

RGB16 = InputContract((3, 16, 16), (0.0,) * 3, (1.0,) * 3)


def test_conv_and_linear_by_hand():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 10))
    total, per_layer = count_macs(model, RGB16)
    conv, linear = 8 * 3 * 3 * 3 * (8 * 8), 8 * 8 * 8 * 10  # outputs x inputs per output
    assert per_layer == {"0": conv, "3": linear}
    assert all(type(v) is int for v in (total, *per_layer.values()))  # counts, written as integers to JSON
    assert total == conv + linear
    assert count_params(model) == (8 * 3 * 3 * 3 + 8) + (8 * 8 * 8 * 10 + 10)


def test_a_pair_costs_its_two_layers():
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1))
    model[0] = empty_pair(model[0], 4)
    total, per_layer = count_macs(model, RGB16)
    down, up = 4 * 3 * 3 * 3 * 256, 16 * 4 * 256
    assert per_layer == {"0.down": down, "0.up": up} and total == down + up
    assert count_params(model) == (4 * 27 + 4) + (16 * 4 + 16)


def test_counting_neither_trains_nor_changes_the_mode():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    nn.init.constant_(model[0].bias, 1.0)
    model.train()
    count_macs(model, RGB16)
    assert model.training and model[1].training
    assert model[1].num_batches_tracked.item() == 0 and model[1].running_mean.abs().max().item() == 0
    model.eval()
    count_macs(model, RGB16)
    assert not model.training
    assert count_params(model) == 4 * 27 + 4 + 4 + 4  # BatchNorm's running statistics are buffers, not parameters


def test_pair_saves_exactly_below_the_break_even_rank():
    """Linear 8 -> 8: a rank-k pair costs k (8 + 8) MACs against 64, so rank 4 breaks even and does not save."""
    layer = nn.Linear(8, 8)
    assert [pair_saves(layer, k) for k in range(1, 8)] == [True, True, True, False, False, False, False]
    contract = InputContract((8, 1, 1), (0.0,) * 8, (1.0,) * 8)
    flat = nn.Sequential(nn.Flatten(), layer)
    whole = count_macs(flat, contract)[0]
    for k in (3, 4):
        paired = count_macs(nn.Sequential(nn.Flatten(), empty_pair(layer, k)), contract)[0]
        assert (paired < whole) == pair_saves(layer, k), (k, paired, whole)


def test_geometry_predicts_the_counted_cost_of_a_layer_and_of_its_pair():
    """Conv 3 -> 8, 3x3, stride 2 on 16x16: 27 inputs per output, 8 outputs, 64 output positions."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1))
    geo = geometry(model, "0", count_macs(model, RGB16)[1])
    assert geo == Geometry(27, 8, 64.0)
    assert Geometry.of(model[0]) == Geometry(27, 8, 1.0) and Geometry.of(model[0], 64.0) == geo
    assert geo.whole_macs() == 27 * 8 * 64 == target_macs(model, "0", count_macs(model, RGB16)[1])
    for k in (1, 3):
        paired = nn.Sequential(empty_pair(model[0], k))
        per_layer = count_macs(paired, RGB16)[1]
        assert geometry(paired, "0", per_layer) == geo  # a pair keeps the layer's geometry
        by_hand = (k * (27 + 8) * 64, k * 27 + k + 8 * k + 8)  # MACs and parameters of down and up
        assert target_cost(paired, "0", per_layer) == (geo.pair_macs(k), geo.pair_params(k)) == by_hand
    assert target_cost(model, "0", {"0": 5}) == (5, 8 * 27 + 8)
    assert target_macs(model, "0", {}) == 0 and target_macs(nn.Sequential(empty_pair(model[0], 2)), "0", {}) == 0
    assert Geometry(10, 4, 2.5).whole_macs() == 100 and Geometry(10, 4, 2.5).pair_macs(3) == 105


def test_geometry_refuses_a_layer_that_does_no_counted_work():
    model = nn.Sequential(nn.Conv2d(3, 8, 3))
    with pytest.raises(RankcutError, match="^0 does no counted work in a forward pass, so a MACs budget cannot "
                                           "price it$"):
        geometry(model, "0", {"0": 0})
    assert geometry(nn.Sequential(nn.Linear(1, 1)), "0", {"0": 1}) == Geometry(1, 1, 1.0)  # one MAC is work
    with pytest.raises(RankcutError, match="^0 does no counted work"):
        geometry(nn.Sequential(empty_pair(model[0], 2)), "0", {"0": 100})  # a pair's work is counted at its down half
