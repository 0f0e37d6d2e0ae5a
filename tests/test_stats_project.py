"""stats and project --method pca: exact algebra on real (small) models, and the CLI contract."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from rankcut.model import archs
from rankcut.model.contract import InputContract
from rankcut.files.checkpoint import load_with_meta
from rankcut.dist import Context
from rankcut.model.edits import get_module
from rankcut.model.layers import LowRank
from rankcut.compress.project import project_model
from rankcut.files.statsfile import LayerStats, StatsFile, load_stats, save_stats
from rankcut.stats.collect import Moments, collect_moments
from rankcut.model.targets import select, trace

CPU = Context(0, 1, torch.device("cpu"))


def batches(contract: InputContract, n: int, batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *contract.shape, generator=g)
    return [(x[i:i + batch], torch.zeros(len(x[i:i + batch]))) for i in range(0, n, batch)]


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


def test_targets_follow_batchnorm_and_skip_output_layer():
    model = archs.build("torchvision:resnet18", {}).eval()
    found, final = trace(model, InputContract((3, 32, 32), archs.IMAGENET_MEAN, archs.IMAGENET_STD))
    by_name = {t.name: t.bn for t in found}
    assert final == "fc"
    assert by_name["conv1"] == "bn1"
    assert by_name["layer1.0.conv2"] == "layer1.0.bn2"
    assert by_name["layer2.0.downsample.0"] == "layer2.0.downsample.1"
    assert len(found) == 21
    chosen = select(model, InputContract((3, 32, 32), archs.IMAGENET_MEAN, archs.IMAGENET_STD))
    assert "fc" not in {t.name for t in chosen} and len(chosen) == 20


def test_pca_reconstruction_error_equals_discarded_eigenvalues():
    torch.manual_seed(0)
    model = archs.build("rankcut:mnist-cnn", {}).eval()
    data = batches(archs.MNIST, 32, 16)
    targets = [t for t in select(model, archs.MNIST) if t.name == "conv2"]
    moments = collect_moments(model, targets, data, CPU)["conv2"]
    eig = torch.linalg.eigvalsh(moments.covariance).flip(0)
    k = 20
    original = get_module(model, "conv2")
    x = torch.cat([b[0] for b in data])
    with torch.no_grad():
        z_in = nn.functional.relu(model.conv1(x))
        z = original(z_in)
        project_model(model, targets, {"conv2": LayerStats(targets[0], moments)}, "pca", {"conv2": k})
        z_rank_k = get_module(model, "conv2")(z_in)
    mse = ((z - z_rank_k).double() ** 2).sum(1).mean()  # squared error per position, averaged
    torch.testing.assert_close(mse, eig[k:].sum(), rtol=1e-3, atol=0)


def test_moments_merge_equals_whole():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, 7, generator=g, dtype=torch.float64) * 3 + 5
    whole = Moments.of(x)
    halves = Moments.of(x[:371]).merge(Moments.of(x[371:]))
    spatial = Moments.of(x.reshape(10, 100, 7).transpose(1, 2))  # (N, C, positions) layout
    assert halves.count == whole.count
    torch.testing.assert_close(halves.mean, whole.mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(halves.m2, whole.m2, rtol=1e-10, atol=1e-9)
    torch.testing.assert_close(whole.covariance, torch.cov(x.T, correction=0), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(spatial.m2, whole.m2, rtol=1e-10, atol=1e-9)
    x32 = x.float()
    torch.testing.assert_close(Moments.of(x32).m2, whole.m2, rtol=1e-5, atol=1e-3)


def test_stats_file_merge_and_round_trip(tmp_path):
    model = archs.build("rankcut:mnist-cnn", {}).eval()
    targets = select(model, archs.MNIST)
    data = batches(archs.MNIST, 20, 10)

    def stats_of(part):
        m = collect_moments(model, targets, part, CPU)
        return StatsFile("digest", sum(len(b[0]) for b in part), {t.name: LayerStats(t, m[t.name]) for t in targets})

    whole, merged = stats_of(data), stats_of(data[:1]).merge(stats_of(data[1:]))
    save_stats(merged, tmp_path / "s.npz")
    loaded = load_stats(tmp_path / "s.npz")
    assert loaded.samples == 20 and list(loaded.layers) == [t.name for t in targets]
    for name in whole.layers:
        a, b = loaded.layers[name].moments.m2, whole.layers[name].moments.m2
        assert (a - b).norm() / b.norm() < 1e-6
        assert torch.equal(loaded.layers[name].moments.m2, merged.layers[name].moments.m2)
    with np.load(tmp_path / "s.npz", allow_pickle=False) as npz:
        assert npz["conv2/m2"].dtype == np.float64


def test_cli_iterative_projection_composes(tmp_path, mnist_ckpt, run_cli):
    current, ranks = mnist_ckpt, []
    for step in range(3):
        stats = tmp_path / f"s{step}.npz"
        out = tmp_path / f"p{step}.safetensors"
        run_cli(["stats", current, "--data", "synthetic:64", "-o", stats, "--quiet"])
        report = run_cli(["project", current, "--stats", stats, "--keep", "0.9", "-o", out, "--json"]).data
        assert report["totals"]["macs_after"] < report["totals"]["macs_before"]
        model, meta = load_with_meta(out)
        pair = get_module(model, "fc1")
        assert isinstance(pair, LowRank) and isinstance(pair.down, nn.Linear) and isinstance(pair.up, nn.Linear)
        ranks.append(pair.rank)
        current = out
    assert ranks == [115, 104, 94]
    assert isinstance(get_module(model, "conv2"), nn.Conv2d)  # rank 58 of 64 would not save MACs
    assert [e.kind for e in meta.edits] == ["low_rank"] * 3
    assert [h["command"] for h in meta.history] == ["init", "project", "project", "project"]


def test_cli_stats_table_and_info(tmp_path, mnist_ckpt, run_cli):
    stats = tmp_path / "s.npz"
    data = run_cli(["stats", mnist_ckpt, "--data", "synthetic:16", "-o", stats, "--json"]).data
    assert [row["layer"] for row in data["layers"]] == ["conv1", "conv2", "fc1"]
    assert all(row["rank_90"] <= row["rank_95"] <= row["rank_99"] <= row["channels"] for row in data["layers"])
    assert data["samples"] == 16 and data["layers"][0]["positions"] == 16 * 26 * 26
    assert "rank@95%" in run_cli(["info", stats]).stdout
    assert run_cli(["info", stats, "--json"]).data["layers"] == data["layers"]


@pytest.mark.parametrize("args,message", [
    (["--keep", "1.5"], "--keep must be in (0, 1]"),
    (["--keep", "0"], "--keep must be in (0, 1]"),
    (["--keep", "0.5", "--layers", "nope*"], "matches no layer"),
    (["--keep", "0.5", "--method", "magic"], "unknown method"),
])
def test_cli_project_rejects_bad_input(tmp_path, mnist_ckpt, run_cli, args, message):
    stats = tmp_path / "s.npz"
    run_cli(["stats", mnist_ckpt, "--data", "synthetic:8", "--layers", "conv*", "-o", stats])
    out = tmp_path / "out.safetensors"
    r = run_cli(["project", mnist_ckpt, "--stats", stats, *args, "-o", out], fails=True)
    assert message in r.message and not out.exists()


def test_cli_project_refuses_stats_of_another_checkpoint(tmp_path, mnist_ckpt, run_cli):
    other = tmp_path / "other.safetensors"
    run_cli(["init", "--arch", "rankcut:mnist-cnn", "--seed", "1", "-o", other])
    stats = tmp_path / "s.npz"
    run_cli(["stats", other, "--data", "synthetic:8", "-o", stats])
    out = tmp_path / "out.safetensors"
    r = run_cli(["project", mnist_ckpt, "--stats", stats, "--keep", "0.5", "-o", out], fails=True)
    assert "another checkpoint" in r.message and not out.exists()


def test_cli_project_refuses_layers_missing_from_stats(tmp_path, mnist_ckpt, run_cli):
    stats = tmp_path / "s.npz"
    run_cli(["stats", mnist_ckpt, "--data", "synthetic:8", "--layers", "conv*", "-o", stats])
    out = tmp_path / "out.safetensors"
    r = run_cli(["project", mnist_ckpt, "--stats", stats, "--keep", "0.5", "--layers", "fc1", "-o", out], fails=True)
    assert "matches no layer in" in r.message and not out.exists()


def test_cli_stats_rejects_unknown_layers(tmp_path, mnist_ckpt, run_cli):
    out = tmp_path / "s.npz"
    r = run_cli(["stats", mnist_ckpt, "--data", "synthetic:8", "--layers", "layer9*", "-o", out], fails=True)
    assert "matches no target layer" in r.message and not out.exists()
