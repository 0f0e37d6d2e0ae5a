"""Architecture names -> freshly built ``nn.Module``s.

Four kinds of name, each with JSON-able keyword arguments:

- ``torchvision:NAME``: any torchvision classification builder (built with ``weights=None``);
- ``timm:NAME``: any timm model (the optional ``timm`` extra), built with ``pretrained=False``: nothing is
  downloaded, weights come from ``rankcut init --weights``;
- ``rankcut:NAME``: a built-in small model (see ``BUILTINS``);
- ``package.module:function``: a user's own builder. Importing it runs the user's code, so a
  checkpoint that names one is only built when its top-level package is listed in the
  ``RANKCUT_TRUST`` environment variable (comma-separated), or when the caller passes ``trusted=True``
  (``rankcut init``, where the user typed the name).
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from rankcut.errors import RankcutError
from rankcut.model.contract import InputContract

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
class MnistCNN(nn.Module):
    """The research note's MNIST network (the classic PyTorch MNIST example)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3)
        self.conv2 = nn.Conv2d(32, 64, 3)
        self.dropout1 = nn.Dropout(0.25)
        self.fc1 = nn.Linear(9216, 128)
        self.dropout2 = nn.Dropout(0.5)
        self.fc2 = nn.Linear(128, num_classes)

    def forward(self, x):
        x = nn.functional.relu(self.conv1(x))
        x = nn.functional.relu(self.conv2(x))
        x = nn.functional.max_pool2d(x, 2)
        x = self.dropout1(x).flatten(1)
        x = self.dropout2(nn.functional.relu(self.fc1(x)))
        return self.fc2(x)


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = nn.functional.relu(self.bn1(self.conv1(x)))
        return nn.functional.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class SmallResNet(nn.Module):
    """A small residual network with BatchNorm: quick to train on 28x28 or 32x32 images."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 16):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.layer1 = _Block(width, width, 1)
        self.layer2 = _Block(width, 2 * width, 2)
        self.layer3 = _Block(2 * width, 4 * width, 2)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x):
        x = nn.functional.relu(self.bn(self.stem(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(x.mean((2, 3)))


@dataclass(frozen=True)
class Builtin:
    build: Callable[..., nn.Module]
    input: InputContract


MNIST = InputContract((1, 28, 28), (0.1307,), (0.3081,))
BUILTINS: dict[str, Builtin] = {
    "mnist-cnn": Builtin(MnistCNN, MNIST),
    "small-resnet": Builtin(SmallResNet, MNIST),
}
class NeedsRealTensors(RankcutError):
    """The builder computes with tensor values (e.g. layer widths from ``torch.pow``), so it cannot run on meta."""


_USER = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")


def _torchvision_builders() -> list[str]:
    import torchvision.models as tvm

    return tvm.list_models(module=tvm)


def _timm():
    try:
        import timm
    except ImportError:
        raise RankcutError("timm:NAME architectures need timm: pip install 'rankcut[timm]'") from None
    return timm


def _timm_input(name: str, kwargs: dict) -> InputContract:
    """A timm model's ``pretrained_cfg`` input size, mean and std (``img_size`` in ``kwargs`` wins)."""
    cfg = _timm().get_pretrained_cfg(name)
    shape = tuple(cfg.input_size) if cfg is not None else (3, 224, 224)
    size = kwargs.get("img_size")
    if size is not None:
        shape = (shape[0], *((size, size) if isinstance(size, int) else size))
    mean = tuple(cfg.mean) if cfg is not None else IMAGENET_MEAN
    std = tuple(cfg.std) if cfg is not None else IMAGENET_STD
    return InputContract(tuple(int(s) for s in shape), mean, std)


def default_input(arch: str, kwargs: dict) -> InputContract:
    """The input contract an architecture expects when the user does not give one."""
    prefix, _, name = arch.partition(":")
    if prefix == "timm":
        return _timm_input(name, kwargs)
    if prefix == "rankcut" and name in BUILTINS:
        contract = BUILTINS[name].input
        channels = int(kwargs.get("in_channels", contract.shape[0]))
        if channels != contract.shape[0]:
            return InputContract((channels, *contract.shape[1:]), *generic_normalisation(channels))
        return contract
    return InputContract((3, 224, 224), IMAGENET_MEAN, IMAGENET_STD)


def own_normalisation(arch: str, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """The mean/std an architecture is known to be trained with at ``channels`` input channels, if any."""
    prefix, _, name = arch.partition(":")
    if prefix == "rankcut" and name in BUILTINS and BUILTINS[name].input.shape[0] == channels:
        return BUILTINS[name].input.mean, BUILTINS[name].input.std
    if prefix == "torchvision" and channels == 3:
        return IMAGENET_MEAN, IMAGENET_STD
    if prefix == "timm":
        contract = _timm_input(name, {})
        if contract.shape[0] == channels:
            return contract.mean, contract.std
    return None


def generic_normalisation(channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean/std when the architecture has none of its own: ImageNet's for RGB, their average per channel else."""
    if channels == 3:
        return IMAGENET_MEAN, IMAGENET_STD
    return (round(sum(IMAGENET_MEAN) / 3, 4),) * channels, (round(sum(IMAGENET_STD) / 3, 4),) * channels


def with_input_channels(arch: str, kwargs: dict, channels: int) -> dict:
    """``kwargs`` with ``in_channels`` set from the input shape, for a built-in that takes it and was not told."""
    prefix, _, name = arch.partition(":")
    if prefix != "rankcut" or name not in BUILTINS or "in_channels" in kwargs:
        return kwargs
    if "in_channels" not in inspect.signature(BUILTINS[name].build).parameters:
        return kwargs
    return kwargs if channels == BUILTINS[name].input.shape[0] else {**kwargs, "in_channels": channels}


def _trusted_packages() -> set[str]:
    return {p.strip() for p in os.environ.get("RANKCUT_TRUST", "").split(",") if p.strip()}


def build(arch: str, kwargs: dict | None = None, trusted: bool = False) -> nn.Module:
    """Build the architecture named ``arch`` with keyword arguments ``kwargs`` (random weights)."""
    kwargs = dict(kwargs or {})
    if not isinstance(arch, str) or ":" not in arch:
        raise RankcutError(
            f"unknown architecture {arch!r}: use torchvision:NAME, timm:NAME, rankcut:NAME or package.module:function"
        )
    prefix, _, name = arch.partition(":")
    try:
        if prefix == "torchvision":
            if name not in _torchvision_builders():
                raise RankcutError(f"unknown architecture {arch!r}: not a torchvision classification model")
            import torchvision.models as tvm

            return tvm.get_model(name, weights=None, **kwargs)
        if prefix == "timm":
            timm = _timm()
            if not timm.is_model(name):
                raise RankcutError(f"unknown architecture {arch!r}: not a timm model")
            return timm.create_model(name, pretrained=False, **kwargs)
        if prefix == "rankcut":
            if name not in BUILTINS:
                raise RankcutError(f"unknown architecture {arch!r}: built-ins are {', '.join(sorted(BUILTINS))}")
            return BUILTINS[name].build(**kwargs)
        return _build_user(arch, kwargs, trusted)
    except NotImplementedError as e:
        if "meta" not in str(e):
            raise
        raise NeedsRealTensors(f"{arch} cannot be built on the meta device: its builder reads tensor data") from None
    except (TypeError, ValueError, RuntimeError, OverflowError, AssertionError) as e:
        # Bad keyword arguments surface from builders as any of these (torch's own messages run to many
        # lines of C++ frames): keep the first line.
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        shown = json.dumps(kwargs, sort_keys=True, default=str)
        shown = shown if len(shown) <= 200 else shown[:200] + "..."
        raise RankcutError(f"cannot build {arch} with arguments {shown}: {first}") from None


def _build_user(arch: str, kwargs: dict, trusted: bool) -> nn.Module:
    if not _USER.match(arch):
        raise RankcutError(f"unknown architecture {arch!r}: use torchvision:NAME, rankcut:NAME or package.module:function")
    module_name, fn_name = arch.split(":")
    if not trusted and module_name.split(".")[0] not in _trusted_packages():
        raise RankcutError(
            f"the model is built by user code {arch}; set RANKCUT_TRUST={module_name.split('.')[0]} to allow importing it"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise RankcutError(f"cannot import {module_name} for architecture {arch}: {e}") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise RankcutError(f"{module_name} has no function {fn_name}")
    model = fn(**kwargs)
    if not isinstance(model, nn.Module):
        raise RankcutError(f"{arch} returned {type(model).__name__}, not a torch.nn.Module")
    return model
