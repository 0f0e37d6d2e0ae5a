"""The checkpoint contract: exact round trips, weights from other tools, and replay of structural edits."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import rankcut
from rankcut.model import archs
from rankcut.files.checkpoint import CheckpointMeta, load, load_with_meta, read_meta, save
from rankcut.model.edits import FoldBatchNorm, LowRankPair
from rankcut.errors import RankcutError
from rankcut.files.fileio import atomic_write
from rankcut.model.layers import LowRank


def assert_same_state(a: torch.nn.Module | dict, b: torch.nn.Module | dict) -> None:
    """Same names, and every tensor bit-identical (dtype, shape and values)."""
    a = a if isinstance(a, dict) else a.state_dict()
    b = b if isinstance(b, dict) else b.state_dict()
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random values in every parameter and BatchNorm statistic, so eval outputs depend on all of them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)
    return model.eval()


def small_resnet(width: int = 4, **kwargs) -> torch.nn.Module:
    return archs.build("rankcut:small-resnet", {"width": width, **kwargs})


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


def test_top_level_api_is_the_checkpoint_api(mnist_ckpt, tmp_path):
    model, meta = rankcut.load_with_meta(mnist_ckpt)
    assert meta.arch == "rankcut:mnist-cnn" and meta.input.shape == (1, 28, 28)
    out = tmp_path / "api.safetensors"
    rankcut.save(model, meta.with_history("my-step", note="hi"), out)
    assert rankcut.read_meta(out).history[-1]["note"] == "hi"
    assert_same_state(rankcut.load(out), model)
    assert issubclass(rankcut.RankcutError, Exception)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_torchvision_weights_give_the_torchvision_model(run_cli, tmp_path, suffix):
    import torchvision

    torch.manual_seed(0)
    reference = randomize_(torchvision.models.resnet18(num_classes=10))
    weights = tmp_path / f"tv-resnet18{suffix}"
    if suffix == ".pth":
        torch.save(reference.state_dict(), weights)
    else:
        save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(weights))
    out = tmp_path / "resnet18.safetensors"
    run_cli(["init", "-a", "torchvision:resnet18", "--num-classes", 10, "-w", weights, "-o", out, "--json"])

    model = load(out)
    assert_same_state(model, reference)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x))


def _ddp(sd):
    return {f"module.{k}": v for k, v in sd.items()}


def _compiled_ddp(sd):
    return {f"_orig_mod.module.{k}": v for k, v in sd.items()}


def _trainer_checkpoint(sd):
    return {"epoch": 3, "state_dict": _ddp(sd)}


def _model_key(sd):
    return {"model": sd, "step": 10}


def _old_batchnorm(sd):
    # Weights saved before PyTorch 0.4.1 (torchvision's original ImageNet files) have no counters.
    return {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}


@pytest.mark.parametrize("wrap", [_ddp, _compiled_ddp, _trainer_checkpoint, _model_key, _old_batchnorm])
def test_wrapped_state_dicts_load(run_cli, tmp_path, wrap):
    reference = randomize_(small_resnet())
    weights = tmp_path / "w.pth"
    torch.save(wrap(reference.state_dict()), weights)
    out = tmp_path / "c.safetensors"
    run_cli(["init", "-a", "rankcut:small-resnet", "--kwargs", '{"width": 4}', "-w", weights, "-o", out])
    loaded = load(out)
    expected = reference.state_dict()
    for key, value in loaded.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(value, expected[key]), key


def _edited_model():
    """A small-resnet with BatchNorm folds and low-rank pairs (a pair re-factorised, a Linear pair too)."""
    model = randomize_(small_resnet(width=8))
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = model(x)
    folds = [FoldBatchNorm("stem", "bn"), FoldBatchNorm("layer1.conv1", "layer1.bn1"),
             FoldBatchNorm("layer2.shortcut.0", "layer2.shortcut.1")]
    for edit in folds:
        edit.apply(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=1e-4, atol=1e-5, msg="folding BatchNorm changed outputs")
    pairs = [LowRankPair("layer1.conv1", 5), LowRankPair("layer1.conv1", 3), LowRankPair("fc", 4),
             LowRankPair("layer3.conv2", 7)]
    for edit in pairs:
        edit.apply(model)
    randomize_(model, seed=4)  # the pairs start with placeholder weights: fill them
    return model, (*folds, *pairs), x


def test_edits_replay_on_load(tmp_path):
    model, edits, x = _edited_model()
    meta = CheckpointMeta("rankcut:small-resnet", {"width": 8},
                          archs.default_input("rankcut:small-resnet", {})).with_edits(*edits)
    path = tmp_path / "edited.safetensors"
    save(model, meta, path)

    loaded, loaded_meta = load_with_meta(path)
    assert loaded_meta.edits == edits
    assert isinstance(loaded.layer1.conv1, LowRank) and loaded.layer1.conv1.rank == 3
    assert isinstance(loaded.fc, LowRank) and isinstance(loaded.fc.up, torch.nn.Linear)
    assert isinstance(loaded.bn, torch.nn.Identity)
    assert_same_state(loaded, model)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))

    # and once more through save/load, edits and all
    again = tmp_path / "again.safetensors"
    save(loaded, loaded_meta, again)
    assert_same_state(load(again), model)


def test_edits_contradicting_the_tensors_are_refused(tmp_path):
    model, edits, _ = _edited_model()
    meta = CheckpointMeta("rankcut:small-resnet", {"width": 8}, archs.default_input("rankcut:small-resnet", {}))
    path = tmp_path / "lying.safetensors"
    save(model, meta.with_edits(*edits[:-1], LowRankPair("layer3.conv2", 6)), path)  # tensors are rank 7
    with pytest.raises(RankcutError, match="does not match its own description.*layer3.conv2"):
        load(path)
    save(model, meta.with_edits(*edits[:-1]), path)  # the last pair not recorded at all
    with pytest.raises(RankcutError, match="missing layer3.conv2.weight"):
        load(path)


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
