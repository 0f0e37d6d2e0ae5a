"""Measure a model's latency on this machine: whole, per target as rank-k pairs, per channel chain at kept widths.

Every leaf module is timed in isolation on its real input (captured with a forward pre-hook on one batch),
in one alternating comparison with the whole model, so the parts can be added up and checked against the
whole under the same load (a module called several times in one forward, like torchvision's shared
``relu``, counts that many times its time on its first input; functional operations are in the whole only).
A target is timed together with the BatchNorm a projection would fold into it, beside its candidate pairs
in alternating passes (``latency.compare``), so each candidate's time is its median pairwise ratio to the
layer as it is, times the layer's time. A channel chain's modules (producer, carried BatchNorms, consumer)
are each timed beside copies of themselves keeping fewer channels, the same way.
"""

from __future__ import annotations

import platform
from collections.abc import Callable

import numpy as np
import torch
from torch import fx, nn

from rankcut.errors import RankcutError
from rankcut.files.profilefile import PAIR, PATH, Candidate, ChainProfile, LayerProfile, ModuleWidths, Profile
from rankcut.model.contract import InputContract
from rankcut.model.edits import get_module
from rankcut.model.cost import pair_saves
from rankcut.model.graph import Chain, chain_path, is_plain, trace_graph
from rankcut.model.layers import current_rank, empty_pair
from rankcut.model.narrow import block_index, narrow_channelwise, narrow_inputs, narrow_outputs
from rankcut.model.targets import Target
from rankcut.run.latency import RUNTIMES, Runner, compare, pinned_threads, random_input, torch_runner

def rank_grid(layer: nn.Module, points: int) -> list[int]:
    """Up to ``points`` ranks, evenly spread over the ranks whose pair saves MACs (both ends included)."""
    ks = [k for k in range(1, current_rank(layer)) if pair_saves(layer, k)]
    if len(ks) <= points:
        return ks
    return sorted({ks[round(i)] for i in np.linspace(0, len(ks) - 1, points)})


def capture_inputs(model: nn.Module, names: list[str], x: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """The input each named module receives in one forward pass on ``x`` (first call, first argument), and how
    many times each is called."""
    seen: dict[str, torch.Tensor] = {}
    calls: dict[str, int] = dict.fromkeys(names, 0)
    handles = []
    for name in names:
        def hook(_, args, name=name):
            calls[name] += 1
            if name not in seen and args and isinstance(args[0], torch.Tensor):
                seen[name] = args[0].detach().clone()
        handles.append(get_module(model, name).register_forward_pre_hook(hook))
    try:
        with torch.inference_mode():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return seen, calls


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


def width_grid(channels: int, points: int) -> list[int]:
    """Up to ``points`` kept widths, evenly spread over 1 .. channels - 1 (both ends included)."""
    ks = list(range(1, channels))
    if len(ks) <= points:
        return ks
    return sorted({ks[round(i)] for i in np.linspace(0, len(ks) - 1, points)})


def _narrowed(module: nn.Module, side: str, k: int, block: int) -> nn.Module:
    """``module`` keeping the first ``k`` channels on its ``side`` of a chain (which channels does not matter here)."""
    kept = list(range(k))
    if side == "in":
        return narrow_inputs(module, kept, block)
    return narrow_outputs(module, kept) if is_plain(module) else narrow_channelwise(module, kept)


def _sliced(x: torch.Tensor, module: nn.Module, k: int, block: int) -> torch.Tensor:
    """The first ``k`` channels of a consumer's input: dim 1 of a map, the last axis (in blocks) of a Linear's."""
    if isinstance(module, nn.Linear):
        return x[..., block_index(list(range(k)), block)].contiguous()
    return x[:, :k].contiguous()


def _path_at(model: nn.Module, gm: fx.GraphModule, chain: Chain, k: int | None) -> fx.GraphModule | None:
    """The chain's path from producer to consumer, its carried modules keeping ``k`` channels (None: as they are)."""
    modules = dict(model.named_modules())
    if k is not None:
        modules |= {n: _narrowed(modules[n], "out", k, chain.block).eval() for n in chain.carried}
    return chain_path(gm, chain, modules)


def _widths_timed(runners: list, widths: list[int], ms: float, options: dict) -> tuple[Candidate, ...]:
    """``runners`` (as it is, then one per width) compared in turns: each width's ratio to the first, and ms."""
    timed = compare(runners, **options)
    return tuple(Candidate(k, ms * t.ratio, t.ratio, t.ratio_q25, t.ratio_q75) for k, t in zip(widths, timed[1:]))


def _time_chain(model: nn.Module, gm: fx.GraphModule, chain: Chain, inputs: dict[str, torch.Tensor],
                leaf_ms: dict[str, float], path_ms: float, make, points: int, options: dict) -> ChainProfile:
    """The chain's producer, path and consumer, each timed in turns with itself at every width of ``width_grid``."""
    widths = width_grid(chain.channels, points)
    producer, consumer = get_module(model, chain.producer), get_module(model, chain.consumer)
    x, y = inputs[chain.producer], inputs[chain.consumer]
    modules = {chain.producer: ModuleWidths("out", leaf_ms[chain.producer], _widths_timed(
        [make(producer, x)] + [make(_narrowed(producer, "out", k, 1).eval(), x) for k in widths], widths,
        leaf_ms[chain.producer], options))}
    path = _path_at(model, gm, chain, None)
    if path is not None:
        z = producer(x)
        cut = (lambda k: z[..., :k]) if isinstance(producer, nn.Linear) else (lambda k: z[:, :k])
        modules[PATH] = ModuleWidths("out", path_ms, _widths_timed(
            [make(path, z)] + [make(_path_at(model, gm, chain, k), cut(k).contiguous()) for k in widths], widths,
            path_ms, options))
    modules[chain.consumer] = ModuleWidths("in", leaf_ms[chain.consumer], _widths_timed(
        [make(consumer, y)] + [make(_narrowed(consumer, "in", k, chain.block).eval(),
                                    _sliced(y, consumer, k, chain.block)) for k in widths], widths,
        leaf_ms[chain.consumer], options))
    return ChainProfile(chain.consumer, chain.channels, modules)


def _part_times(model: nn.Module, x: torch.Tensor, parts: dict[str, tuple[nn.Module, torch.Tensor, int]], make,
                options: dict):
    """The whole model and every part alone, in one comparison: each part's median ratio to the whole, in ms.

    ``parts`` maps a name to (module, its input, calls per forward). Timing the parts as ratios to the whole,
    pass by pass, keeps them under the same load as the whole (timed apart, a whole measured during a burst
    made resnet18's parts add up to 0.41-0.56 of it). A module called several times per forward counts that
    many times (on its first call's input).
    """
    names = list(parts)
    timed = compare([make(model, x)] + [make(*parts[n][:2]) for n in names], **options)
    whole = timed[0]
    return whole, {n: whole.batch_ms * t.ratio * parts[n][2] for n, t in zip(names, timed[1:])}


def profile_model(model: nn.Module, contract: InputContract, targets: list[Target], digest: str, *,
                  batch_size: int, device: torch.device, threads: int | None = None, runtime: str = "torch",
                  points: int = 8, seconds: float = 4.0, chains: list[Chain] = (),
                  step: Callable[[str], None] = lambda _: None) -> Profile:
    """Time the whole model and every leaf, every target as pairs at ``rank_grid``, every chain at ``width_grid``.

    ``seconds`` bounds each comparison (after 10 rounds); ``step(name)`` is called after each piece.
    """
    if batch_size < 1:
        raise RankcutError(f"--batch-size must be at least 1, got {batch_size}")
    if runtime == "onnxruntime" and device.type != "cpu":
        raise RankcutError("--runtime onnxruntime runs on the CPU here; pass --device cpu")
    model = model.to(device).eval()
    x = random_input(contract, batch_size, device)
    folded = {t.name for t in targets} | {t.bn for t in targets if t.bn}
    leaves = [n for n, m in model.named_modules() if n and not list(m.children())]
    # pass by pass: a part timed back to back keeps its weights and input in the caches, which inside the
    # network the layers before it have filled with theirs (timed so, mnist-cnn's open-loop --latency 0.5 plans
    # measured 0.36-0.44 of the original, not 0.5)
    options = {"rounds": 40, "min_rounds": 10, "max_seconds": seconds, "round_seconds": 0.02, "pass_by_pass": True}
    with pinned_threads(threads) as used, torch.inference_mode():
        make = _runner_factory(runtime, used)
        inputs, calls = capture_inputs(model, leaves, x)
        parts = {n: (get_module(model, n), inputs[n], calls[n]) for n in leaves if n in inputs}  # called ones
        gm = trace_graph(model, contract) if chains else None
        paths = {c.producer: _path_at(model, gm, c, None) for c in chains}
        for c in chains:
            if paths[c.producer] is not None:
                parts[c.producer + PATH] = (paths[c.producer], get_module(model, c.producer)(inputs[c.producer]), 1)
        whole, part_ms = _part_times(model, x, parts, make, options)
        leaf_ms = {n: part_ms[n] for n in leaves if n in part_ms}
        step("whole model and every layer")
        layers = {}
        for t in targets:
            if t.name not in inputs:
                raise RankcutError(f"{t.name} is not called in a forward pass, so it cannot be timed")
            layer, xin = get_module(model, t.name), inputs[t.name]
            ranks = rank_grid(layer, points)
            pairs = [empty_pair(layer, k).to(device).eval() for k in ranks]
            timed = compare([make(_as_is(model, t), xin)] + [make(p, xin) for p in pairs], **options)
            ms = leaf_ms[t.name] + (leaf_ms.get(t.bn, 0.0) if t.bn else 0.0)
            spread = tuple(ms * v / timed[0].batch_ms for v in timed[0].spread_ms)  # its passes' quartiles, scaled
            layers[t.name] = LayerProfile(ms, spread, {PAIR: tuple(
                Candidate(k, ms * c.ratio, c.ratio, c.ratio_q25, c.ratio_q75) for k, c in zip(ranks, timed[1:]))})
            step(t.name)
        chain_profiles = {}
        for c in chains:
            chain_profiles[c.producer] = _time_chain(model, gm, c, inputs, leaf_ms, part_ms.get(c.producer + PATH, 0.0),
                                                     make, points, options)
            step(f"chain {c.producer}")
    others = sum(ms for n, ms in leaf_ms.items() if n not in folded)
    return Profile(digest, str(device), used, runtime, batch_size, torch.__version__, platform.node(),
                   whole.batch_ms, whole.spread_ms, others, layers, chain_profiles)
