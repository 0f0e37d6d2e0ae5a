"""Moments of each chain consumer's input (after the non-linearity), gathered in the same forward pass.

``observe_inputs`` installs a forward pre-hook on every consumer while another collector (``collect_moments``)
runs the batches, so both share one pass. The accumulators are ``collect.ShiftedSums``: float64, exact to
merge, all-reduced under torchrun like the output moments. A Linear consumer sees its channels on the
last axis: (N, ..., C) is read as (N * positions, C), and after a flatten (N, C*block) as (N, C, block),
so its moments are per channel over the block's positions, as a conv consumer's are over its input positions.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from rankcut.dist import Context
from rankcut.errors import RankcutError
from rankcut.model.graph import Chain
from rankcut.stats.moments import Moments, ShiftedSums


@contextmanager
def observe_inputs(model: nn.Module, chains: list[Chain]) -> Iterator[dict[str, ShiftedSums]]:
    """Accumulate every chain consumer's input while the block runs; yields the sums by producer name."""
    acc = {c.producer: ShiftedSums() for c in chains}
    handles = []

    def hook(chain: Chain):
        def pre(_, inputs):
            x = inputs[0].detach()
            if isinstance(model.get_submodule(chain.consumer), nn.Linear):
                x = x.reshape(-1, chain.channels, chain.block) if chain.block > 1 else x.reshape(-1, chain.channels)
            sums = acc[chain.producer]
            sums.add(x)
            if not sums.finite():
                raise RankcutError(f"the input of {chain.consumer} holds NaN or Inf (or values too large for "
                                   "float32 statistics) on the data; statistics would be meaningless")
        return pre

    try:
        for chain in chains:
            handles.append(model.get_submodule(chain.consumer).register_forward_pre_hook(hook(chain)))
        yield acc
    finally:
        for h in handles:
            h.remove()


def input_moments(acc: dict[str, ShiftedSums], chains: list[Chain], ctx: Context) -> dict[str, Moments]:
    """The accumulated moments of every chain, combined across processes."""
    out = {}
    for chain in chains:
        sums = acc[chain.producer]
        if sums.shift is None and not ctx.distributed:
            raise RankcutError(f"{chain.consumer} never ran on the data")
        local = Moments.empty(chain.channels) if sums.shift is None else sums.moments()
        out[chain.producer] = local.all_reduce(ctx)
    return out


def chain_moments(model: nn.Module, chains: list[Chain], batches, ctx: Context) -> dict[str, Moments]:
    """Consumer-input moments of every chain over ``batches`` on their own (for library use and tests)."""
    model.eval()
    with observe_inputs(model, chains) as acc, torch.inference_mode():
        for x, _ in batches:
            model(x.to(ctx.device, non_blocking=True))
    return input_moments(acc, chains, ctx)
