"""Weights from other tools (.pth, .safetensors; DDP, compiled and trainer wrappings) load into the architecture."""

from __future__ import annotations

import pytest
import torch
from builders import assert_same_state, randomize_, small_resnet
from safetensors.torch import save_file

from rankcut.files.checkpoint import load


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
