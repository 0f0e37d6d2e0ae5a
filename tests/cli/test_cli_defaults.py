"""Defaults that used to give wrong results quietly (issue 18, item 4)."""

from __future__ import annotations

import pytest

from rankcut.files.checkpoint import read_meta
from rankcut.files.statsfile import load_stats
from rankcut.model import archs

CPU = ["--device", "cpu"]


def test_mnist5k_needs_its_split(run_cli, mnist_ckpt):
    message = run_cli(["eval", mnist_ckpt, "--data", "mnist5k", *CPU], fails=True).message
    assert message == "error: say which mnist5k digits: mnist5k:train (4,000) or mnist5k:test (1,000)"


def test_a_user_architecture_needs_its_input(run_cli, tmp_path, monkeypatch):
    (tmp_path / "mynet_h18.py").write_text("from torch import nn\n\ndef build():\n"
                                           "    return nn.Sequential(nn.Flatten(), nn.Linear(12, 2))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "mine.safetensors"
    message = run_cli(["init", "--arch", "mynet_h18:build", "-o", out], fails=True).message
    assert message == ("error: give --input C,H,W (and --mean, --std) for mynet_h18:build: rankcut cannot tell what "
                       "input your architecture takes")
    result = run_cli(["init", "--arch", "mynet_h18:build", "--input", "3,2,2", "-o", out])
    assert result.stderr.startswith("warning: mynet_h18:build has no known normalisation for 3 channel(s)")
    assert read_meta(out).input.shape == (3, 2, 2)
    quiet = run_cli(["init", "--arch", "mynet_h18:build", "--input", "3,2,2", "--mean", "0.5,0.5,0.5",
                     "--std", "0.2,0.2,0.2", "-o", out])
    assert quiet.stderr == ""


def test_small_resnet_input_channels_follow_input(run_cli, tmp_path):
    out = tmp_path / "rgb.safetensors"
    result = run_cli(["init", "--arch", "rankcut:small-resnet", "--input", "3,32,32", "-o", out])
    meta = read_meta(out)
    assert meta.arch_kwargs == {"in_channels": 3}
    assert meta.input == archs.InputContract((3, 32, 32), archs.IMAGENET_MEAN, archs.IMAGENET_STD)
    assert "no known normalisation for 3 channel(s)" in result.stderr and len(result.stderr.splitlines()) == 1
    assert run_cli(["init", "--arch", "rankcut:small-resnet", "-o", out]).stderr == ""  # its own 1x28x28


def test_selecting_the_output_layer_warns(run_cli, mnist_ckpt, tmp_path):
    stats = tmp_path / "s.npz"
    err = run_cli(["stats", mnist_ckpt, "--data", "synthetic:16", "--layers", "fc2", *CPU, "-o", stats]).stderr
    assert err.startswith("warning: fc2 is the output layer: cutting it changes the logits"), err
    err = run_cli(["project", mnist_ckpt, "--stats", stats, "--keep", "0.5", "-o", tmp_path / "p.safetensors"]).stderr
    assert "warning: fc2 is the output layer" in err, err
    err = run_cli(["project", mnist_ckpt, "--method", "svd", "--layers", "fc2", "--keep", "0.5",
                   "-o", tmp_path / "q.safetensors"]).stderr
    assert "warning: fc2 is the output layer" in err, err


@pytest.mark.parametrize("layers", [["--layers", "conv2,fc1"], ["--layers", "conv2", "--layers", "fc1"]])
def test_layers_split_on_commas(run_cli, mnist_ckpt, tmp_path, layers):
    stats = tmp_path / "s.npz"
    run_cli(["stats", mnist_ckpt, "--data", "synthetic:16", *layers, *CPU, "-o", stats])
    assert list(load_stats(stats).layers) == ["conv2", "fc1"]
    out = run_cli(["project", mnist_ckpt, "--method", "svd", *layers, "--exclude", "conv1,conv2", "--keep", "0.5",
                   "-o", tmp_path / "p.safetensors", "--json"]).data
    assert [r["layer"] for r in out["layers"]] == ["fc1"]
