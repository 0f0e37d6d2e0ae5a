"""Size and cost of a model: parameters and MACs (via ``torch.utils.flop_counter``)."""

from __future__ import annotations

import torch
from torch import nn

from rankcut.model.archs import InputContract


def count_params(model: nn.Module) -> int:
    """Number of parameters (buffers such as BatchNorm statistics are not counted)."""
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, contract: InputContract) -> tuple[int, dict[str, int]]:
    """MACs of one forward pass at batch 1: the total, and per leaf module by fully-qualified name."""
    # Imported here: the module pulls in triton (and the mode, on first use, torch._dynamo), about a second
    # that commands which never count MACs (stats, finetune, --help) need not pay.
    from torch.utils.flop_counter import FlopCounterMode

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, *contract.shape, device=device))
    finally:
        model.train(was_training)
    leaves = {name for name, m in model.named_modules() if not list(m.children())}
    per_layer = {}
    for key, ops in counter.get_flop_counts().items():
        _, _, name = key.partition(".")
        if name in leaves:
            per_layer[name] = sum(ops.values()) // 2
    return counter.get_total_flops() // 2, per_layer
