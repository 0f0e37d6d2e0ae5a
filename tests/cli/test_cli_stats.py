"""``rankcut stats``: its report, its refusals, and layers whose outputs overflow float32."""

from __future__ import annotations

import pytest
import torch
from builders import with_weights

CPU = ["--device", "cpu"]


def test_cli_stats_table_and_info(tmp_path, mnist_ckpt, run_cli):
    stats = tmp_path / "s.npz"
    data = run_cli(["stats", mnist_ckpt, "--data", "synthetic:16", "-o", stats, "--json"]).data
    assert [row["layer"] for row in data["layers"]] == ["conv1", "conv2", "fc1"]
    assert all(row["rank_90"] <= row["rank_95"] <= row["rank_99"] <= row["channels"] for row in data["layers"])
    assert data["samples"] == 16 and data["layers"][0]["positions"] == 16 * 26 * 26
    assert "rank@95%" in run_cli(["info", stats]).stdout
    assert run_cli(["info", stats, "--json"]).data["layers"] == data["layers"]


def test_cli_stats_rejects_unknown_layers(tmp_path, mnist_ckpt, run_cli):
    out = tmp_path / "s.npz"
    r = run_cli(["stats", mnist_ckpt, "--data", "synthetic:8", "--layers", "layer9*", "-o", out], fails=True)
    assert "matches no target layer" in r.message and not out.exists()


def test_stats_names_the_first_layer_that_overflows(run_cli, mnist_ckpt, tmp_path):
    # Finite weights whose outputs overflow float32 at conv2 (and NaN after): conv1 is fine.
    blown = with_weights(mnist_ckpt, tmp_path / "blown.safetensors", **{"conv2.weight": torch.full((64, 32, 3, 3), 3e38)})
    line = run_cli(["stats", blown, "--data", "synthetic:8", *CPU, "-o", tmp_path / "s.npz"], fails=True).message
    assert "layer conv2 produced NaN or Inf" in line
    assert not (tmp_path / "s.npz").exists()
    # Outputs that stay finite but whose squares overflow float32: said as such.
    big = with_weights(mnist_ckpt, tmp_path / "big.safetensors", **{"conv2.weight": torch.full((64, 32, 3, 3), 1e20)})
    line = run_cli(["stats", big, "--data", "synthetic:8", *CPU, "-o", tmp_path / "s.npz"], fails=True).message
    assert "layer conv2 has outputs too large for float32 statistics" in line


def test_stats_names_the_layer_not_its_batchnorm(run_cli, small_files, tmp_path):
    blown = with_weights(small_files["ckpt"], tmp_path / "blown.safetensors",
                          **{"layer2.conv1.weight": torch.full((8, 4, 3, 3), 3e38)})
    line = run_cli(["stats", blown, "--data", "synthetic:8", *CPU, "-o", tmp_path / "s.npz"], fails=True).message
    assert line.startswith("error: layer layer2.conv1 ")


def test_cli_stats_exclude_drops_layers_and_refuses_a_pattern_matching_none(tmp_path, mnist_ckpt, run_cli):
    stats = tmp_path / "s.npz"
    data = run_cli(["stats", mnist_ckpt, "--data", "synthetic:8", *CPU, "--exclude", "conv*", "-o", stats,
                    "--json"]).data
    assert [row["layer"] for row in data["layers"]] == ["fc1"]
    out = tmp_path / "none.npz"
    line = run_cli(["stats", mnist_ckpt, "--data", "synthetic:8", *CPU, "--exclude", "conv9,fc9", "-o", out],
                   fails=True).message
    assert "--exclude 'conv9' matches no target layer" in line and not out.exists()


@pytest.mark.parametrize("args,message", [
    (["--device", "foo"], "--device must be auto, cpu or cuda, got 'foo'"),
    (["--device", "cuda"], "--device cuda was asked for but no CUDA GPU is available"),
    (["--grad", "kl", "--probes", "0", *CPU], "--probes must be at least 1"),
])
def test_cli_stats_refuses_bad_devices_and_probes(tmp_path, mnist_ckpt, run_cli, monkeypatch, args, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same answer on a machine with a GPU
    out = tmp_path / "s.npz"
    line = run_cli(["stats", mnist_ckpt, "--data", "synthetic:8", *args, "-o", out], fails=True).message
    assert line == f"error: {message}" and not out.exists()
