"""``--structure channels``: chains from the fx graph, exact slicing, least-squares refit, predicted loss, costs."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from rankcut.compress.channel_budget import resized_cost
from rankcut.compress.channels import prune_chain, select
from rankcut.dist import Context
from rankcut.errors import RankcutError
from rankcut.files.checkpoint import CheckpointMeta, load, save
from rankcut.files.statsfile import load_stats
from rankcut.model.archs import InputContract, MnistCNN
from rankcut.model.cost import count_macs, count_params
from rankcut.model.graph import find_chains
from rankcut.stats.inputs import chain_moments

CPU = Context(0, 1, torch.device("cpu"))
SMALL = InputContract((3, 8, 8), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))


class Chains(nn.Module):
    """Every kind of chain and every kind of refusal, small enough to run in double precision."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.act = nn.PReLU(6)
        self.dw = nn.Conv2d(6, 6, 3, padding=1, groups=6)
        self.dw_bn = nn.BatchNorm2d(6)
        self.point = nn.Conv2d(6, 8, 1, bias=False)  # consumer of stem (1x1, gains a bias), producer for mid
        self.mid = nn.Conv2d(8, 8, 3, padding=1)  # consumer of point (3x3), its output joins a residual add
        self.res = nn.Conv2d(3, 8, 1)           # the other side of that add
        self.side = nn.Conv2d(8, 4, 1)          # concatenated
        self.other = nn.Conv2d(8, 4, 1)         # concatenated
        self.twice = nn.Conv2d(8, 5, 1)         # two consumers
        self.a = nn.Conv2d(5, 3, 1)
        self.b = nn.Conv2d(5, 3, 1)
        self.tail = nn.Conv2d(6, 7, 1, bias=False)  # flatten -> fc, no bias of its own
        self.fc = nn.Linear(7 * 16, 9)
        self.head = nn.Linear(9, 4)

    def forward(self, inp):
        x = self.point(self.dw_bn(self.dw(self.act(self.bn(self.stem(inp))))))
        x = torch.relu(x)
        x = nn.functional.relu(self.mid(x)) + self.res(inp)
        x = torch.cat([self.side(x), self.other(x)], 1)
        y = self.twice(x)
        x = torch.cat([self.a(y), self.b(y)], 1)
        x = nn.functional.max_pool2d(self.tail(x), 2).flatten(1)
        return self.head(nn.functional.gelu(self.fc(x)))


def _model(seed: int = 0, dtype=torch.float64) -> nn.Module:
    torch.manual_seed(seed)
    model = Chains()
    with torch.no_grad():
        for bn in (model.bn, model.dw_bn):  # eval-mode BatchNorm with statistics that matter
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.3, 0.3)
        model.act.weight.uniform_(0.05, 0.5)
    return model.to(dtype).eval()


def _data(n: int = 64, seed: int = 1, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _chains(model) -> dict:
    return {c.producer: c for c in find_chains(model, SMALL)[0]}


def _consumer_io(model, name: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    seen = {}
    handle = model.get_submodule(name).register_forward_hook(lambda _, i, o: seen.update(i=i[0], o=o))
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    return seen["i"], seen["o"]


def test_chains_found_and_refused_with_reasons():
    chains, refused = find_chains(_model(), SMALL)
    found = {c.producer: c for c in chains}
    assert found["stem"].consumer == "point" and found["stem"].carried == ("bn", "act", "dw", "dw_bn")
    assert found["point"].consumer == "mid" and found["point"].positions == 64
    assert found["tail"].consumer == "fc" and found["tail"].block == 16  # 7 channels x 4x4 after the pool
    assert found["fc"].consumer == "head"
    assert "residual add" in refused["mid"] and "residual add" in refused["res"]
    assert "concatenated" in refused["side"] and "concatenated" in refused["other"]
    assert "2 users" in refused["twice"]
    assert "model's output" in refused["head"]
    assert "grouped" in refused["dw"]


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return self.conv(x) if x.sum() > 0 else -self.conv(x)  # data-dependent control flow


def test_untraceable_model_is_one_clear_error():
    with pytest.raises(RankcutError, match="cannot be traced.*--structure pair still works"):
        find_chains(Untraceable(), SMALL)


def _prune(model, producer: str, k: int, x: torch.Tensor):
    chain = _chains(model)[producer]
    moments = chain_moments(model, [chain], [(x, None)], CPU)[producer]
    selection = select(model, chain, moments)
    pruned = copy.deepcopy(model)
    edit, loss = prune_chain(pruned, chain, moments, selection.kept(k))
    return pruned, edit, loss, selection, chain


def test_keeping_every_channel_reproduces_the_outputs():
    model, x = _model(dtype=torch.float32), _data(dtype=torch.float32)
    pruned = model
    for producer in ("stem", "point", "tail", "fc"):
        chain = _chains(pruned)[producer]
        pruned, *_ = _prune(pruned, producer, chain.channels, x)
    with torch.no_grad():
        want, got = model(x), pruned(x)
    err = ((got - want).norm() / want.norm()).item()
    assert err < 1e-5, f"k = C changed the outputs by {err:.2e} (relative)"


@pytest.mark.parametrize("producer", ["stem", "fc"])  # 1x1 conv consumer (point), Linear consumer (head)
def test_predicted_loss_is_the_measured_output_error_at_every_k(producer):
    """Exact for a 1x1 conv and a Linear consumer: sum over positions of ||y - y'||^2 per sample == loss."""
    model, x = _model(), _data()
    chain = _chains(model)[producer]
    _, want = _consumer_io(model, chain.consumer, x)
    for k in range(1, chain.channels + 1):
        pruned, _, loss, selection, _ = _prune(model, producer, k, x)
        _, got = _consumer_io(pruned, chain.consumer, x)
        measured = (got - want).pow(2).sum().item() / len(x)
        scale = selection.loss[0].item()
        assert abs(measured - loss) <= 1e-9 * scale, f"k={k}: measured {measured:.6g}, predicted {loss:.6g}"
        assert abs(selection.loss[k].item() - loss) <= 1e-6 * scale, f"k={k}: greedy curve {selection.loss[k]:.6g}"
    assert selection.loss[0] > 0 and selection.loss[-1] == 0


def test_kxk_conv_consumer_prediction_tracks_the_measured_error(capsys):
    """A 3x3 padded consumer (point -> mid): the prediction keeps only same-tap terms and ignores the borders.

    Errors at neighbouring positions are correlated here (the stem and depthwise convs smooth the maps), so
    the real error is larger than predicted: the ratio is printed, and bounded loosely; the order holds.
    """
    model, x = _model(), _data(256)
    chain = _chains(model)["point"]
    _, want = _consumer_io(model, chain.consumer, x)
    measured, predicted = [], []
    for k in (1, 2, 3, 4):
        pruned, _, loss, _, _ = _prune(model, "point", k, x)
        _, got = _consumer_io(pruned, chain.consumer, x)
        measured.append((got - want).pow(2).sum().item() / len(x))
        predicted.append(loss)
    ratios = np.array(measured) / np.array(predicted)
    with capsys.disabled():
        print(f"\n3x3 padded consumer, measured / predicted output error at k=1..4: {np.round(ratios, 3).tolist()}")
    assert all(0.25 < r < 4 for r in ratios), f"measured / predicted {ratios}: the same-tap prediction is far off"
    assert measured == sorted(measured, reverse=True), f"keeping more channels must not hurt: {measured}"


def test_batchnorm_prelu_and_depthwise_channels_are_sliced_with_their_channels():
    model, x = _model(), _data()
    pruned, edit, *_ = _prune(model, "stem", 3, x)
    kept = list(edit.kept)
    assert pruned.bn.num_features == pruned.act.num_parameters == pruned.dw.groups == pruned.dw_bn.num_features == 3
    before, _ = _consumer_io(model, "point", x)
    after, _ = _consumer_io(pruned, "point", x)
    torch.testing.assert_close(after, before[:, kept], rtol=1e-12, atol=1e-12)


def test_flatten_into_linear_keeps_whole_blocks():
    model, x = _model(), _data()
    pruned, edit, *_ = _prune(model, "tail", 4, x)
    assert pruned.fc.in_features == 4 * 16 and pruned.tail.bias is None and pruned.fc.bias is not None
    before, _ = _consumer_io(model, "fc", x)
    after, _ = _consumer_io(pruned, "fc", x)
    cols = [c * 16 + i for c in edit.kept for i in range(16)]
    torch.testing.assert_close(after, before[:, cols], rtol=1e-12, atol=1e-12)


def test_exact_costs_equal_count_macs_and_count_params():
    """Widths on every chain at once, including a layer that is both a consumer and a producer."""
    model = _model(dtype=torch.float32)
    contract = SMALL
    chains = list(_chains(model).values())
    widths = {"stem": 2, "point": 5, "tail": 3, "fc": 4}
    macs, per_layer = count_macs(model, contract)
    params = count_params(model)
    before, after = resized_cost(model, chains, {}, per_layer), resized_cost(model, chains, widths, per_layer)
    x = _data(dtype=torch.float32)
    for c in chains:  # prune one after another, as project does
        pruned_chain = _chains(model)[c.producer]
        model, *_ = _prune(model, c.producer, widths[c.producer], x)
        assert pruned_chain.channels == c.channels
    assert count_macs(model, contract)[0] == macs - before[0] + after[0]
    assert count_params(model) == params - before[1] + after[1]


def test_the_edit_replays_on_load_bit_exact_and_pruning_again_composes(tmp_path):
    torch.manual_seed(0)
    model, x = MnistCNN().eval(), torch.randn(16, 1, 28, 28)
    contract = InputContract((1, 28, 28), (0.0,), (1.0,))
    meta = CheckpointMeta("rankcut:mnist-cnn", {}, contract)
    edits = []
    for round_, k in enumerate((20, 9)):
        for producer in ("conv1", "conv2", "fc1"):
            chain = {c.producer: c for c in find_chains(model, contract)[0]}[producer]
            moments = chain_moments(model, [chain], [(x, None)], CPU)[producer]
            keep = min(k, chain.channels)
            edit, _ = prune_chain(model, chain, moments, select(model, chain, moments).kept(keep))
            edits.append(edit)
        path = tmp_path / f"round{round_}.safetensors"
        save(model, meta.with_edits(*edits), path)
        loaded = load(path)
        with torch.no_grad():
            assert torch.equal(loaded(x), model(x)), "replaying the edits must rebuild the same model"
    assert model.conv1.out_channels == 9 and model.conv2.in_channels == 9 and model.fc1.in_features == 9 * 144
    assert sorted(dict(model.named_modules())) == sorted(dict(MnistCNN().named_modules())), "no module added"


def test_cli_channels_pipeline_budget_and_old_stats(tmp_path, mnist_ckpt, run_cli):
    data = tmp_path / "x.npz"
    np.savez(data, x=torch.rand(40, 1, 28, 28, generator=torch.Generator().manual_seed(0)).numpy())
    old, new = tmp_path / "old.npz", tmp_path / "new.npz"
    run_cli(["stats", mnist_ckpt, "--data", data, "-o", old, "-q"])
    run_cli(["stats", mnist_ckpt, "--data", data, "--structure", "channels", "-o", new, "-q"])
    assert load_stats(old).chains == {} and set(load_stats(new).chains) == {"conv1", "conv2", "fc1"}
    message = run_cli(["project", mnist_ckpt, "--stats", old, "--structure", "channels", "--keep", "0.5",
                       "-o", tmp_path / "p.safetensors"], fails=True).message
    assert "no channel statistics" in message and "--structure channels" in message
    message = run_cli(["project", mnist_ckpt, "--stats", new, "--structure", "channels", "--keep", "0.5",
                       "--layers", "conv9", "-o", tmp_path / "p.safetensors"], fails=True).message
    assert "'conv9' matches no conv or linear layer" in message
    out = tmp_path / "budget.safetensors"
    result = run_cli(["project", mnist_ckpt, "--stats", new, "--structure", "channels", "--macs", "0.3", "-o", out,
                      "--json"]).data
    assert result["totals"]["macs_after"] <= 0.3 * result["totals"]["macs_before"]
    info = run_cli(["info", out, "--json"]).data
    rows = {r["name"]: r for r in info["layers"]}
    assert info["macs"] == result["totals"]["macs_after"]
    assert any(r["structure"] == "channels" for r in rows.values())
    assert rows["conv1"]["width"] == load(out).conv1.out_channels


@pytest.mark.parametrize("how", [["--keep", "0.4"], ["--macs", "0.3"]])
def test_round_channels_keeps_multiples(tmp_path, mnist_ckpt, run_cli, how):
    """--round-channels 8: every pruned chain keeps a multiple of 8 channels (a budget still holds)."""
    data, stats, out = tmp_path / "x.npz", tmp_path / "s.npz", tmp_path / "r.safetensors"
    np.savez(data, x=torch.rand(40, 1, 28, 28, generator=torch.Generator().manual_seed(0)).numpy())
    run_cli(["stats", mnist_ckpt, "--data", data, "--structure", "channels", "-o", stats, "-q"])
    result = run_cli(["project", mnist_ckpt, "--stats", stats, "--structure", "channels", *how, "--round-channels",
                      "8", "-o", out, "--json"]).data
    kept = [r["kept"] for r in result["chains"] if r["status"] == "pruned"]
    assert kept and all(k % 8 == 0 for k in kept), kept
    assert result["totals"]["macs_ratio"] <= 0.3 or how[0] == "--keep"
