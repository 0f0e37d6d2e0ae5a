"""What a model and each of its layers cost: parameters and MACs, counted and predicted.

Counting uses ``torch.utils.flop_counter`` on fake tensors, so no activation is allocated whatever the
recorded input size. The prediction (``Geometry``) is the one cost model of a target as a whole layer or
as a rank-k pair, used by projection, budgets and ``info``; a test checks it against the counted MACs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from rankcut.errors import RankcutError
from rankcut.model.contract import InputContract
from rankcut.model.forward import device_of, eval_mode, shapes_only
from rankcut.model.layers import LowRank, current_rank, fan_in, out_width


def count_params(model: nn.Module) -> int:
    """Number of parameters (buffers such as BatchNorm statistics are not counted)."""
    return sum(p.numel() for p in model.parameters())


def _counted(model: nn.Module, x_factory):
    """A ``FlopCounterMode`` that watched one forward pass of ``model`` on ``x_factory()``."""
    # Imported here: the module pulls in triton (and the mode, on first use, torch._dynamo), about a second
    # that commands which never count MACs (stats, finetune, --help) need not pay.
    from torch.utils.flop_counter import FlopCounterMode  # noqa: PLC0415

    with eval_mode(model), torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x_factory())
    return counter


def count_macs(model: nn.Module, contract: InputContract) -> tuple[int, dict[str, int]]:
    """MACs of one forward pass at batch 1: the total, and per leaf module by fully-qualified name.

    The pass runs on fake tensors (shapes only); a model whose forward needs real values (data-dependent
    control flow) is counted with a real pass instead.
    """
    shape = (1, *contract.shape)
    device = device_of(model)
    counter = shapes_only(lambda: _counted(model, lambda: torch.zeros(shape, device=device)))
    leaves = {name for name, m in model.named_modules() if not list(m.children())}
    per_layer = {}
    for key, ops in counter.get_flop_counts().items():
        _, _, name = key.partition(".")
        if name in leaves:
            per_layer[name] = sum(ops.values()) // 2
    return counter.get_total_flops() // 2, per_layer


def target_macs(model: nn.Module, name: str, per_layer_macs: dict[str, int]) -> int:
    """Counted MACs of one target: the layer, or both halves of the pair it has become."""
    if isinstance(model.get_submodule(name), LowRank):
        return per_layer_macs.get(f"{name}.down", 0) + per_layer_macs.get(f"{name}.up", 0)
    return per_layer_macs.get(name, 0)


def target_cost(model: nn.Module, name: str, per_layer_macs: dict[str, int]) -> tuple[int, int]:
    """(MACs, parameters) of one target layer or pair, from a per-leaf MACs table."""
    params = sum(p.numel() for p in model.get_submodule(name).parameters())
    return target_macs(model, name, per_layer_macs), params


@dataclass(frozen=True)
class Geometry:
    """What a target's cost depends on: inputs per output (``fan_in``), outputs (``width``), output positions."""

    fan_in: int
    width: int
    positions: float = 1.0

    @classmethod
    def of(cls, layer: nn.Module, positions: float = 1.0) -> "Geometry":
        return cls(fan_in(layer), out_width(layer), positions)

    def whole_macs(self) -> int:
        """MACs of the layer kept whole: every output from every input."""
        return round(self.width * self.fan_in * self.positions)

    def pair_macs(self, k: int) -> int:
        """MACs of a rank-k pair: k filters of the original kernel, then a 1x1 back up to ``width``."""
        return round(k * (self.fan_in + self.width) * self.positions)

    def pair_params(self, k: int) -> int:
        """Parameters of a rank-k pair: down has k x fan_in weights and k biases, up width x k and width."""
        return k * self.fan_in + k + self.width * k + self.width


def pair_saves(layer: nn.Module, rank: int) -> bool:
    """True when a rank-``rank`` pair costs fewer MACs per output position than the whole layer."""
    geo = Geometry.of(layer)
    return geo.pair_macs(rank) < geo.whole_macs()


def geometry(model: nn.Module, name: str, per_layer_macs: dict[str, int]) -> Geometry:
    """The geometry of a target (whole layer or pair), output positions taken from its counted MACs."""
    layer = model.get_submodule(name)
    geo = Geometry.of(layer)
    macs = per_layer_macs.get(f"{name}.down" if isinstance(layer, LowRank) else name, 0)
    if macs <= 0:
        raise RankcutError(f"{name} does no counted work in a forward pass, so a MACs budget cannot price it")
    return Geometry(geo.fan_in, geo.width, macs / (current_rank(layer) * geo.fan_in))
