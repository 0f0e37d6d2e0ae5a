"""Weights files given to ``rankcut init -w`` that are missing, unreadable, for another model or pickled code."""

from __future__ import annotations

import os

import pytest
import torch
from builders import folder_listing, pickled_payload


def test_init_missing_weights(run_cli, tmp_path):
    args = ["init", "-a", "rankcut:mnist-cnn", "-w", tmp_path / "w.pth", "-o", tmp_path / "out.safetensors"]
    assert "weights file not found" in run_cli(args, fails=True).message
    assert folder_listing(tmp_path) == []


def test_init_weights_for_another_model(run_cli, tmp_path):
    import torchvision

    weights = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), weights)
    out = tmp_path / "out.safetensors"
    message = run_cli(["init", "-a", "rankcut:mnist-cnn", "-w", weights, "-o", out], fails=True).message
    assert "do not fit the architecture" in message and "missing conv1.bias" in message
    # the right family, the wrong head
    message = run_cli(["init", "-a", "torchvision:resnet18", "-w", weights, "-o", out], fails=True).message
    assert "fc.weight: file (10, 512) vs model (1000, 512)" in message
    assert folder_listing(tmp_path) == ["resnet18.pth"]


@pytest.mark.parametrize("name, content, message", [
    ("junk.pth", os.urandom(1000), "cannot read weights"),
    ("empty.pt", b"", "cannot read weights"),
    ("junk.safetensors", os.urandom(1000), "not a readable safetensors file"),
])
def test_init_unreadable_weights(run_cli, tmp_path, name, content, message):
    weights = tmp_path / name
    weights.write_bytes(content)
    args = ["init", "-a", "rankcut:mnist-cnn", "-w", weights, "-o", tmp_path / "out.safetensors"]
    assert message in run_cli(args, fails=True).message
    assert folder_listing(tmp_path) == [name]


def test_init_weights_that_are_not_a_state_dict(run_cli, tmp_path):
    weights = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), weights)
    args = ["init", "-a", "rankcut:mnist-cnn", "-w", weights, "-o", tmp_path / "out.safetensors"]
    assert "does not hold a state dict of tensors" in run_cli(args, fails=True).message


def test_init_refuses_pickled_code(run_cli, tmp_path):
    weights, marker = pickled_payload(tmp_path)
    out = tmp_path / "out.safetensors"
    message = run_cli(["init", "-a", "rankcut:mnist-cnn", "-w", weights, "-o", out], fails=True).message
    assert "weights_only=True" in message
    assert not marker.exists() and not out.exists()
    # the payload is live: an unsafe load would have run it
    torch.load(weights, weights_only=False)
    assert marker.exists()
