"""Architecture names -> modules, input contracts, and the trust gate on user code."""

from __future__ import annotations

import sys
import time

import pytest
import torch

from rankcut.model import archs
from rankcut.model.contract import InputContract
from rankcut.errors import RankcutError


@pytest.mark.parametrize("name, kwargs, shape", [
    ("rankcut:mnist-cnn", {}, (1, 28, 28)),
    ("rankcut:mnist-cnn", {"num_classes": 7}, (1, 28, 28)),
    ("rankcut:small-resnet", {"width": 4}, (1, 28, 28)),
    ("rankcut:small-resnet", {"width": 4, "in_channels": 3, "num_classes": 100}, (3, 32, 32)),
])
def test_builtins_run_on_their_default_input(name, kwargs, shape):
    model = archs.build(name, kwargs).eval()
    contract = archs.default_input(name, kwargs)
    assert contract.shape[0] == shape[0] and len(contract.mean) == len(contract.std) == shape[0]
    with torch.no_grad():
        out = model(torch.zeros(2, *shape))
    assert out.shape == (2, kwargs.get("num_classes", 10))


def test_torchvision_default_input_is_imagenet():
    contract = archs.default_input("torchvision:resnet18", {})
    assert contract == InputContract((3, 224, 224), archs.IMAGENET_MEAN, archs.IMAGENET_STD)
    model = archs.build("torchvision:resnet18", {"num_classes": 10})
    assert model.fc.out_features == 10


def test_builders_make_fresh_random_weights():
    torch.manual_seed(0)
    a = archs.build("rankcut:mnist-cnn")
    torch.manual_seed(0)
    b = archs.build("rankcut:mnist-cnn")
    assert torch.equal(a.conv1.weight, b.conv1.weight)
    assert not torch.equal(a.conv1.weight, archs.build("rankcut:mnist-cnn").conv1.weight)


@pytest.mark.parametrize("name, message", [
    ("resnet18", "use torchvision:NAME"),
    ("torchvision:no_such_net", "not a torchvision classification model"),
    ("torchvision:fasterrcnn_resnet50_fpn", "not a torchvision classification model"),
    ("rankcut:no-such", "built-ins are mnist-cnn, small-resnet"),
    ("not a module:fn", "unknown architecture"),
    ("pkg.mod:", "unknown architecture"),
    ("", "unknown architecture"),
])
def test_unknown_architectures(name, message):
    with pytest.raises(RankcutError, match=message):
        archs.build(name, {}, trusted=True)


@pytest.mark.parametrize("name, kwargs", [
    ("rankcut:mnist-cnn", {"num_clases": 10}),                       # TypeError (typo)
    ("rankcut:mnist-cnn", {"num_classes": -1}),                      # RuntimeError (negative size)
    ("rankcut:mnist-cnn", {"num_classes": 1.5}),                     # TypeError (float size)
    ("rankcut:mnist-cnn", {"num_classes": 10**30}),                  # overflow, with pages of C++ frames
    ("torchvision:resnet18", {"width_per_group": 3}),                # ValueError from torchvision
    ("torchvision:resnet18", {"weights": "IMAGENET1K_V1"}),          # never downloads
])
def test_bad_keyword_arguments_are_one_line_errors(name, kwargs):
    with pytest.raises(RankcutError, match="cannot build") as info:
        archs.build(name, kwargs)
    assert "\n" not in str(info.value)


def test_absurd_sizes_cost_nothing_on_the_meta_device():
    start = time.perf_counter()
    with torch.device("meta"):
        model = archs.build("torchvision:resnet18", {"num_classes": 10**12})
    assert model.fc.weight.shape == (10**12, 512) and model.fc.weight.is_meta
    assert time.perf_counter() - start < 5


@pytest.mark.parametrize("kwargs, message", [
    ({"shape": (3, 28), "mean": (0,), "std": (1,)}, "C,H,W"),
    ({"shape": (1, 0, 28), "mean": (0,), "std": (1,)}, "positive sizes"),
    ({"shape": (3, 28, 28), "mean": (0,), "std": (1,)}, "one value per channel"),
    ({"shape": (1, 28, 28), "mean": (0,), "std": (0,)}, "positive"),
    ({"shape": (1, 28, 28), "mean": (float("nan"),), "std": (1,)}, "finite"),
    ({"shape": (1, 28, 28), "mean": (0,), "std": (float("inf"),)}, "finite"),
    ({"shape": (3, 100_000, 100_000), "mean": (0,) * 3, "std": (1,) * 3}, "implausibly large"),
])
def test_input_contract_validates_itself(kwargs, message):
    with pytest.raises(RankcutError, match=message):
        InputContract(**kwargs)


def test_input_contract_round_trips_and_rejects_junk():
    contract = InputContract((3, 32, 32), (0.5, 0.4, 0.3), (0.2, 0.2, 0.25))
    assert InputContract.from_dict(contract.to_dict()) == contract
    for junk in ({}, {"shape": "abc", "mean": [0], "std": [1]}, {"shape": [1, 28, 28], "mean": None, "std": [1]}):
        with pytest.raises(RankcutError, match="input"):
            InputContract.from_dict(junk)


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A user package ``rc_user_<n>`` whose import leaves a marker file; returns (name, marker)."""
    name = f"rc_user_{abs(hash(str(tmp_path))) % 10**8}"
    marker = tmp_path / "imported.marker"
    (tmp_path / f"{name}.py").write_text(
        "import pathlib\n"
        f"pathlib.Path({str(marker)!r}).write_text('imported')\n"
        "from rankcut.model.archs import MnistCNN\n"
        "def build(num_classes=10):\n"
        "    return MnistCNN(num_classes)\n"
        "def not_a_model():\n"
        "    return 42\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name, marker
    sys.modules.pop(name, None)


def test_user_code_needs_trust(user_module, monkeypatch):
    name, marker = user_module
    with pytest.raises(RankcutError, match=f"RANKCUT_TRUST={name}"):
        archs.build(f"{name}:build")
    assert not marker.exists() and name not in sys.modules

    monkeypatch.setenv("RANKCUT_TRUST", f"something_else, {name}")
    assert isinstance(archs.build(f"{name}:build", {"num_classes": 3}), archs.MnistCNN)
    assert marker.exists()


def test_user_code_when_trusted(user_module):
    name, _ = user_module
    assert archs.build(f"{name}:build", trusted=True).fc2.out_features == 10
    with pytest.raises(RankcutError, match="has no function"):
        archs.build(f"{name}:missing", trusted=True)
    with pytest.raises(RankcutError, match="not a torch.nn.Module"):
        archs.build(f"{name}:not_a_model", trusted=True)
    with pytest.raises(RankcutError, match="cannot import"):
        archs.build("rc_no_such_package_xyz.models:build", trusted=True)
