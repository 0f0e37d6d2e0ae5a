"""``rankcut info`` on checkpoints: counts, layers, pairs and history (statistics files: test_cli_stats.py)."""

from __future__ import annotations

from rankcut.files.checkpoint import CheckpointMeta, save
from rankcut.model import archs
from rankcut.model.edits import FoldBatchNorm, LowRankPair


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
                   "structure": "whole", "width": 1000, "original_width": 1000,
                   "note": "the output layer: a target only when --layers names it"}]
    assert sum(row["macs"] for row in info["layers"]) <= info["macs"]

    table = run_cli(["info", path])
    assert "11,689,512" in table.stdout and "1.814 G" in table.stdout and "layer4.1.conv2" in table.stdout
    assert table.stderr == ""


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
