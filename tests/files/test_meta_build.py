"""Architectures whose builders compute with tensor values (RegNet) cannot be built on the meta device."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

import rankcut
from rankcut.files import checkpoint
from cli_helpers import rankcut as cli


def build_devices(monkeypatch) -> list[str]:
    """The default device of every ``build_model`` call from now on (meta for a shapes-only build), in order."""
    devices = []
    real_build = checkpoint.build_model

    def spy(meta, trusted=False):
        devices.append(torch.empty(()).device.type)
        return real_build(meta, trusted)

    monkeypatch.setattr(checkpoint, "build_model", spy)
    return devices


def test_regnet_builds_for_real_once_when_meta_cannot(tmp_path, monkeypatch):
    path = tmp_path / "regnet.safetensors"
    made = cli("init", "--arch", "torchvision:regnet_x_400mf", "--num-classes", "10", "--input", "3,32,32",
               "-o", path, "--json")
    assert made["params"] > 5_000_000
    devices = build_devices(monkeypatch)
    model = rankcut.load(path)
    assert devices == ["meta", "cpu"], "meta is tried first, then one real build is both checked and loaded"
    saved = load_file(str(path))
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, saved[name], rtol=0, atol=0, msg=name)
    assert cli("info", path, "--json")["params"] == made["params"]


def test_meta_build_still_comes_first_where_it_works(mnist_ckpt, monkeypatch):
    devices = build_devices(monkeypatch)
    rankcut.load(mnist_ckpt)
    assert devices == ["meta", "cpu"]
