"""Which layers are targets: traced in compute order, with the BatchNorm that follows them, output layer left out."""

from __future__ import annotations

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
