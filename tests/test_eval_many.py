"""``rankcut eval A B ...``: several checkpoints in one pass and one table, each as it would be alone."""

from __future__ import annotations

import pytest

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
        alone = run_cli(["eval", path, *DATA, "--reference", base, "--json"]).data
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
    many = run_cli(["eval", half, quarter, *DATA, "--reference", base, "--latency", "--json"]).data
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


def test_single_checkpoint_output_keeps_its_shape(three, run_cli):
    base, half, _ = three
    one = run_cli(["eval", half, *DATA, "--reference", base, "--json"]).data
    assert "results" not in one and one["checkpoint"] == str(half) and "agreement" in one


def test_mismatched_checkpoints_give_one_line(three, run_cli, tmp_path):
    base, half, _ = three
    three_classes = tmp_path / "three.safetensors"
    run_cli(["init", "--arch", "rankcut:mnist-cnn", "--num-classes", "3", "-o", three_classes])
    other_input = tmp_path / "other_input.safetensors"
    run_cli(["init", "--arch", "rankcut:mnist-cnn", "--mean", "0.5", "--std", "0.5", "-o", other_input])
    assert "different numbers of classes" in run_cli(["eval", base, three_classes, *DATA], fails=True).message
    assert "expects input" in run_cli(["eval", base, other_input, *DATA], fails=True).message
    assert "not found" in run_cli(["eval", base, tmp_path / "none.safetensors", *DATA], fails=True).message
