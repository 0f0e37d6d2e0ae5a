"""``--structure auto``: whole, pair or channels per target, one currency, joint exact costs, greedy allocation."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from rankcut.api import (
    Budget,
    ProjectConfig,
    StatsConfig,
    collect_stats,
    project,
    project_targets,
)
from rankcut.compress.auto import (
    CHANNELS,
    PAIR,
    WHOLE,
    Choice,
    apply_choices,
    candidates,
    consumer_metric,
)
from rankcut.compress.channels import loss_energy
from rankcut.compress.prune import fitting_chains
from rankcut.errors import RankcutError
from rankcut.model.archs import InputContract
from rankcut.model.cost import count_macs, count_params
from rankcut.model.edits import FoldBatchNorm

CONTRACT = InputContract((6, 1, 1), (0.0,) * 6, (1.0,) * 6)


class Duo(nn.Module):
    """``dup``: filters in identical pairs, so half its channels are free to drop but a pair saves nothing;
    ``low``: a rank-2 weight, so a rank-2 pair is exact but its rectified channels cannot be dropped."""

    def __init__(self):
        super().__init__()
        self.dup = nn.Linear(6, 8)
        self.low = nn.Linear(8, 16)
        self.mix = nn.Linear(16, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.dup(x.flatten(1)))
        return self.head(torch.relu(self.mix(torch.relu(self.low(x)))))


def _duo() -> nn.Module:
    torch.manual_seed(0)
    model = Duo().double()
    with torch.no_grad():
        model.dup.weight[1::2] = model.dup.weight[0::2]
        model.dup.bias[1::2] = model.dup.bias[0::2]
        model.low.weight.copy_(torch.randn(16, 2, dtype=torch.float64) @ torch.randn(2, 8, dtype=torch.float64) / 2)
    return model.eval()


@pytest.fixture(scope="module")
def duo():
    torch.set_num_threads(1)
    model = _duo()
    x = torch.randn(512, *CONTRACT.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    data = TensorDataset(x, torch.zeros(len(x), dtype=torch.long))
    stats = collect_stats(model, CONTRACT, data, StatsConfig(grad="kl", probes=2, structure="channels"))
    return model, stats, x


def _auto(model, stats, kind: str, fraction: float):
    small = copy.deepcopy(model)
    result = project(small, CONTRACT, stats, ProjectConfig(method="fisher", structure="auto",
                                                           budget=Budget(kind, fraction)))
    return small, result


def test_keeping_every_channel_and_rank_reproduces_the_outputs(duo):
    """Every option at full size, a pair consuming a channel-pruned chain included, changes nothing."""
    model, stats, x = duo
    config = ProjectConfig(method="fisher", structure="auto", budget=Budget("macs", 0.5))
    targets = project_targets(model, CONTRACT, stats, config)
    found = candidates(model, stats, targets, *fitting_chains(model, CONTRACT, stats, "s", None, None), config.options)
    full = copy.deepcopy(model)
    state = {"dup": Choice(CHANNELS, 8), "low": Choice(PAIR, 16), "mix": Choice(PAIR, 8)}
    edits, _ = apply_choices(full, stats, found, state, config.options)
    assert [e.kind for e in edits] == ["prune_channels", "low_rank", "low_rank"]
    with torch.no_grad():
        want, got = model(x), full(x)
    err = ((got - want).norm() / want.norm()).item()
    assert err < 1e-10, f"full-size auto changed the outputs by {err:.2e}"


@pytest.mark.parametrize("kind", ["macs", "params"])
def test_auto_never_exceeds_the_budget_and_its_costs_are_counted_exactly(duo, kind):
    model, stats, _ = duo
    macs, params = count_macs(model, CONTRACT)[0], count_params(model)
    before = macs if kind == "macs" else params
    for fraction in (0.9, 0.6, 0.45, 0.3):
        small, result = _auto(model, stats, kind, fraction)
        counted = {"macs": count_macs(small, CONTRACT)[0], "params": count_params(small)}
        assert counted[kind] <= math.floor(fraction * before), f"{kind} {fraction}: {counted[kind]} over budget"
        assert (result.totals["macs_after"], result.totals["params_after"]) == (counted["macs"], counted["params"])


def test_auto_picks_channels_where_a_pair_is_worse_and_a_pair_where_channels_are(duo):
    """``dup``: dropping one of each identical pair is free and cheaper than any pair; ``low``: the rank-2 pair
    is exact, its channels after the ReLU are not redundant. At 70% of the MACs both free moves fit."""
    model, stats, x = duo
    small, result = _auto(model, stats, "macs", 0.7)
    rows = {r["layer"]: r for r in result.layers}
    assert (rows["dup"]["structure"], rows["dup"]["size"]) == (CHANNELS, 4), rows["dup"]
    assert (rows["low"]["structure"], rows["low"]["size"]) == (PAIR, 2), rows["low"]
    assert rows["mix"]["structure"] == WHOLE
    with torch.no_grad():
        want, got = model(x), small(x)
    assert ((got - want).norm() / want.norm()).item() < 1e-6, "the two free moves must keep the outputs"


def test_predicted_loss_of_the_choice_is_the_sum_of_the_layers_predictions(duo):
    model, stats, _ = duo
    for fraction in (0.45, 0.3):  # at 0.45 channels on dup and low, a pair on mix
        _, result = _auto(model, stats, "macs", fraction)
        rows = result.to_dict()["layers"]
        assert fraction != 0.45 or {r["structure"] for r in rows} == {PAIR, CHANNELS}, rows
        total = sum(r["predicted_loss"] for r in rows)
        assert result.loss > 0
        assert abs(total - result.loss) <= 1e-6 * result.loss, f"{fraction}: rows {total:.9g}, plan {result.loss:.9g}"


def test_auto_refuses_keep_and_other_methods():
    with pytest.raises(RankcutError, match="auto chooses .* under a budget"):
        ProjectConfig(method="fisher", structure="auto", keep=0.5)
    with pytest.raises(RankcutError, match="use --method fisher"):
        ProjectConfig(method="pca", structure="auto", budget=Budget("macs", 0.5))
    with pytest.raises(RankcutError, match="--round-channels rounds kept channels"):
        ProjectConfig(method="pca", keep=0.5, round_channels=8)


class Normed(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.b = nn.Linear(8, 8)
        self.bn = nn.BatchNorm1d(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.b(torch.relu(self.a(x.flatten(1)))))))


def test_a_consumer_batchnorm_scales_the_metric_as_folding_it_would():
    """G is measured after the consumer's BatchNorm; carried back through its scale, the loss metric equals
    the metric of the same model with the BatchNorm folded into the consumer (the same function)."""
    torch.manual_seed(0)
    model = Normed().double().eval()
    with torch.no_grad():
        model.bn.running_var.uniform_(0.2, 3.0)
        model.bn.weight.uniform_(0.5, 2.0)
    x = torch.randn(128, *CONTRACT.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    stats = collect_stats(model, CONTRACT, TensorDataset(x, torch.zeros(128, dtype=torch.long)),
                          StatsConfig(grad="kl", structure="channels"))
    chain = stats.chains["a"].chain
    folded = copy.deepcopy(model)
    FoldBatchNorm("b", "bn").apply(folded)
    energy = loss_energy(model, chain, consumer_metric(model, chain, stats, 1e-3))[0]
    want = loss_energy(folded, chain, consumer_metric(folded, chain, stats, 1e-3))[0]
    torch.testing.assert_close(energy, want, rtol=1e-10, atol=0)
