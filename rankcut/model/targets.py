"""Which layers are targets, and where their statistics are taken.

A target is a ``Conv2d`` with groups=1, a ``Linear``, or an existing rank-k pair. Statistics are taken
where the projection will happen: at the target's output, or after the eval-mode BatchNorm that
directly consumes it (that BatchNorm is folded in before projecting). Both facts are found by running
one small forward pass with hooks and following tensors by identity, so no model-specific rules are
needed. The layer whose output is the network's output is not a default target.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch
from torch import nn

from rankcut.model.archs import InputContract
from rankcut.errors import RankcutError
from rankcut.model.layers import LowRank, channels_last, is_target_type, out_width, plain_batchnorm


@dataclass(frozen=True)
class Target:
    """A layer to rank-reduce (``name``) and the BatchNorm that follows it, if any (``bn``)."""

    name: str
    bn: str | None = None

    @property
    def capture(self) -> str:
        """The module whose output holds the statistics: the BatchNorm if there is one, else the layer."""
        return self.bn or self.name


def _candidates(model: nn.Module) -> dict[str, nn.Module]:
    found, inside_pairs = {}, set()
    for name, module in model.named_modules():
        if any(name.startswith(p + ".") for p in inside_pairs) or not name:
            continue
        if is_target_type(module):
            found[name] = module
            if isinstance(module, LowRank):
                inside_pairs.add(name)
    return found


def trace(model: nn.Module, contract: InputContract) -> tuple[list[Target], str | None]:
    """All candidate targets in call order, and the name of the one producing the model's output."""
    candidates = _candidates(model)
    bns = {n: m for n, m in model.named_modules() if plain_batchnorm(m)}
    outputs: dict[str, torch.Tensor] = {}
    calls: dict[str, int] = {}
    follows: dict[str, str] = {}
    handles = []

    def on_layer(name):
        def hook(_, __, out):
            calls[name] = calls.get(name, 0) + 1
            outputs[name] = out
        return hook

    def on_bn(name):
        def hook(_, inputs, __):
            for layer, out in outputs.items():
                # A BatchNorm normalises axis 1: it follows a linear only on (N, C) outputs.
                if (inputs and inputs[0] is out and bns[name].num_features == out_width(candidates[layer])
                        and (out.dim() == 2 or not channels_last(candidates[layer]))):
                    follows[layer] = name if layer not in follows else ""
        return hook

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        handles += [candidates[n].register_forward_hook(on_layer(n)) for n in candidates]
        handles += [bns[n].register_forward_hook(on_bn(n)) for n in bns]
        with torch.no_grad():
            result = model(torch.zeros(1, *contract.shape, device=device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    called = [n for n in outputs if calls[n] == 1]
    final = next((n for n in called if outputs[n] is result), called[-1] if called else None)
    return [Target(n, follows.get(n) or None) for n in called], final


def select(model: nn.Module, contract: InputContract, layers: list[str] | None = None,
           exclude: list[str] | None = None) -> list[Target]:
    """The targets matching the ``--layers``/``--exclude`` globs (default: all but the output layer).

    The output layer is only taken when a ``--layers`` pattern names it exactly.
    """
    found, final = trace(model, contract)
    patterns = layers or ["*"]
    chosen = [t for t in found if any(fnmatch.fnmatchcase(t.name, p) for p in patterns)
              and (t.name != final or t.name in patterns)]
    for p in patterns:
        if not any(fnmatch.fnmatchcase(t.name, p) for t in found):
            raise RankcutError(f"--layers {p!r} matches no target layer (targets: {_preview(found)})")
    for p in exclude or []:
        if not any(fnmatch.fnmatchcase(t.name, p) for t in found):
            raise RankcutError(f"--exclude {p!r} matches no target layer (targets: {_preview(found)})")
    chosen = [t for t in chosen if not any(fnmatch.fnmatchcase(t.name, p) for p in exclude or [])]
    if not chosen:
        raise RankcutError("no target layers selected")
    return chosen


def _preview(targets: list[Target]) -> str:
    names = [t.name for t in targets]
    return ", ".join(names[:6]) + (f", ... ({len(names)} in all)" if len(names) > 6 else "")


def untargeted(model: nn.Module, contract: InputContract) -> dict[str, str]:
    """Every layer with weights that is not a default target, by name, with one line saying why.

    ``info`` and ``stats`` list these, so nothing is skipped silently: layers whose weights are used
    functionally (no hook can see their outputs), layers called more than once, grouped and depthwise
    convolutions (they stay whole), fused attention, other layer types, and the output layer.
    """
    candidates = _candidates(model)
    inside = tuple(f"{n}." for n, m in candidates.items() if isinstance(m, LowRank))
    modules = {n: m for n, m in model.named_modules() if n and not n.startswith(inside)}
    calls = dict.fromkeys(candidates, 0)
    handles = [candidates[n].register_forward_pre_hook(lambda *_, n=n: calls.__setitem__(n, calls[n] + 1))
               for n in candidates]
    try:
        _, final = trace(model, contract)
    finally:
        for h in handles:
            h.remove()
    notes = {}
    for name, module in modules.items():
        parent = type(model.get_submodule(name.rpartition(".")[0])).__name__ if "." in name else type(model).__name__
        if isinstance(module, nn.MultiheadAttention):
            notes[name] = ("not a target: nn.MultiheadAttention keeps query/key/value in the bare parameter "
                           "in_proj_weight and calls out_proj functionally (rankcut init splits self-attention "
                           "into linear qkv and out_proj; this one is not self-attention as called, or was not "
                           "made by rankcut init)")
        elif name in candidates and calls[name] == 0:
            notes[name] = (f"not a target: never called as a module ({parent} uses its weights directly), so its "
                           "outputs cannot be observed or replaced")
        elif name in candidates and calls[name] > 1:
            notes[name] = f"not a target: called {calls[name]} times per forward pass (its weights are shared)"
        elif name == final:
            notes[name] = "the output layer: a target only when --layers names it"
        elif isinstance(module, nn.Conv2d) and module.groups > 1:
            kind = "depthwise" if module.groups == module.in_channels else "grouped"
            notes[name] = f"stays whole: {kind} convolution (groups={module.groups}); a pair needs groups=1"
        elif isinstance(module, nn.modules.conv._ConvNd) and not isinstance(module, nn.Conv2d):
            notes[name] = f"not a target: {type(module).__name__} (targets are Conv2d and Linear)"
    return notes
