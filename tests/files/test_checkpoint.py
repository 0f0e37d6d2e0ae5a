"""The checkpoint contract: exact round trips, metadata as strings, exactly the state dict, atomic saves."""

from __future__ import annotations

import os

import pytest
import torch
from builders import assert_same_state
from safetensors import safe_open
from safetensors.torch import load_file

from rankcut.errors import RankcutError
from rankcut.files.checkpoint import CheckpointMeta, load, read_meta, save
from rankcut.files.fileio import atomic_write
from rankcut.model import archs
from rankcut.model.edits import FoldBatchNorm, LowRankPair


def test_init_load_save_load_is_bit_identical(mnist_ckpt, tmp_path):
    first = load(mnist_ckpt)
    assert not first.training
    assert_same_state(first.state_dict(), load_file(str(mnist_ckpt)))

    again = tmp_path / "again.safetensors"
    save(first, read_meta(mnist_ckpt), again)
    second = load(again)
    assert_same_state(first, second)
    x = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(first(x), second(x))
    assert read_meta(again) == read_meta(mnist_ckpt)


def test_metadata_round_trips_through_strings():
    meta = (CheckpointMeta("rankcut:small-resnet", {"width": 8, "in_channels": 3},
                           archs.default_input("rankcut:small-resnet", {"in_channels": 3}))
            .with_edits(FoldBatchNorm("stem", "bn"), LowRankPair("fc", 3))
            .with_history("init", weights="x.pth").with_history("project", keep=0.5))
    md = meta.to_metadata()
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in md.items())
    assert CheckpointMeta.from_metadata(md, "x") == meta
    assert [h["command"] for h in meta.history] == ["init", "project"]


def test_checkpoint_holds_exactly_the_state_dict(mnist_ckpt):
    with safe_open(str(mnist_ckpt), framework="pt") as f:
        assert set(f.keys()) == set(archs.build("rankcut:mnist-cnn").state_dict())
        assert f.metadata()["rankcut.format"] == "rankcut/1"


def test_save_is_atomic(mnist_ckpt, tmp_path):
    model = load(mnist_ckpt)
    before = mnist_ckpt.read_bytes()

    def half_then_fail(tmp):
        with open(tmp, "wb") as f:
            f.write(before[: len(before) // 2])
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(mnist_ckpt, half_then_fail)
    assert mnist_ckpt.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["mnist.safetensors"]

    with pytest.raises(RankcutError, match="output folder does not exist"):
        save(model, read_meta(mnist_ckpt), tmp_path / "missing" / "x.safetensors")
    with pytest.raises(RankcutError, match="is a folder"):
        save(model, read_meta(mnist_ckpt), tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["mnist.safetensors"]
