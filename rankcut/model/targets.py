"""Which layers are targets, and where their statistics are taken.

A target is a ``Conv2d`` with groups=1, a ``Linear``, or an existing rank-k pair. Statistics are taken
where the projection will happen: at the target's output, or after the eval-mode BatchNorm that
directly consumes it (that BatchNorm is folded in before projecting). Both facts are found by running
one small forward pass with hooks and following tensors by identity, so no model-specific rules are
needed. The layer whose output is the network's output is not a default target.
"""

from __future__ import annotations

import fnmatch
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from rankcut.errors import RankcutError, RankcutWarning
from rankcut.model.contract import InputContract
from rankcut.model.forward import probe, shapes_only
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


def trace(model: nn.Module, contract: InputContract, fake: bool = True) -> tuple[list[Target], str | None]:
    """All candidate targets in call order, and the name of the one producing the model's output.

    ``fake``: on fake tensors (no memory, whatever the input size; ``forward.shapes_only``), else on one real
    sample, which is faster (no fake-tensor machinery to import) where a real sample is cheap anyway.
    """
    targets, final, _ = _traced(model, contract, fake)
    return targets, final


def _traced(model: nn.Module, contract: InputContract,
            fake: bool = True) -> tuple[list[Target], str | None, dict[str, int]]:
    """``trace``, and how many times each candidate layer was called in the pass."""
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

    def run():
        for found in (outputs, calls, follows):  # a failed pass on fake tensors may have left some
            found.clear()
        return probe(model, contract.shape)

    try:
        handles += [candidates[n].register_forward_hook(on_layer(n)) for n in candidates]
        handles += [bns[n].register_forward_hook(on_bn(n)) for n in bns]
        result = shapes_only(run) if fake else run()
    finally:
        for h in handles:
            h.remove()
    called = [n for n in outputs if calls[n] == 1]
    final = next((n for n in called if outputs[n] is result), called[-1] if called else None)
    return [Target(n, follows.get(n) or None) for n in called], final, calls


def match(names: list[str], layers: list[str] | None, exclude: list[str] | None, what: str,
          keep_unnamed: set[str] = frozenset()) -> list[str]:
    """``names`` matching any ``--layers`` glob (default all) and no ``--exclude`` glob, in their order.

    Every pattern must match something in ``names`` (a typo is an error, never an empty selection).
    Names in ``keep_unnamed`` (the output layer) are only taken when a ``--layers`` pattern is exactly them.
    """
    patterns = layers or ["*"]
    for option, given in (("--layers", layers or []), ("--exclude", exclude or [])):
        for p in given:
            if not any(fnmatch.fnmatchcase(n, p) for n in names):
                raise RankcutError(f"{option} {p!r} matches no {what} (it has: {_preview(names)})")
    chosen = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)
              and not any(fnmatch.fnmatchcase(n, p) for p in exclude or [])
              and (n not in keep_unnamed or n in patterns)]
    if not chosen:
        raise RankcutError("no target layers selected")
    return chosen


def select(model: nn.Module, contract: InputContract, layers: list[str] | None = None,
           exclude: list[str] | None = None) -> list[Target]:
    """The targets matching the ``--layers``/``--exclude`` globs (default: all but the output layer).

    The output layer is only taken when a ``--layers`` pattern names it exactly.
    """
    found, final = trace(model, contract)
    by_name = {t.name: t for t in found}
    names = match(list(by_name), layers, exclude, "target layer", {final} if final else set())
    chosen = [by_name[n] for n in names]
    warn_output_layer(chosen, final)
    return chosen


def warn_output_layer(chosen: list[Target], final: str | None) -> None:
    """Say so when the layer producing the model's output (its logits) is among the targets."""
    if final is not None and any(t.name == final for t in chosen):
        warnings.warn(f"{final} is the output layer: cutting it changes the logits themselves (usually the costliest "
                      f"cut); leave it out unless you mean it", RankcutWarning)


def _preview(names: list[str]) -> str:
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
    _, final, counted = _traced(model, contract)
    calls = {n: counted.get(n, 0) for n in candidates}
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
