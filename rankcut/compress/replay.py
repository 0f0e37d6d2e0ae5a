"""Start a refit pass from a block's kept input instead of from the data.

Refit fits the layers in call order, one pass over the data each, stopped at the layer. A module that is
called once per forward pass runs all of its descendants in one stretch of the call order, so while refit is
inside it nothing before it changes and its input stays what it was: the pass for the next layer can start
from that input, kept from the pass that entered the module, instead of running the model from the data
(on a ResNet, each pass then runs one residual block instead of the whole prefix). The outputs are the same:
the same module runs on the same tensors.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import nn

from rankcut.model.contract import InputContract
from rankcut.model.forward import probe


def _inside(name: str, block: str) -> bool:
    return name.startswith(f"{block}.")


class Replay:
    """The kept inputs (per batch) of the blocks that hold the layer being refitted, and which blocks qualify.

    A block qualifies when it is called exactly once per forward pass, on positional tensors only (no
    keyword arguments, so a call can be repeated from them), and its inputs for all the samples take at most
    ``limit`` bytes (at most one block per nesting level is kept at a time).
    """

    def __init__(self, model: nn.Module, contract: InputContract, samples: int, limit: int):
        self.model = model
        self.kept: dict[str, list[tuple[torch.Tensor, ...]]] = {}
        calls: Counter[str] = Counter()
        sizes: dict[str, int] = {}

        def on(name):
            def hook(_, args, kwargs):
                calls[name] += 1
                if not kwargs and args and all(isinstance(a, torch.Tensor) and a.dim() for a in args):
                    sizes[name] = sum(a[0].numel() * a.element_size() for a in args)
            return hook

        handles = [m.register_forward_pre_hook(on(n), with_kwargs=True)
                   for n, m in model.named_modules() if n and any(True for _ in m.children())]
        try:
            probe(model, contract.shape)
        finally:
            for h in handles:
                h.remove()
        self.blocks = {n for n, size in sizes.items() if calls[n] == 1 and size * samples <= limit}

    def start(self, layer: str) -> str | None:
        """Forget the kept inputs of blocks that do not hold ``layer``; the deepest block left (None: the data)."""
        self.kept = {b: v for b, v in self.kept.items() if _inside(layer, b)}
        return max(self.kept, key=len, default=None)

    def to_keep(self, layer: str, start: str | None) -> list[str]:
        """The qualifying blocks holding ``layer`` inside ``start`` (whose inputs a pass from there computes)."""
        return [b for b in self.blocks if _inside(layer, b) and (start is None or _inside(b, start))]

    def run(self, start: str, batch: int) -> None:
        """Call block ``start`` on its kept inputs of one batch (copies: the block may work in place)."""
        self.model.get_submodule(start)(*(a.clone() for a in self.kept[start][batch]))

    def keeping(self, blocks: list[str]) -> list:
        """Hooks that append each block's inputs per call to ``self.kept`` (remove them after the pass)."""
        for b in blocks:
            self.kept[b] = []

        def keep(name):
            def hook(_, args):
                self.kept[name].append(tuple(a.detach().clone() for a in args))
            return hook

        return [self.model.get_submodule(b).register_forward_pre_hook(keep(b)) for b in blocks]
