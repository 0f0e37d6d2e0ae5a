"""Copies of layers with some channels removed: the module surgery of a channel-pruned chain.

Each function returns a new module of the same type holding only the kept channels' parameters (and
buffers, for BatchNorm), so the result is bit-exact on those channels. ``kept`` is a list of channel
indices into the module's current width, in the order they will have.
"""

from __future__ import annotations

import torch
from torch import nn


def _index(kept: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(kept, dtype=torch.long, device=device)


def block_index(kept: list[int], block: int) -> list[int]:
    """Inputs of a ``Linear`` after a flatten that belong to the kept channels (``block`` inputs each)."""
    return [c * block + i for c in kept for i in range(block)]


def narrow_outputs(layer: nn.Conv2d | nn.Linear, kept: list[int]) -> nn.Conv2d | nn.Linear:
    """``layer`` keeping only the output channels ``kept`` (a producer)."""
    w = layer.weight
    if isinstance(layer, nn.Linear):
        new = nn.Linear(layer.in_features, len(kept), bias=layer.bias is not None, device=w.device, dtype=w.dtype)
    else:
        new = nn.Conv2d(layer.in_channels, len(kept), layer.kernel_size, layer.stride, layer.padding, layer.dilation,
                        1, layer.bias is not None, layer.padding_mode, device=w.device, dtype=w.dtype)
    idx = _index(kept, w.device)
    with torch.no_grad():
        new.weight.copy_(w.index_select(0, idx))
        if layer.bias is not None:
            new.bias.copy_(layer.bias.index_select(0, idx))
    return new


def narrow_inputs(layer: nn.Conv2d | nn.Linear, kept: list[int], block: int = 1) -> nn.Conv2d | nn.Linear:
    """``layer`` reading only the input channels ``kept`` (a consumer; ``block`` inputs per channel for a Linear).

    The result always has a bias (zero if ``layer`` had none): the reconstruction of the dropped channels
    folds a constant into it.
    """
    w = layer.weight
    if isinstance(layer, nn.Linear):
        cols = block_index(kept, block)
        new = nn.Linear(len(cols), layer.out_features, bias=True, device=w.device, dtype=w.dtype)
    else:
        cols = kept
        new = nn.Conv2d(len(kept), layer.out_channels, layer.kernel_size, layer.stride, layer.padding, layer.dilation,
                        1, True, layer.padding_mode, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w.index_select(1, _index(cols, w.device)))
        new.bias.copy_(layer.bias if layer.bias is not None else torch.zeros_like(new.bias))
    return new


def narrow_channelwise(module: nn.Module, kept: list[int]) -> nn.Module:
    """A BatchNorm, PReLU or depthwise conv keeping only the channels ``kept``."""
    ref = next(iter(module.parameters()), None)
    if ref is None:
        ref = next(iter(module.buffers()))
    device, dtype = ref.device, ref.dtype
    idx = _index(kept, device)
    k = len(kept)
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        new = type(module)(k, module.eps, module.momentum, module.affine, module.track_running_stats,
                           device=device, dtype=dtype)
    elif isinstance(module, nn.PReLU):
        new = nn.PReLU(k, device=device, dtype=dtype)
    elif isinstance(module, nn.Conv2d):
        new = nn.Conv2d(k, k, module.kernel_size, module.stride, module.padding, module.dilation, k,
                        module.bias is not None, module.padding_mode, device=device, dtype=dtype)
    else:
        raise TypeError(f"cannot narrow a {type(module).__name__}")
    with torch.no_grad():
        for name, tensor in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            target = getattr(new, name)
            if target is None:
                continue
            target.copy_(tensor if tensor.dim() == 0 else tensor.index_select(0, idx))
    new.train(module.training)
    return new
