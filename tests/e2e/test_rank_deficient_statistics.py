"""stats then project on data that cannot show every channel (few samples, dead channels, constant images):
the commands warn, and a projection to at least the data's rank reproduces the layer's outputs on it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from rankcut.files.checkpoint import load, load_with_meta, save
from rankcut.files.statsfile import load_stats, numerical_rank
from rankcut.run.data import open_data
from rankcut.stats.collect import hooks

CPU = ["--device", "cpu"]


def _outputs(model, layer: str, dataset) -> torch.Tensor:
    """The outputs of ``layer`` on every item of ``dataset``, in order."""
    x = torch.stack([dataset[i][0] for i in range(len(dataset))])
    seen = []
    with hooks(model, {layer: layer}, lambda _, out: seen.append(out.detach().clone())), torch.no_grad():
        model(x)
    return seen[0].double()


def _project_reproduces(run_cli, ckpt: Path, data: str, layer: str, keep: float, tmp_path: Path, warning: str) -> int:
    """stats (checking the rank warning), project --method pca at ``keep``: the layer's outputs on the data return."""
    stats = tmp_path / "s.npz"
    err = run_cli(["stats", ckpt, "--data", data, *CPU, "-o", stats]).stderr
    assert any(warning in line and line.startswith("warning: ") for line in err.splitlines()), err
    s = load_stats(stats).layers[layer]
    rank = numerical_rank(s)
    out = tmp_path / "p.safetensors"
    result = run_cli(["project", ckpt, "--stats", stats, "--layers", layer, "--keep", keep, "-o", out, "--json"]).data
    (row,) = result["layers"]
    assert row["status"] == "projected" and row["new_rank"] >= rank, row
    original, meta = load_with_meta(ckpt)
    projected = load(out)
    assert all(torch.isfinite(p).all() for p in projected.parameters())
    dataset = open_data(data, meta.input)
    before, after = _outputs(original, layer, dataset), _outputs(projected, layer, dataset)
    scale = before.abs().max().clamp_min(1e-6)
    torch.testing.assert_close(after / scale, before / scale, atol=2e-5, rtol=0,
                               msg=f"{layer}: projection to rank {row['new_rank']} >= data rank {rank} is not exact")
    return rank


def test_fewer_samples_than_channels(run_cli, mnist_ckpt, tmp_path):
    """fc1 has 128 channels; 16 samples give a covariance of rank 15: warned, and rank 16 is exact on them."""
    rank = _project_reproduces(run_cli, mnist_ckpt, "synthetic:16", "fc1", 16 / 128, tmp_path,
                               "layer fc1 has 128 channels but the statistics saw only 16 positions")
    assert rank == 15
    err = run_cli(["stats", mnist_ckpt, "--data", "synthetic:16", *CPU, "-o", tmp_path / "s.npz"]).stderr
    assert "use at least 129 samples" in err


def test_dead_channels(run_cli, mnist_ckpt, tmp_path):
    """40 of conv2's 64 filters output a constant: rank 24, warned, and a rank-26 pair is exact on the data."""
    model, meta = load_with_meta(mnist_ckpt)
    with torch.no_grad():
        model.conv2.weight[:40] = 0
        model.conv2.bias[:40] = 0.25
    dead = tmp_path / "dead.safetensors"
    save(model, meta, dead)
    rank = _project_reproduces(run_cli, dead, "synthetic:16", "conv2", 26 / 64, tmp_path,
                               "layer conv2: its covariance has rank 24 < 64")
    assert rank == 24


def test_constant_inputs(run_cli, mnist_ckpt, tmp_path):
    """Every image the same flat grey: conv1's outputs never vary, rank 0; rank 1 still reproduces them."""
    data = tmp_path / "flat.npz"
    np.savez(data, x=np.full((12, 28, 28), 128, np.uint8))
    rank = _project_reproduces(run_cli, mnist_ckpt, str(data), "conv1", 1 / 32, tmp_path,
                               "layer conv1: its covariance has rank 0 < 9 over 8,112 positions (32 of its channels are constant")
    assert rank == 0
