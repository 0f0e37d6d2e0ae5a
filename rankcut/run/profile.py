"""Measure a model's latency on this machine: whole, and per target as it is and as rank-k pairs at a grid of ranks.

Every leaf module is timed in isolation on its real input (captured with a forward pre-hook on one batch),
so the parts can be added up and checked against the whole (a module called several times in one forward,
like torchvision's shared ``relu``, is timed once on its first input; functional operations are in the
whole only). A target is timed together with the BatchNorm
a projection would fold into it, and beside its candidate pairs in alternating passes (``latency.compare``),
so each candidate's time is its median pairwise ratio to the layer as it is, times the layer's time.
"""

from __future__ import annotations

import platform
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from rankcut.errors import RankcutError
from rankcut.files.profilefile import PAIR, Candidate, LayerProfile, Profile
from rankcut.model.contract import InputContract
from rankcut.model.edits import get_module
from rankcut.model.cost import pair_saves
from rankcut.model.layers import current_rank, empty_pair
from rankcut.model.targets import Target
from rankcut.run.latency import RUNTIMES, Runner, compare, pinned_threads, random_input, torch_runner

def rank_grid(layer: nn.Module, points: int) -> list[int]:
    """Up to ``points`` ranks, evenly spread over the ranks whose pair saves MACs (both ends included)."""
    ks = [k for k in range(1, current_rank(layer)) if pair_saves(layer, k)]
    if len(ks) <= points:
        return ks
    return sorted({ks[round(i)] for i in np.linspace(0, len(ks) - 1, points)})


def capture_inputs(model: nn.Module, names: list[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The input each named module receives in one forward pass on ``x`` (first call, first argument)."""
    seen: dict[str, torch.Tensor] = {}
    handles = []
    for name in names:
        def hook(_, args, name=name):
            if name not in seen and args and isinstance(args[0], torch.Tensor):
                seen[name] = args[0].detach().clone()
        handles.append(get_module(model, name).register_forward_pre_hook(hook))
    try:
        with torch.inference_mode():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return seen


def _runner_factory(runtime: str, threads: int) -> Callable[[nn.Module, torch.Tensor], Runner]:
    if runtime == "torch":
        return torch_runner
    if runtime != "onnxruntime":
        raise RankcutError(f"unknown runtime {runtime!r}; choose from {', '.join(RUNTIMES)}")
    from rankcut.run import export  # the onnx extra

    export.require_onnx()

    def make(module: nn.Module, x: torch.Tensor) -> Runner:
        return export.ort_runner(export.session(export.onnx_bytes(module, x), threads), x)

    return make


def _as_is(model: nn.Module, target: Target) -> nn.Module:
    """The target with the BatchNorm a projection would fold into it: what a pair replaces."""
    layer = get_module(model, target.name)
    return nn.Sequential(layer, get_module(model, target.bn)) if target.bn else layer


def profile_model(model: nn.Module, contract: InputContract, targets: list[Target], digest: str, *,
                  batch_size: int, device: torch.device, threads: int | None = None, runtime: str = "torch",
                  points: int = 8, seconds: float = 4.0, step: Callable[[str], None] = lambda _: None) -> Profile:
    """Time the whole model, every non-target leaf, and every target as it is and as pairs at ``rank_grid``.

    ``seconds`` bounds each comparison (after 10 rounds); ``step(name)`` is called after each piece.
    """
    if batch_size < 1:
        raise RankcutError(f"--batch-size must be at least 1, got {batch_size}")
    if runtime == "onnxruntime" and device.type != "cpu":
        raise RankcutError("--runtime onnxruntime runs on the CPU here; pass --device cpu")
    model = model.to(device).eval()
    x = random_input(contract, batch_size, device)
    target_parts = {t.name for t in targets} | {t.bn for t in targets if t.bn}
    leaves = [n for n, m in model.named_modules() if n and not list(m.children())
              and not any(n == p or n.startswith(p + ".") for p in target_parts)]
    options = {"rounds": 40, "min_rounds": 10, "max_seconds": seconds, "round_seconds": 0.02}
    with pinned_threads(threads) as used, torch.inference_mode():
        make = _runner_factory(runtime, used)
        inputs = capture_inputs(model, [t.name for t in targets] + leaves, x)
        whole = compare([make(model, x)], **options)[0]
        step("whole model")
        others = 0.0
        for name in leaves:
            if name in inputs:  # a leaf the forward pass never calls costs nothing
                others += compare([make(get_module(model, name), inputs[name])], **options)[0].batch_ms
        step("other layers")
        layers = {}
        for t in targets:
            if t.name not in inputs:
                raise RankcutError(f"{t.name} is not called in a forward pass, so it cannot be timed")
            layer, xin = get_module(model, t.name), inputs[t.name]
            ranks = rank_grid(layer, points)
            pairs = [empty_pair(layer, k).to(device).eval() for k in ranks]
            timed = compare([make(_as_is(model, t), xin)] + [make(p, xin) for p in pairs], **options)
            base = timed[0]
            layers[t.name] = LayerProfile(base.batch_ms, base.spread_ms, {PAIR: tuple(
                Candidate(k, base.batch_ms * c.ratio, c.ratio, c.ratio_q25, c.ratio_q75)
                for k, c in zip(ranks, timed[1:]))})
            step(t.name)
    return Profile(digest, str(device), used, runtime, batch_size, torch.__version__, platform.node(),
                   whole.batch_ms, whole.spread_ms, others, layers)
