"""Prunable channel chains, found on a traced graph of the model.

A chain is a producer P (``Conv2d`` with groups=1, or ``Linear``) whose output reaches exactly one
consumer Q (same types) through channel-wise operations only: BatchNorm, the usual activations, Dropout,
spatial pooling, depthwise convolutions (carried along), and at most one flatten into a ``Linear``
consumer (channel c then feeds Q's inputs ``c*block .. (c+1)*block - 1``, ``block`` = H*W). Removing
channels of P then means: P loses filters, the carried modules lose channels, Q loses inputs.

We trace with ``torch.fx.symbolic_trace`` rather than ``torch.export``: fx keeps every ``torch.nn``
layer as one ``call_module`` node named by its qualified name (rankcut's address for a layer), keeps
functional ops such as ``F.relu``, ``flatten``, ``+`` and ``torch.cat`` visible as nodes, and needs no
example input or compilation; ``torch.export`` lowers to ATen ops where the module boundaries must be
recovered from metadata. Shapes come from ``ShapeProp`` on one zero input of the checkpoint's contract.
"""

from __future__ import annotations

import fnmatch
import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from rankcut.errors import RankcutError
from rankcut.model.archs import InputContract

ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.GELU, nn.SiLU, nn.Hardswish, nn.Dropout, nn.Dropout2d,
               nn.Identity)
POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
ELEMENTWISE_FUNCTIONS = {F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, F.leaky_relu, F.gelu, F.silu, F.hardswish,
                         F.dropout, torch.dropout}
POOL_FUNCTIONS = {F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d}
ELEMENTWISE_METHODS = {"relu", "relu_", "contiguous"}
SHAPE_ONLY_METHODS = {"size", "dim"}
RESIDUAL = {operator.add, operator.iadd, torch.add, operator.sub, torch.sub}
SPATIAL_MEANS = ({2, 3}, {-2, -1})
STRUCTURES = ("pair", "channels")  # what statistics are gathered for
PROJECT_STRUCTURES = (*STRUCTURES, "auto")  # what project makes: auto chooses pair or channels per layer


@dataclass(frozen=True)
class Chain:
    """A producer whose channels can be removed, the one layer that consumes them, and what lies between."""

    producer: str
    consumer: str
    carried: tuple[str, ...]  # channel-wise modules with per-channel parameters: BatchNorm, PReLU, depthwise conv
    channels: int
    block: int = 1  # consumer inputs per channel: H*W after a flatten into a Linear, else 1
    positions: int = 1  # consumer output positions per sample (1 for a Linear)

    def to_dict(self) -> dict:
        return {"producer": self.producer, "consumer": self.consumer, "carried": list(self.carried),
                "channels": self.channels, "block": self.block, "positions": self.positions}


def is_plain(module: nn.Module) -> bool:
    """A producer or consumer type: a ``Linear`` or a ``Conv2d`` with groups=1."""
    return isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1)


def is_depthwise(module: nn.Module) -> bool:
    return (isinstance(module, nn.Conv2d) and module.groups == module.in_channels == module.out_channels
            and module.groups > 1)


def trace_graph(model: nn.Module, contract: InputContract) -> fx.GraphModule:
    """The model's fx graph with every node's output shape, or one line saying why it cannot be traced."""
    try:
        gm = fx.symbolic_trace(model)
    except Exception as e:  # fx raises many types (TraceError, TypeError, NotImplementedError...)
        first = (str(e).splitlines() or [type(e).__name__])[0][:160]
        raise RankcutError(f"--structure channels needs a model torch.fx can trace, and this one cannot be traced "
                           f"({type(e).__name__}: {first}); --structure pair still works on it") from None
    first = next(model.parameters())
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(torch.zeros(1, *contract.shape, device=first.device, dtype=first.dtype))
    except RuntimeError as e:
        raise RankcutError(f"the traced model cannot run on its input {contract.shape}: "
                           f"{(str(e).splitlines() or [''])[0][:160]}") from None
    finally:
        model.train(was_training)
    return gm


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _users(node: fx.Node) -> list[fx.Node]:
    """The nodes that read ``node``'s values (shape queries such as ``x.size(0)`` do not)."""
    return [u for u in node.users if not (u.op == "call_method" and u.target in SHAPE_ONLY_METHODS)
            and not (u.op == "call_function" and u.target is getattr)]


def _is_flatten(node: fx.Node) -> bool:
    """``torch.flatten(x, 1)``, ``x.flatten(1)``, ``x.view(N, -1)`` or ``x.reshape(N, -1)``."""
    args = list(node.args[1:])
    if node.op == "call_function" and node.target is torch.flatten or node.op == "call_method" and node.target == "flatten":
        start = node.kwargs.get("start_dim", args[0] if args else 0)
        end = node.kwargs.get("end_dim", args[1] if len(args) > 1 else -1)
        return start == 1 and end == -1
    if node.op == "call_method" and node.target in ("view", "reshape"):
        dims = args[0] if len(args) == 1 and isinstance(args[0], (tuple, list)) else args
        return len(dims) == 2 and dims[1] == -1
    return False


def _is_spatial_mean(node: fx.Node) -> bool:
    if not (node.op == "call_method" and node.target == "mean" or node.op == "call_function" and node.target is torch.mean):
        return False
    dims = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    dims = {dims} if isinstance(dims, int) else set(dims or ())
    return dims in SPATIAL_MEANS


def _why_not(node: fx.Node) -> str:
    """Why a node stops a chain, in words."""
    if node.op == "output":
        return "its output is (part of) the model's output"
    if node.op == "call_function" and node.target in RESIDUAL or node.op == "call_method" and node.target in ("add", "add_"):
        return f"its output joins a residual add ({node.name})"
    if node.op == "call_function" and node.target in (torch.cat, torch.stack):
        return f"its output is concatenated with other tensors ({node.name})"
    if node.op == "call_function" and node.target in (operator.mul, torch.mul) or node.op == "call_method" and node.target == "mul":
        return f"its output is multiplied by another tensor ({node.name}, e.g. squeeze-excitation)"
    if node.op == "call_method" and node.target in ("view", "reshape", "permute", "transpose", "flatten"):
        return f"its output goes through {node.target} ({node.name}), which mixes channels with other dimensions"
    what = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    return f"its output reaches {what} ({node.name}), which is not a channel-wise operation"


def find_chains(model: nn.Module, contract: InputContract) -> tuple[list[Chain], dict[str, str]]:
    """Every prunable chain, and for every other conv/linear layer the reason it is not a producer."""
    gm = trace_graph(model, contract)
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    chains, refused = [], {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], (nn.Conv2d, nn.Linear)):
            continue
        if not is_plain(modules[node.target]):
            refused[node.target] = "a grouped convolution is not a producer (only groups=1)"
            continue
        found = _follow(node, modules, calls)
        if isinstance(found, Chain):
            chains.append(found)
        else:
            refused[node.target] = found
    return chains, refused


def _follow(start: fx.Node, modules: dict[str, nn.Module], calls: dict[str, int]) -> Chain | str:
    """Walk forward from a producer node to its consumer: the chain, or why there is none.

    The channels sit on dim 1 of a conv producer's output until a flatten (or spatial mean) moves them to the
    last axis, where a Linear producer's are from the start; only a Linear consumes them there.
    """
    name = start.target
    if calls[name] > 1:
        return f"it is called {calls[name]} times in one forward pass (shared weights)"
    channels = modules[name].weight.shape[0]
    last = isinstance(modules[name], nn.Linear)
    carried, block, node = [], 1, start
    while True:
        users = _users(node)
        if len(users) != 1:
            what = "its output is not used" if not users else (
                f"its output has {len(users)} users ({', '.join(u.name for u in users[:4])})")
            return what if node is start else what.replace("its output", f"the output of {node.name}")
        flat = len(_shape(node) or ()) == 2  # (N, C): dim 1 is also the last axis
        node = users[0]
        if node.op == "call_module":
            module = modules[node.target]
            if calls[node.target] > 1 and any(True for _ in module.parameters()):
                return f"{node.target} on its path is called {calls[node.target]} times (shared weights)"
            if is_plain(module):
                return _consumer(start, node, module, channels, tuple(carried), block, last)
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and (not last or flat):
                if module.num_features != channels:
                    return f"{node.target} has {module.num_features} features, not {channels}"
                carried.append(node.target)
            elif not last and is_depthwise(module):
                if module.in_channels != channels:
                    return f"depthwise {node.target} has {module.in_channels} channels, not {channels}"
                carried.append(node.target)
            elif isinstance(module, nn.PReLU) and (module.num_parameters == 1 or not last or flat):
                if module.num_parameters not in (1, channels) or (block > 1 and module.num_parameters > 1):
                    return f"{node.target} has {module.num_parameters} parameters for {channels} channels"
                if module.num_parameters > 1:
                    carried.append(node.target)
            elif isinstance(module, ACTIVATIONS) and not isinstance(module, nn.PReLU) or not last and isinstance(module, POOLS):
                pass
            else:
                return f"its output reaches {node.target} ({type(module).__name__}), which is not channel-wise here"
        elif node.op == "call_function" and node.target in ELEMENTWISE_FUNCTIONS:
            pass
        elif node.op == "call_method" and node.target in ELEMENTWISE_METHODS:
            pass
        elif not last and (node.op == "call_function" and node.target in POOL_FUNCTIONS):
            pass
        elif not last and _is_spatial_mean(node):
            last = len(_shape(node) or ()) == 2  # keepdim=True leaves (N, C, 1, 1)
        elif not last and _is_flatten(node):
            before = _shape(node.args[0])
            if before is None or len(before) < 2 or before[1] != channels:
                return f"{node.name} flattens a tensor whose dimension 1 is not the {channels} channels"
            last = True
            for d in before[2:]:
                block *= d
        else:
            return _why_not(node)


def _consumer(start: fx.Node, node: fx.Node, module: nn.Module, channels: int, carried: tuple[str, ...],
              block: int, last: bool) -> Chain | str:
    out = _shape(node)
    if isinstance(module, nn.Linear):
        if not last:
            return f"consumer {node.target} is a Linear applied to the last axis of a map whose channels are on dim 1"
        if module.in_features != channels * block:
            return f"consumer {node.target} has {module.in_features} inputs, not {channels} channels x {block}"
        positions = 1
        for d in (out or (1, 1))[1:-1]:  # a Linear applied to (N, ..., features) runs once per leading position
            positions *= d
        return Chain(start.target, node.target, carried, channels, block, positions)
    if last:
        return f"consumer {node.target} is a convolution of a tensor whose channels are on its last axis"
    if module.in_channels != channels:
        return f"consumer {node.target} has {module.in_channels} input channels, not {channels}"
    positions = 1
    for d in (out or (1, 1, 1, 1))[2:]:
        positions *= d
    return Chain(start.target, node.target, carried, channels, 1, positions)


def check_structure(structure: str, allowed: tuple[str, ...] = STRUCTURES) -> None:
    if structure not in allowed:
        raise RankcutError(f"--structure must be one of {', '.join(allowed)}, got {structure!r}")


def select_chains(chains: list[Chain], layers: list[str] | None, exclude: list[str] | None) -> list[Chain]:
    """The chains whose producer matches the ``--layers`` globs (default all) and no ``--exclude`` glob."""
    return [c for c in chains if any(fnmatch.fnmatchcase(c.producer, p) for p in layers or ["*"])
            and not any(fnmatch.fnmatchcase(c.producer, p) for p in exclude or [])]


def chain_path(gm: fx.GraphModule, chain: Chain, modules: dict[str, nn.Module]) -> fx.GraphModule | None:
    """The operations between ``chain``'s producer and consumer as a module of their own (None when there are none).

    Its input is the producer's output, its output the consumer's input; ``modules`` supplies the modules it
    calls by name (a caller timing narrower widths passes narrowed carried modules). Functional operations
    such as ``F.relu`` or ``max_pool2d`` are in it, so their time shrinks with the chain's width.
    """
    nodes = {n.target: n for n in gm.graph.nodes if n.op == "call_module"}
    start, end = nodes[chain.producer], nodes[chain.consumer]
    graph = fx.Graph()
    env = {start: graph.placeholder("x")}

    def copy(node: fx.Node) -> fx.Node:
        if node not in env:
            if node.op == "placeholder":
                raise RankcutError(f"the path from {chain.producer} to {chain.consumer} reads the model's input")
            env[node] = graph.node_copy(node, copy)
        return env[node]

    last = end.args[0]
    if last is start:
        return None
    graph.output(copy(last))
    return fx.GraphModule(modules, graph)
