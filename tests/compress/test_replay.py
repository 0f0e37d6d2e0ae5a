"""``compress.replay``: refit passes started from a block's kept input give the same refit, bit for bit, as
passes from the data, and run the layers before the block less often; only blocks called once qualify."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.utils.data import TensorDataset

from rankcut.api import RefitConfig, refit
from rankcut.compress.replay import Replay
from rankcut.model.archs import InputContract
from rankcut.model.edits import LowRankPair

CONTRACT = InputContract((2, 6, 6), (0.0, 0.0), (1.0, 1.0))


class Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)

    def forward(self, x):
        return torch.relu(x + self.conv2(torch.relu(self.conv1(x))))


class Blocks(nn.Module):
    """A stem, then two stages of two residual blocks: the blocks and stages are called once each."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(2, 4, 3, padding=1)
        self.stage1 = nn.Sequential(Block(4), Block(4))
        self.stage2 = nn.Sequential(Block(4), Block(4))
        self.fc = nn.Linear(4 * 36, 3)

    def forward(self, x):
        return self.fc(self.stage2(self.stage1(torch.relu(self.stem(x)))).flatten(1))


def _compressed() -> tuple[nn.Module, nn.Module, TensorDataset]:
    torch.manual_seed(0)
    teacher = Blocks().eval()
    model = copy.deepcopy(teacher)
    g = torch.Generator().manual_seed(5)
    for name in ("stem", "stage1.0.conv1", "stage1.0.conv2", "stage1.1.conv2", "stage2.0.conv1", "stage2.1.conv2"):
        LowRankPair(name, 2).apply(model)
        with torch.no_grad():
            for p in model.get_submodule(name).parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    data = TensorDataset(torch.randn(80, *CONTRACT.shape, generator=g), torch.zeros(80, dtype=torch.long))
    return model, teacher, data


def test_passes_from_kept_block_inputs_give_the_same_refit_and_skip_the_stem(monkeypatch):
    """Six pairs in four blocks: with replay the stem (a pair, so also a refitted layer) runs in the passes
    that enter a new stage only; without (no block fits in 0 bytes) in every pass. The weights are equal, also
    with the teacher run beside each pass instead of its outputs kept."""
    model, teacher, data = _compressed()
    plain, before = copy.deepcopy(model), copy.deepcopy(model).state_dict()
    alongside = copy.deepcopy(model)  # the teacher's outputs not kept: it runs beside each pass
    calls = {"replay": 0, "plain": 0}

    def count(key):
        def hook(*_):
            calls[key] += 1
        return hook

    model.stem.register_forward_pre_hook(count("replay"))
    plain.stem.register_forward_pre_hook(count("plain"))
    refit(model, teacher, CONTRACT, data, RefitConfig(batch_size=32))
    monkeypatch.setattr("rankcut.compress.refit.CACHE_BYTES", 0)
    refit(alongside, teacher, CONTRACT, data, RefitConfig(batch_size=32))
    monkeypatch.setattr("rankcut.api.CACHE_BYTES", 0)
    refit(plain, teacher, CONTRACT, data, RefitConfig(batch_size=32))
    for key, value in plain.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
        assert torch.equal(alongside.state_dict()[key], value), key
    assert not torch.equal(before["stage2.1.conv2.up.weight"], plain.state_dict()["stage2.1.conv2.up.weight"])
    batches = 3  # 80 samples, 32 a batch
    # The pass of each of the six targets (the stem's own stops before it runs) and the probes: the stem runs
    # in the passes of stage1.0.conv1 and stage2.0.conv1 only (the first layers in a new stage) with replay.
    assert calls["plain"] - calls["replay"] == 3 * batches, calls


class Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.shared = nn.Sequential(nn.Conv2d(2, 2, 1), nn.ReLU())
        self.once = nn.Sequential(nn.Conv2d(2, 2, 1), nn.ReLU())
        self.keyword = Keyword()

    def forward(self, x):
        return self.keyword(self.once(self.shared(self.shared(x))), scale=2.0)


class Keyword(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 1)

    def forward(self, x, scale=1.0):
        return self.conv(x) * scale


def test_only_blocks_called_once_on_positional_tensors_within_the_limit_qualify():
    model = Twice().eval()
    per_sample = 2 * 6 * 6 * 4  # bytes of one sample's input to `once`
    assert Replay(model, CONTRACT, 10, 10 * per_sample).blocks == {"once"}
    assert Replay(model, CONTRACT, 11, 10 * per_sample).blocks == set()
