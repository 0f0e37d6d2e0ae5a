"""Which layers are targets: traced in compute order, with the BatchNorm that follows them, output layer left out."""

from __future__ import annotations

import pytest

from rankcut.errors import RankcutError
from rankcut.model import archs
from rankcut.model.archs import InputContract
from rankcut.model.targets import select, trace


def test_targets_follow_batchnorm_and_skip_output_layer():
    model = archs.build("torchvision:resnet18", {}).eval()
    found, final = trace(model, InputContract((3, 32, 32), archs.IMAGENET_MEAN, archs.IMAGENET_STD))
    by_name = {t.name: t.bn for t in found}
    assert final == "fc"
    assert by_name["conv1"] == "bn1"
    assert by_name["layer1.0.conv2"] == "layer1.0.bn2"
    assert by_name["layer2.0.downsample.0"] == "layer2.0.downsample.1"
    assert len(found) == 21
    chosen = select(model, InputContract((3, 32, 32), archs.IMAGENET_MEAN, archs.IMAGENET_STD))
    assert "fc" not in {t.name for t in chosen} and len(chosen) == 20
    assert trace(model, InputContract((3, 32, 32), archs.IMAGENET_MEAN, archs.IMAGENET_STD), fake=False) == \
        (found, final), "on one real sample (refit's way) the same targets as on fake tensors"


def test_layer_patterns_choose_targets_and_the_output_layer_only_by_name():
    model = archs.build("rankcut:mnist-cnn", {}).eval()
    names = lambda **kw: [t.name for t in select(model, archs.MNIST, **kw)]
    assert names() == ["conv1", "conv2", "fc1"]
    assert names(layers=["conv*"]) == ["conv1", "conv2"]
    assert names(layers=["*"], exclude=["conv1"]) == ["conv2", "fc1"]
    assert names(layers=["fc2"]) == ["fc2"]  # the output layer, named exactly
    assert names(layers=["fc*"]) == ["fc1"]
    for kw, message in [({"layers": ["layer9*"]}, "--layers 'layer9\\*' matches no target layer"),
                        ({"exclude": ["nope"]}, "--exclude 'nope' matches no target layer"),
                        ({"exclude": ["*"]}, "no target layers selected")]:
        with pytest.raises(RankcutError, match=message):
            select(model, archs.MNIST, **kw)
