"""``rankcut eval``: latency, the tables, several checkpoints in one pass (each as it would be alone), and
outputs that are not finite or inputs that do not fit.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from builders import with_weights
from cli_helpers import invoke, rankcut

CPU = ["--device", "cpu"]


def test_latency_is_reported_for_both_models(mnist_ckpt, digits):
    result = rankcut("eval", mnist_ckpt, "--data", digits, "--reference", mnist_ckpt, "--latency", "-b", "4",
                     "--seconds", "0.5", "--device", "cpu", "--json")["results"][0]
    for figures in (result["latency"], result["reference"]["latency"]):
        assert figures["batch_size"] == 4 and figures["repeats"] >= 5
        assert figures["image_ms"] == pytest.approx(figures["batch_ms"] / 4) and figures["batch_ms"] > 0
    assert result["ratios"]["latency"] > 0 and result["agreement"] == 1.0 and abs(result["kl"]) < 1e-9


def test_table_output_for_people(mnist_ckpt, digits):
    out = rankcut("eval", mnist_ckpt, "--data", digits, "--reference", mnist_ckpt, "--device", "cpu").stdout
    assert "top-1" in out and "top-5" in out and "KL(reference || model)" in out and "10.00%" in out


def test_bad_inputs_give_one_line(mnist_ckpt, tmp_path):
    outside = tmp_path / "outside.npz"
    np.savez(outside, x=np.zeros((4, 28, 28), np.uint8), y=np.array([0, 1, 2, 12]))
    three = tmp_path / "three.safetensors"
    rankcut("init", "--arch", "rankcut:mnist-cnn", "--num-classes", "3", "-o", three)
    assert "not found" in rankcut("eval", tmp_path / "none.safetensors", "--data", "synthetic:4", fails=True)
    assert "label 12" in rankcut("eval", mnist_ckpt, "--data", outside, fails=True)
    assert "different numbers of classes" in rankcut("eval", mnist_ckpt, "--data", "synthetic:4",
                                                     "--reference", three, fails=True)


def test_eval_counts_nan_outputs_as_wrong_and_warns(mnist_ckpt, tmp_path):
    blown = with_weights(mnist_ckpt, tmp_path / "blown.safetensors", **{"fc1.weight": torch.full((128, 9216), 3e38)})
    result = invoke("eval", blown, "--data", "mnist5k:test", "-n", "50", *CPU, "--json")
    code, out, err = result.exit_code, result.stdout, result.stderr
    assert code == 0, err
    result = json.loads(out)["results"][0]
    assert result["nonfinite"] == 50 and result["top1"] == 0.0 and result["topk"] == 0.0
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: ") and "gave NaN or Inf outputs for 50 of 50 samples" in lines[0]


DATA = ["--data", "mnist5k:test", "--samples", "60", "--device", "cpu", "-b", "16"]


@pytest.fixture
def three(mnist_ckpt, tmp_path, run_cli):
    """The random mnist-cnn and two data-free projections of it (random bases at half and a quarter rank)."""
    half, quarter = tmp_path / "half.safetensors", tmp_path / "quarter.safetensors"
    run_cli(["project", mnist_ckpt, "--method", "random", "--keep", "0.5", "-o", half])
    run_cli(["project", mnist_ckpt, "--method", "random", "--keep", "0.25", "-o", quarter])
    return mnist_ckpt, half, quarter


def test_each_result_is_what_the_checkpoint_alone_gives(three, run_cli):
    base, half, quarter = three
    many = run_cli(["eval", half, quarter, *DATA, "--reference", base, "--json"]).data
    assert [r["checkpoint"] for r in many["results"]] == [str(half), str(quarter)]
    assert many["reference"]["checkpoint"] == str(base) and many["samples"] == 60 and many["classes"] == 10
    for path, together in zip((half, quarter), many["results"]):
        alone = run_cli(["eval", path, *DATA, "--reference", base, "--json"]).data["results"][0]
        assert together == alone  # the same batches in the same order: the same sums, exactly
    assert many["results"][1]["macs"] < many["results"][0]["macs"] < many["reference"]["macs"]


def test_without_reference_and_with_the_same_file_twice(three, run_cli):
    base, half, _ = three
    many = run_cli(["eval", base, half, base, *DATA, "--json"]).data
    assert many["reference"] is None and len(many["results"]) == 3
    assert many["results"][0] == many["results"][2]
    assert "ratios" not in many["results"][1] and "agreement" not in many["results"][1]


def test_latency_of_every_model_and_its_ratio(three, run_cli):
    base, half, quarter = three
    many = run_cli(["eval", half, quarter, *DATA, "--reference", base, "--latency", "--seconds", "0.5",
                    "--json"]).data
    for r in many["results"]:
        assert r["latency"]["batch_size"] == 16 and r["latency"]["repeats"] >= 5 and r["latency"]["batch_ms"] > 0
        # the ratio is the median of pairwise ratios (rankcut.run.latency), not the ratio of the two medians
        lat = r["latency"]
        assert r["ratios"]["latency"] == lat["ratio"] and lat["ratio_q25"] <= lat["ratio"] <= lat["ratio_q75"]
    assert many["reference"]["latency"]["ratio"] == 1.0


def test_one_table_a_row_per_checkpoint(three, run_cli, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # short names, as a user in the folder types them
    base, half, quarter = (p.name for p in three)
    out = run_cli(["eval", half, quarter, *DATA, "--reference", base]).stdout
    lines = out.splitlines()
    assert sum("(ref)" in line for line in lines) == 1
    assert sum(half in line for line in lines) == 1 and sum(quarter in line for line in lines) == 1
    assert "top-1 agreement" in out and "MACs" in out and "x)" in out


def test_single_checkpoint_output_has_the_same_shape_as_several(three, run_cli):
    base, half, _ = three
    one = run_cli(["eval", half, *DATA, "--reference", base, "--json"]).data
    many = run_cli(["eval", half, half, *DATA, "--reference", base, "--json"]).data
    assert one.keys() == many.keys() and one["version"] == many["version"] == 1
    assert one["results"] == many["results"][:1] and one["results"][0]["checkpoint"] == str(half)
    assert "agreement" in one["results"][0] and "top5" not in one["results"][0]


def test_mismatched_checkpoints_give_one_line(three, run_cli, tmp_path):
    base, half, _ = three
    three_classes = tmp_path / "three.safetensors"
    run_cli(["init", "--arch", "rankcut:mnist-cnn", "--num-classes", "3", "-o", three_classes])
    other_input = tmp_path / "other_input.safetensors"
    run_cli(["init", "--arch", "rankcut:mnist-cnn", "--mean", "0.5", "--std", "0.5", "-o", other_input])
    assert "different numbers of classes" in run_cli(["eval", base, three_classes, *DATA], fails=True).message
    assert "expects input" in run_cli(["eval", base, other_input, *DATA], fails=True).message
    assert "not found" in run_cli(["eval", base, tmp_path / "none.safetensors", *DATA], fails=True).message
