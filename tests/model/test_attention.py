"""Attention: self-attention split into linear qkv and out_proj (exact), and what is not a target, listed."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import rankcut
from rankcut.compress.project import project_model
from rankcut.files.statsfile import load_stats
from rankcut.model.attention import split
from rankcut.model.edits import get_module
from rankcut.model.layers import LowRank, current_rank
from rankcut.model.targets import select
from cli_helpers import rankcut as cli

@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("masks", ["none", "bool", "float+padding"])
def test_split_attention_computes_what_multihead_attention_computes(batch_first, masks):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=batch_first).eval()
    with torch.no_grad():
        mha.in_proj_bias.normal_()
        mha.out_proj.bias.normal_()
    x = torch.randn(3, 5, 8) if batch_first else torch.randn(5, 3, 8)
    kwargs = {}
    if masks == "bool":
        kwargs["attn_mask"] = torch.rand(5, 5) > 0.7
        kwargs["attn_mask"].fill_diagonal_(False)
    if masks == "float+padding":
        kwargs["attn_mask"] = torch.randn(3 * 2, 5, 5)
        kwargs["key_padding_mask"] = torch.tensor([[False] * 4 + [True], [False] * 5, [True] + [False] * 4])
    new = split(mha)
    with torch.no_grad():
        for weights in (True, False):
            for average in (True, False):
                want = mha(x, x, x, need_weights=weights, average_attn_weights=average, **kwargs)
                got = new(x, x, x, need_weights=weights, average_attn_weights=average, **kwargs)
                torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
                if weights:
                    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-6)
                else:
                    assert got[1] is None


def test_vit_attention_becomes_exact_targets(tmp_path, monkeypatch):
    monkeypatch.setenv("RANKCUT_TRUST", "tiny_archs")
    base, stats = tmp_path / "vit.safetensors", tmp_path / "vit.npz"
    block = "encoder.layers.encoder_layer_0."
    cli("init", "--arch", "tiny_archs:vit", "--input", "3,32,32", "--seed", "0", "-o", base)
    info = cli("info", base, "--json")
    assert info["edits"] == ["split_attention"]
    notes = {r["name"]: r["note"] for r in info["layers"]}
    assert notes[block + "self_attention.qkv"] == notes[block + "self_attention.out_proj"] == ""
    assert notes["heads.head"].startswith("the output layer")
    # The split model computes what torchvision's ViT with the same weights computes.
    import tiny_archs

    torch.manual_seed(0)
    reference = tiny_archs.vit().eval()
    model, meta = rankcut.load_with_meta(base)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
        torch.testing.assert_close(before, reference(x), rtol=1e-5, atol=1e-5)
    made = cli("stats", base, "--data", "synthetic:64", "--batch-size", 16, "-o", stats, "--json")
    assert {block + "self_attention.qkv", block + "self_attention.out_proj"} <= {row["layer"] for row in made["layers"]}
    # Every target as a pair at its full rank (the CLI keeps whole any layer a pair would not make cheaper).
    targets = select(model, meta.input)
    ranks = {t.name: current_rank(get_module(model, t.name)) for t in targets}
    project_model(model, targets, load_stats(stats).layers, "pca", ranks, only_if_saves=False)
    assert isinstance(get_module(model, block + "self_attention.qkv"), LowRank)
    with torch.no_grad():
        err = ((model(x) - before).norm() / before.norm()).item()
    assert err < 1e-4, f"full-rank pairs changed the ViT's outputs: relative error {err:.3g}"
    small = cli("project", base, "--stats", stats, "--keep", "0.2", "-o", tmp_path / "small.safetensors", "--json")
    status = {r["layer"]: r["status"] for r in small["layers"]}
    assert status[block + "self_attention.qkv"] == status[block + "self_attention.out_proj"] == "projected"
    assert small["totals"]["macs_ratio"] < 1


def test_what_is_not_a_target_is_listed_with_a_reason(tmp_path, monkeypatch):
    monkeypatch.setenv("RANKCUT_TRUST", "tiny_archs")
    base = tmp_path / "cross.safetensors"
    cli("init", "--arch", "tiny_archs:cross_attention", "--input", "3,16,16", "-o", base)
    notes = {r["name"]: r["note"] for r in cli("info", base, "--json")["layers"]}
    assert notes["stem"] == ""
    assert notes["depthwise"].startswith("stays whole: depthwise convolution (groups=16)")
    assert notes["grouped"].startswith("stays whole: grouped convolution (groups=4)")
    assert "in_proj_weight" in notes["attention"]
    assert notes["attention.out_proj"].startswith("not a target: never called as a module (MultiheadAttention")
    made = cli("stats", base, "--data", "synthetic:8", "-o", tmp_path / "s.npz", "--json")
    assert set(made["not_targets"]) == {"depthwise", "grouped", "attention", "attention.out_proj", "head"}
    assert cli("info", tmp_path / "s.npz", "--json")["not_targets"] == made["not_targets"]
    table = cli("stats", base, "--data", "synthetic:8", "-o", tmp_path / "t.npz").stdout
    assert "not targets" in table and "depthwise" in table
