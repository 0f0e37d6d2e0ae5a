"""The rank-k pair module, BatchNorm folding, and the algebra that (re)writes a layer as a pair.

A target layer is an affine map ``z = W x + b`` (``Conv2d`` with groups=1, or ``Linear``). A rank-k
pair computes ``z' = up(down(x))`` where ``down`` has k filters with the original kernel, stride and
padding and ``up`` is a 1x1 convolution (or ``Linear``) back to the original width.
"""

from __future__ import annotations

import torch
from torch import nn

Affine = nn.Conv2d | nn.Linear


class LowRank(nn.Module):
    """A rank-k factorisation of one conv or linear layer: ``up(down(x))``."""

    def __init__(self, down: Affine, up: Affine):
        super().__init__()
        self.down = down
        self.up = up

    @property
    def rank(self) -> int:
        return self.down.weight.shape[0]

    def forward(self, x):
        return self.up(self.down(x))


def is_target_type(module: nn.Module) -> bool:
    """True for layers rankcut can factorise: plain convs (groups=1), linears, and existing pairs."""
    if isinstance(module, LowRank):
        return True
    if isinstance(module, nn.Conv2d):
        return module.groups == 1
    return isinstance(module, nn.Linear)


def input_side(layer: nn.Module) -> Affine:
    """The layer that reads a target's input: the target itself, or the ``down`` half of a pair."""
    return layer.down if isinstance(layer, LowRank) else layer


def fan_in(layer: nn.Module) -> int:
    """Inputs per output of a target or pair (C_in x kernel area for a conv, in_features for a linear)."""
    return input_side(layer).weight[0].numel()


def channels_last(layer: nn.Module) -> bool:
    """True when the target's outputs hold channels on the last axis (a linear), False for axis 1 (a conv).

    A linear acts on the last axis whatever the tensor's rank, so every leading axis of its output is a
    sample position, as the spatial axes are for a conv.
    """
    return isinstance(input_side(layer), nn.Linear)


def plain_batchnorm(module: nn.Module) -> bool:
    """True for a BatchNorm whose forward is torch's own: only that one can be folded into a layer.

    Subclasses that change the forward (timm's ``BatchNormAct2d`` applies its activation inside) would
    lose that extra work if folded and replaced by an identity.
    """
    base = nn.modules.batchnorm._BatchNorm
    return isinstance(module, base) and type(module).forward is base.forward


def out_width(layer: nn.Module) -> int:
    """Number of output channels (features) of a target layer or pair."""
    return (layer.up if isinstance(layer, LowRank) else layer).weight.shape[0]


def current_rank(layer: nn.Module) -> int:
    """The rank a target has now: k for a pair, the output width for a whole layer."""
    return layer.rank if isinstance(layer, LowRank) else out_width(layer)


def max_rank(layer: nn.Module) -> int:
    """The most directions a target's (centred) outputs can span: min(width, inputs per output), or k for a pair."""
    return min(current_rank(layer), fan_in(layer))


def _like(layer: Affine, out: int) -> Affine:
    """A fresh layer with ``layer``'s input side and kernel geometry, ``out`` outputs, and a bias."""
    if isinstance(layer, nn.Linear):
        return nn.Linear(layer.in_features, out, bias=True)
    return nn.Conv2d(layer.in_channels, out, layer.kernel_size, layer.stride, layer.padding,
                     layer.dilation, groups=1, bias=True, padding_mode=layer.padding_mode)


def _up(rank: int, width: int, conv: bool) -> Affine:
    return nn.Conv2d(rank, width, 1, bias=True) if conv else nn.Linear(rank, width, bias=True)


def empty_pair(layer: nn.Module, rank: int) -> LowRank:
    """The rank-``rank`` pair that would replace ``layer`` (structure only; weights are placeholders)."""
    first = input_side(layer)
    return LowRank(_like(first, rank), _up(rank, out_width(layer), isinstance(first, nn.Conv2d)))


def with_bias(layer: Affine) -> Affine:
    """``layer`` itself if it has a bias, else an equal copy with a zero bias (BatchNorm folds need one)."""
    if layer.bias is not None:
        return layer
    new = _like(layer, layer.weight.shape[0])
    with torch.no_grad():
        new.weight.copy_(layer.weight)
        new.bias.zero_()
    return new.to(layer.weight.device, layer.weight.dtype)


def fold_batchnorm(layer: Affine, bn: nn.modules.batchnorm._BatchNorm) -> Affine:
    """A layer computing ``bn(layer(x))`` with eval-mode BatchNorm statistics folded in."""
    new = with_bias(layer)
    if new is layer:
        new = _like(layer, layer.weight.shape[0]).to(layer.weight.device, layer.weight.dtype)
    with torch.no_grad():
        scale = torch.ones_like(bn.running_var) if bn.weight is None else bn.weight.clone()
        scale = scale / torch.sqrt(bn.running_var + bn.eps)
        shift = torch.zeros_like(bn.running_mean) if bn.bias is None else bn.bias
        bias = layer.bias if layer.bias is not None else torch.zeros_like(bn.running_mean)
        shape = (-1,) + (1,) * (layer.weight.dim() - 1)
        new.weight.copy_(layer.weight * scale.reshape(shape))
        new.bias.copy_((bias - bn.running_mean) * scale + shift)
    return new


def affine_parts(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """``(W1, b1, U, b2)`` with ``z = U (W1 * x + b1) + b2``; ``U`` is None for a whole layer (identity)."""
    if isinstance(layer, LowRank):
        up = layer.up.weight.reshape(layer.up.weight.shape[0], -1)
        return layer.down.weight, layer.down.bias, up, layer.up.bias
    bias = layer.bias if layer.bias is not None else torch.zeros(layer.weight.shape[0], device=layer.weight.device,
                                                                 dtype=layer.weight.dtype)
    return layer.weight, bias, None, torch.zeros_like(bias)


def project_layer(layer: nn.Module, up: torch.Tensor, down: torch.Tensor, mu: torch.Tensor) -> LowRank:
    """Replace ``layer`` by the pair computing ``up @ down @ (z - mu) + mu``, where z is its output.

    ``up`` is C x k, ``down`` is k x C and ``mu`` has C entries. An existing pair composes into one
    pair of rank k: the new ``down`` is ``down @ U @ W1``, so repeated projection never stacks layers.
    """
    w1, b1, u_old, b2 = affine_parts(layer)
    dtype, device = w1.dtype, w1.device
    up64, down64, mu64 = up.double().to(device), down.double().to(device), mu.double().to(device)
    mix = down64 if u_old is None else down64 @ u_old.double()
    z_bias = b1.double() if u_old is None else u_old.double() @ b1.double()
    z_bias = z_bias + b2.double()
    new_w = torch.tensordot(mix, w1.double(), dims=([1], [0]))
    new_b = down64 @ (z_bias - mu64)
    pair = empty_pair(layer, up.shape[1]).to(device, dtype)
    with torch.no_grad():
        pair.down.weight.copy_(new_w)
        pair.down.bias.copy_(new_b)
        pair.up.weight.copy_(up64.reshape(pair.up.weight.shape))
        pair.up.bias.copy_(mu64)
    return pair
