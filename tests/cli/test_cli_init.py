"""``rankcut init``: the checkpoint it writes, its options, and its refusals (nothing written)."""

from __future__ import annotations

import pytest
import torch
from builders import folder_listing
from safetensors.torch import save_file

import rankcut
from rankcut.files.checkpoint import load, read_meta
from rankcut.model import archs


def test_init_writes_a_checkpoint(run_cli, mnist_ckpt, tmp_path):
    meta = read_meta(mnist_ckpt)
    assert meta.arch == "rankcut:mnist-cnn" and meta.arch_kwargs == {} and meta.edits == ()
    assert meta.input == archs.default_input("rankcut:mnist-cnn", {})
    assert meta.history[0]["command"] == "init" and meta.history[0]["weights"] == "random (seed 0)"

    out = tmp_path / "plain.safetensors"
    result = run_cli(["init", "-a", "rankcut:mnist-cnn", "-o", out])
    assert "params" in result.stdout and "1,199,882" in result.stdout and result.stderr == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mnist.safetensors", "plain.safetensors"]


def test_init_seed_decides_the_weights(run_cli, mnist_ckpt, tmp_path):
    same, other = tmp_path / "same.safetensors", tmp_path / "other.safetensors"
    run_cli(["init", "-a", "rankcut:mnist-cnn", "--seed", 0, "-o", same])
    run_cli(["init", "-a", "rankcut:mnist-cnn", "--seed", 1, "-o", other])
    assert torch.equal(load(same).conv1.weight, load(mnist_ckpt).conv1.weight)
    assert not torch.equal(load(other).conv1.weight, load(mnist_ckpt).conv1.weight)


def test_init_input_contract_options(run_cli, tmp_path):
    out = tmp_path / "c.safetensors"
    data = run_cli(["init", "-a", "rankcut:small-resnet", "--kwargs", '{"in_channels": 3, "width": 4}',
                    "--num-classes", 100, "--input", "3,32,32", "--mean", "0.5,0.4,0.3", "--std", "0.2,0.2,0.25",
                    "-o", out, "--json"]).data
    assert data["arch_kwargs"] == {"in_channels": 3, "width": 4, "num_classes": 100}
    meta = read_meta(out)
    assert meta.arch_kwargs == {"in_channels": 3, "width": 4, "num_classes": 100}
    assert meta.input.to_dict() == {"shape": [3, 32, 32], "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.2, 0.25]}

    # without --mean/--std a 3-channel built-in takes ImageNet's statistics (issue 18: not MNIST's repeated)
    out = tmp_path / "d.safetensors"
    run_cli(["init", "-a", "rankcut:small-resnet", "--kwargs", '{"in_channels": 3, "width": 4}', "-o", out])
    assert read_meta(out).input == archs.InputContract((3, 28, 28), archs.IMAGENET_MEAN, archs.IMAGENET_STD)


def test_help(run_cli):
    assert "--weights" in run_cli(["init", "--help"]).stdout
    assert "--json" in run_cli(["info", "--help"]).stdout


@pytest.mark.parametrize("arch, message", [
    ("resnet18", "unknown architecture"),
    ("torchvision:resnet19", "not a torchvision classification model"),
    ("rankcut:mnist", "built-ins are"),
    ("no_such_pkg_rc:build", "cannot import no_such_pkg_rc"),
])
def test_init_unknown_architecture(run_cli, tmp_path, arch, message):
    out = tmp_path / "out.safetensors"
    assert message in run_cli(["init", "-a", arch, "-o", out], fails=True).message
    assert folder_listing(tmp_path) == []


@pytest.mark.parametrize("arch, args, message", [
    ("rankcut:small-resnet", ["--kwargs", "{width: 4}"], "--kwargs is not valid JSON"),
    ("rankcut:small-resnet", ["--kwargs", "[4]"], "--kwargs must be a JSON object"),
    ("rankcut:small-resnet", ["--kwargs", '{"widht": 4}'], "cannot build rankcut:small-resnet"),
    ("rankcut:small-resnet", ["--kwargs", '{"width": 1000000000}'], "cannot build"),  # overflows even on meta
    ("rankcut:small-resnet", ["--kwargs", '{"width": 100000}'], "GiB for its weights"),  # refused before allocating
    ("torchvision:resnet18", ["--num-classes", "10000000000"], "GiB for its weights"),
    ("rankcut:small-resnet", ["--num-classes", "0"], "--num-classes must be at least 1"),
    ("rankcut:small-resnet", ["--num-classes", "-3"], "--num-classes must be at least 1"),
    ("rankcut:small-resnet", ["--input", "1,28"], "C,H,W"),
    ("rankcut:small-resnet", ["--input", "1,2.5,28"], "whole numbers"),
    ("rankcut:mnist-cnn", ["--input", "1,8,8"], "cannot run on input"),
    ("rankcut:mnist-cnn", ["--input", "3,28,28"], "cannot run on input"),
    ("rankcut:small-resnet", ["--input", "1,100000,100000"], "implausibly large"),
    ("rankcut:small-resnet", ["--mean", "0.1,0.2"], "one value per channel"),
    ("rankcut:small-resnet", ["--std", "0"], "std values must be positive"),
    ("rankcut:small-resnet", ["--std", "abc"], "--std must be comma-separated numbers"),
])
def test_init_bad_options(run_cli, tmp_path, arch, args, message):
    out = tmp_path / "out.safetensors"
    assert message in run_cli(["init", "-a", arch, *args, "-o", out], fails=True).message
    assert folder_listing(tmp_path) == []


def test_init_output_folder_missing(run_cli, tmp_path):
    out = tmp_path / "no" / "such" / "dir" / "out.safetensors"
    assert "output folder does not exist" in run_cli(["init", "-a", "rankcut:mnist-cnn", "-o", out], fails=True).message
    assert folder_listing(tmp_path) == []
    assert "is a folder" in run_cli(["init", "-a", "rankcut:mnist-cnn", "-o", tmp_path], fails=True).message


def test_output_equal_to_input_needs_force(run_cli, tmp_path):
    import torchvision

    weights = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in torchvision.models.resnet18(num_classes=3).state_dict().items()},
              str(weights))
    before = weights.read_bytes()
    args = ["init", "-a", "torchvision:resnet18", "--num-classes", 3, "-w", weights, "-o", weights]
    assert "--force" in run_cli(args, fails=True).message
    assert weights.read_bytes() == before and folder_listing(tmp_path) == ["w.safetensors"]
    run_cli([*args, "--force"])
    assert rankcut.read_meta(weights).arch == "torchvision:resnet18"
    assert folder_listing(tmp_path) == ["w.safetensors"]


def test_usage_errors_exit_non_zero(run_cli, tmp_path):
    from typer.testing import CliRunner

    from rankcut.cli import app

    result = CliRunner().invoke(app, ["init", "-o", str(tmp_path / "x.safetensors")])  # --arch missing
    assert result.exit_code == 2 and "--arch" in result.stderr and result.stdout == ""
    assert "Traceback" not in result.stderr
    assert folder_listing(tmp_path) == []
