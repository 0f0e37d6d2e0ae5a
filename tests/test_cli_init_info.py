"""``rankcut init`` and ``rankcut info`` through the CLI, and what ``import rankcut`` costs."""

from __future__ import annotations

import subprocess
import sys

import torch

from rankcut.model import archs
from rankcut.files.checkpoint import CheckpointMeta, load, read_meta, save
from rankcut.model.edits import FoldBatchNorm, LowRankPair


def test_import_rankcut_is_light():
    code = ("import rankcut, sys\n"
            "heavy = {'torch', 'torchvision', 'numpy', 'safetensors', 'typer'} & set(sys.modules)\n"
            "assert not heavy, heavy\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_cli_does_not_initialise_cuda(mnist_ckpt):
    code = ("import sys, torch\n"
            "from typer.testing import CliRunner\n"
            "from rankcut.cli import app\n"
            f"result = CliRunner().invoke(app, ['info', {str(mnist_ckpt)!r}, '--json'])\n"
            "assert result.exit_code == 0, result.output\n"
            "assert not torch.cuda.is_initialized()\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_resnet18_counts(run_cli, tmp_path):
    path = tmp_path / "r18.safetensors"
    made = run_cli(["init", "-a", "torchvision:resnet18", "-o", path, "--json"]).data
    assert made["params"] == 11_689_512 and made["macs"] == 1_814_073_344

    info = run_cli(["info", path, "--json"]).data
    assert info["arch"] == "torchvision:resnet18" and info["arch_kwargs"] == {}
    assert info["input"]["shape"] == [3, 224, 224]
    assert info["params"] == 11_689_512
    assert info["macs"] == 1_814_073_344
    fc = [row for row in info["layers"] if row["name"] == "fc"]
    assert fc == [{"name": "fc", "type": "Linear", "shape": [[1000, 512]], "rank": None, "macs": 512_000,
                   "structure": "whole", "width": 1000}]
    assert sum(row["macs"] for row in info["layers"]) <= info["macs"]

    table = run_cli(["info", path])
    assert "11,689,512" in table.stdout and "1.814 G" in table.stdout and "layer4.1.conv2" in table.stdout
    assert table.stderr == ""


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

    # without --mean/--std a 3-channel built-in repeats its 1-channel statistics
    out = tmp_path / "d.safetensors"
    run_cli(["init", "-a", "rankcut:small-resnet", "--kwargs", '{"in_channels": 3, "width": 4}', "-o", out])
    assert read_meta(out).input == archs.InputContract((3, 28, 28), (0.1307,) * 3, (0.3081,) * 3)


def test_info_shows_pairs_and_history(run_cli, tmp_path):
    model = archs.build("rankcut:small-resnet", {"width": 8}).eval()
    edits = (FoldBatchNorm("layer1.conv1", "layer1.bn1"), LowRankPair("layer1.conv1", 3), LowRankPair("fc", 2))
    for edit in edits:
        edit.apply(model)
    meta = (CheckpointMeta("rankcut:small-resnet", {"width": 8}, archs.default_input("rankcut:small-resnet", {}))
            .with_history("init", weights="random").with_edits(*edits).with_history("project", method="pca", keep=0.5))
    path = tmp_path / "edited.safetensors"
    save(model, meta, path)

    info = run_cli(["info", path, "--json"]).data
    rows = {row["name"]: row for row in info["layers"]}
    assert rows["layer1.conv1"]["type"] == "LowRank(Conv2d)" and rows["layer1.conv1"]["rank"] == 3
    assert rows["layer1.conv1"]["shape"] == [[3, 8, 3, 3], [8, 3, 1, 1]]
    assert rows["fc"]["type"] == "LowRank(Linear)" and rows["fc"]["rank"] == 2
    assert "layer1.conv1.down" not in rows and rows["layer1.conv1"]["macs"] > 0
    assert info["edits"] == ["fold_bn", "low_rank", "low_rank"]
    assert [h["command"] for h in info["history"]] == ["init", "project"]

    table = run_cli(["info", path]).stdout
    assert "LowRank(Conv2d)" in table and "method=pca, keep=0.5" in table


def test_help(run_cli):
    assert "--weights" in run_cli(["init", "--help"]).stdout
    assert "--json" in run_cli(["info", "--help"]).stdout
