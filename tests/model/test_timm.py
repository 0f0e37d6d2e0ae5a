"""``--arch timm:NAME``: built with pretrained=False, weights from a local file, pretrained_cfg as the input contract."""

from __future__ import annotations

import sys

import timm
import torch
from safetensors.torch import save_file

import rankcut
from cli_helpers import rankcut as cli


def test_timm_model_with_local_weights_and_its_input_contract(tmp_path):
    torch.manual_seed(3)
    reference = timm.create_model("test_vit", pretrained=False, num_classes=10).eval()
    weights = tmp_path / "test_vit.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(weights))
    path = tmp_path / "vit.safetensors"
    made = cli("init", "--arch", "timm:test_vit", "--num-classes", "10", "--weights", weights, "-o", path, "--json")
    cfg = timm.get_pretrained_cfg("test_vit")
    assert made["input"] == {"shape": list(cfg.input_size), "mean": list(cfg.mean), "std": list(cfg.std)}
    x = torch.randn(2, *cfg.input_size)
    with torch.no_grad():
        torch.testing.assert_close(rankcut.load(path)(x), reference(x), rtol=1e-5, atol=1e-5)


def test_timm_errors_are_one_line(tmp_path, monkeypatch):
    assert "not a timm model" in cli("init", "--arch", "timm:no_such_model", "-o", tmp_path / "a.safetensors", fails=True)
    monkeypatch.setitem(sys.modules, "timm", None)  # as if timm were not installed
    message = cli("init", "--arch", "timm:test_vit", "-o", tmp_path / "b.safetensors", fails=True)
    assert "pip install 'rankcut[timm]'" in message
