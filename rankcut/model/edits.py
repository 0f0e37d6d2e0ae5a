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


KINDS = {cls.kind: cls for cls in (FoldBatchNorm, LowRankPair, SplitMultiheadAttention)}
Edit = FoldBatchNorm | LowRankPair | SplitMultiheadAttention


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
        if isinstance(value, bool) or not isinstance(value, int if names[key] == "int" else str):
            raise RankcutError(f"malformed {d['kind']} edit: {key}={value!r}")
    return cls(**args)


def ranks(model: nn.Module) -> dict[str, int]:
    """The rank of every pair in ``model``, by module name."""
    return {name: m.rank for name, m in model.named_modules() if isinstance(m, LowRank)}
