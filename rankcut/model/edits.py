"""Structural edits, recorded by module name in a checkpoint and replayed when it is loaded.

Loading a checkpoint = build the base architecture, apply its edits in order, load the state dict
strictly. Each edit is a small frozen dataclass with a ``kind`` tag; ``apply`` changes the module tree
(and does the numerically natural thing, e.g. folding BatchNorm, so ``project`` can call it too). A new
kind of edit only needs a class here registered in ``KINDS``: the loader never changes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import ClassVar

from torch import nn

from rankcut.errors import RankcutError
from rankcut.model.attention import split
from rankcut.model.layers import LowRank, empty_pair, fold_batchnorm, is_target_type, out_width, plain_batchnorm
from rankcut.model.narrow import narrow_channelwise, narrow_inputs, narrow_outputs


def get_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule called ``name`` (fully qualified), or a one-line error."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise RankcutError(f"the model has no layer named {name!r}") from None


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule called ``name`` by ``module``."""
    parent_name, _, child = name.rpartition(".")
    parent = get_module(model, parent_name) if parent_name else model
    get_module(model, name)
    setattr(parent, child, module)


@dataclass(frozen=True)
class FoldBatchNorm:
    """Fold eval-mode BatchNorm ``bn`` into the layer ``layer`` that feeds it; ``bn`` becomes Identity."""

    kind: ClassVar[str] = "fold_bn"
    layer: str
    bn: str

    def apply(self, model: nn.Module) -> None:
        layer, bn = get_module(model, self.layer), get_module(model, self.bn)
        if not isinstance(layer, (nn.Conv2d, nn.Linear)) or not plain_batchnorm(bn):
            raise RankcutError(f"cannot fold {self.bn} into {self.layer}: expected a conv/linear and a BatchNorm")
        if bn.num_features != layer.weight.shape[0]:
            raise RankcutError(f"cannot fold {self.bn} into {self.layer}: channel counts differ")
        set_module(model, self.layer, fold_batchnorm(layer, bn))
        set_module(model, self.bn, nn.Identity())


@dataclass(frozen=True)
class LowRankPair:
    """Replace layer ``layer`` (a conv, linear, or an existing pair) by a rank-``rank`` pair."""

    kind: ClassVar[str] = "low_rank"
    layer: str
    rank: int

    def apply(self, model: nn.Module) -> None:
        layer = get_module(model, self.layer)
        if not is_target_type(layer):
            raise RankcutError(f"cannot factorise {self.layer}: {type(layer).__name__} is not a conv or linear layer")
        if not isinstance(self.rank, int) or not 1 <= self.rank <= out_width(layer):
            raise RankcutError(f"rank {self.rank!r} for {self.layer} is outside 1..{out_width(layer)}")
        set_module(model, self.layer, empty_pair(layer, self.rank))


@dataclass(frozen=True)
class SplitMultiheadAttention:
    """Replace the self-attention ``nn.MultiheadAttention`` ``layer`` by an equal ``SplitAttention``.

    Its query/key/value projection (``qkv``) and ``out_proj`` become linear modules a hook can observe.
    """

    kind: ClassVar[str] = "split_attention"
    layer: str

    def apply(self, model: nn.Module) -> None:
        module = get_module(model, self.layer)
        if not isinstance(module, nn.MultiheadAttention):
            raise RankcutError(f"cannot split {self.layer}: {type(module).__name__} is not an nn.MultiheadAttention")
        set_module(model, self.layer, split(module))




@dataclass(frozen=True)
class ChannelPrune:
    """Keep only channels ``kept`` (indices into the current width) of a producer -> consumer chain.

    The producer loses the other filters, every ``carried`` module (BatchNorm, PReLU, depthwise conv) the
    other channels, and the consumer the inputs that read them (``block`` inputs per channel for a Linear
    after a flatten). The weights are sliced, so ``project`` then only has to refit the consumer.
    """

    kind: ClassVar[str] = "prune_channels"
    producer: str
    consumer: str
    carried: tuple[str, ...]
    block: int
    kept: tuple[int, ...]

    def apply(self, model: nn.Module) -> None:
        producer, consumer = get_module(model, self.producer), get_module(model, self.consumer)
        if not isinstance(producer, (nn.Conv2d, nn.Linear)) or not isinstance(consumer, (nn.Conv2d, nn.Linear)):
            raise RankcutError(f"cannot prune {self.producer} -> {self.consumer}: expected conv/linear layers")
        width = producer.weight.shape[0]
        kept = list(self.kept)
        if not kept or len(set(kept)) != len(kept) or not all(0 <= c < width for c in kept):
            raise RankcutError(f"cannot prune {self.producer}: kept channels must be distinct indices in 0..{width - 1}")
        fan_in = consumer.in_features if isinstance(consumer, nn.Linear) else consumer.in_channels
        if self.block < 1 or fan_in != width * self.block:
            raise RankcutError(f"cannot prune {self.producer} -> {self.consumer}: the consumer has {fan_in} inputs, "
                               f"not {width} x {self.block}")
        for name in self.carried:
            module = get_module(model, name)
            if not _channelwise_of_width(module, width):
                raise RankcutError(f"cannot prune {self.producer}: {name} is not a {width}-channel BatchNorm, "
                                   "PReLU or depthwise conv")
            set_module(model, name, narrow_channelwise(module, kept))
        set_module(model, self.producer, narrow_outputs(producer, kept))
        set_module(model, self.consumer, narrow_inputs(consumer, kept, self.block))


def _channelwise_of_width(module: nn.Module, width: int) -> bool:
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return module.num_features == width
    if isinstance(module, nn.PReLU):
        return module.num_parameters == width
    return (isinstance(module, nn.Conv2d) and module.groups == module.in_channels == module.out_channels == width)


KINDS = {cls.kind: cls for cls in (FoldBatchNorm, LowRankPair, SplitMultiheadAttention, ChannelPrune)}
Edit = FoldBatchNorm | LowRankPair | SplitMultiheadAttention | ChannelPrune


def edit_to_dict(edit: Edit) -> dict:
    return {"kind": edit.kind, **asdict(edit)}


def edit_from_dict(d: dict) -> Edit:
    """Parse one recorded edit, refusing unknown kinds and fields with a one-line error."""
    if not isinstance(d, dict) or d.get("kind") not in KINDS:
        kind = d.get("kind") if isinstance(d, dict) else d
        raise RankcutError(f"unknown edit {kind!r} in checkpoint (this rankcut knows {', '.join(KINDS)})")
    cls = KINDS[d["kind"]]
    names = {f.name: f.type for f in fields(cls)}
    args = {k: v for k, v in d.items() if k != "kind"}
    if set(args) != set(names):
        raise RankcutError(f"malformed {d['kind']} edit: fields {sorted(args)}, expected {sorted(names)}")
    for key, value in args.items():
        element = FIELD_TYPES[names[key]]
        if names[key].startswith("tuple"):
            if not isinstance(value, list) or not all(_plain(v, element) for v in value):
                raise RankcutError(f"malformed {d['kind']} edit: {key} must be a list of {element.__name__}")
            args[key] = tuple(value)
        elif not _plain(value, element):
            raise RankcutError(f"malformed {d['kind']} edit: {key}={value!r}")
    return cls(**args)


FIELD_TYPES = {"int": int, "str": str, "tuple[int, ...]": int, "tuple[str, ...]": str}


def _plain(value, kind: type) -> bool:
    """``value`` is a ``kind`` (an int that is not a bool, or a str)."""
    return not isinstance(value, bool) and isinstance(value, kind)


def ranks(model: nn.Module) -> dict[str, int]:
    """The rank of every pair in ``model``, by module name."""
    return {name: m.rank for name, m in model.named_modules() if isinstance(m, LowRank)}
