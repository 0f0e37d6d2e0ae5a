"""Class names travel with the checkpoint and labelled folders are read by name (issue 18, item 2)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rankcut.files.checkpoint import load_with_meta, read_meta, save

SHAPES = ("circle", "square", "triangle")
CPU = ["--device", "cpu"]


def shapes_folder(root, names, per_class=4):
    """An ImageFolder tree with ``per_class`` 28x28 grayscale images in a folder per name."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for name in names:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8), "L").save(root / name / f"{i}.png")
    return root


@pytest.fixture
def always_triangle(run_cli, tmp_path):
    """A 3-class checkpoint named circle, square, triangle whose output is always 'triangle'."""
    path = tmp_path / "shapes.safetensors"
    run_cli(["init", "--arch", "rankcut:mnist-cnn", "--num-classes", "3", "--classes", ",".join(SHAPES), "-o", path])
    model, meta = load_with_meta(path)
    with torch.no_grad():
        model.fc2.weight.zero_()
        model.fc2.bias.copy_(torch.tensor([0.0, 0.0, 10.0]))
    save(model, meta, path)
    return path


def test_a_folder_holding_some_of_the_classes_is_scored_by_name(run_cli, always_triangle, tmp_path):
    # circle and triangle only: by folder order triangle would be class 1 (square) and every answer wrong.
    some = shapes_folder(tmp_path / "some", ["circle", "triangle"])
    result = run_cli(["eval", always_triangle, "--data", some, *CPU, "--json"]).data["results"][0]
    assert result["labeled"] == 8 and result["top1"] == 0.5


def test_a_folder_with_a_class_the_model_does_not_score_is_refused(run_cli, always_triangle, tmp_path):
    odd = shapes_folder(tmp_path / "odd", ["circle", "hexagon"])
    message = run_cli(["eval", always_triangle, "--data", odd, *CPU], fails=True).message
    assert message == (f"error: {odd} has class folder(s) hexagon that the model does not score; "
                       "its classes are circle, square, triangle")


def test_finetune_on_a_folder_records_its_class_names_and_info_shows_them(run_cli, tmp_path):
    base, tuned = tmp_path / "base.safetensors", tmp_path / "tuned.safetensors"
    run_cli(["init", "--arch", "rankcut:mnist-cnn", "--num-classes", "3", "-o", base])
    assert read_meta(base).classes is None
    train = shapes_folder(tmp_path / "train", SHAPES, per_class=2)
    run_cli(["finetune", base, "--data", train, "-b", "6", *CPU, "-o", tuned])
    assert read_meta(tuned).classes == SHAPES
    assert run_cli(["info", tuned, "--json"]).data["classes"] == list(SHAPES)
    assert "circle, square, triangle" in run_cli(["info", tuned]).stdout


def test_init_classes_must_match_the_outputs(run_cli, tmp_path):
    out = tmp_path / "m.safetensors"
    message = run_cli(["init", "--arch", "rankcut:mnist-cnn", "--classes", "a,b", "-o", out], fails=True).message
    assert message == "error: --classes names 2 classes but rankcut:mnist-cnn scores 10; add --num-classes 2"
    message = run_cli(["init", "--arch", "rankcut:mnist-cnn", "--classes", "a,,b", "-o", out], fails=True).message
    assert "distinct, non-empty names" in message and not out.exists()
