"""Architectures no one here wrote, through init, stats, project: a representative subset on every run.

The subset covers the families' hard parts at 32x32: channel shuffles and depthwise convs (torchvision's
ShuffleNet), and timm's tiny test models of three families: channels-last linears (ConvNeXt), attention
blocks on tokens (ViT), squeeze-excitation and BatchNorm with its activation inside (EfficientNet). RegNet's builder is in ``test_meta_build.py``, torchvision's ViT in ``test_attention.py``. The full list (every
torchvision classification builder and the timm list, hours on 2 cores) is ``python bench/bench_archs.py``,
which shows any traceback in its table.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from bench_archs import EXACT, check  # noqa: E402

SUBSET = ["torchvision:shufflenet_v2_x0_5", "torchvision:mnasnet0_5", "timm:test_convnext", "timm:test_vit", "timm:test_efficientnet"]


def _assert_passes(row):
    shown = f"{row.arch}: {row.steps}"
    assert all(outcome == "ok" for outcome in row.steps.values()), shown
    assert list(row.steps) == ["init", "stats", "keep 1.0", "pairs", "keep 0.5"], shown
    assert row.exact_error <= EXACT and row.pairs_error <= EXACT, shown
    assert 0 < row.macs_ratio <= 1, shown  # a pair of a square 1x1 conv at half its rank saves nothing


@pytest.mark.parametrize("arch", SUBSET)
def test_representative_architectures_pass_every_check(arch, tmp_path):
    _assert_passes(check(arch, tmp_path / "work", samples=8, size=32))

