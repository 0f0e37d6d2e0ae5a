"""Measured latency as a budget currency: a profile's times turned into per-option costs, and slower pairs refused.

With a profile (``rankcut profile``), a layer is never replaced by a pair that the profile measured as no
faster than the layer itself, in any mode. A ``--latency F`` budget is solved by the same allocator as
``--macs`` (pairs) or ``channel_budget.plan_widths`` (channels), in integer nanoseconds:

- the whole model costs its measured whole, and the budget is F x that;
- each part costs its profiled time times ``Profile.scale`` (1 unless the parts timed alone add up to more
  than the whole), so the parts never add up to more than the whole;
- what the choice does not touch (layers outside it, functional operations, residual adds) is a fixed
  cost: the whole minus the scaled parts the choice replaces;
- a pair costs its time, linear between the ranks timed; a module a chain resizes costs its time as it is
  times its measured ratio at the kept width on each side (output channels from the chain it produces,
  input channels from the chain it consumes): ``t(k_in, k_out) = t x r_in(k_in) x r_out(k_out)``, and a
  producer adds its chain's path (BatchNorm, activations, pooling up to the consumer) at ``k_out``.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from torch import nn

from rankcut.compress.budget import LayerOptions
from rankcut.compress.channel_budget import Price, Touch, priced_total, touches
from rankcut.errors import RankcutError
from rankcut.files.profilefile import PAIR, PATH, ChainProfile, LayerProfile, Profile
from rankcut.model.edits import get_module
from rankcut.model.graph import Chain
from rankcut.model.layers import current_rank

NS = 1e6  # nanoseconds per millisecond: costs are integers for the allocator


def _layer(profile: Profile, name: str) -> LayerProfile:
    lp = profile.layers.get(name)
    if lp is None:
        raise RankcutError(f"the profile has no times for {name}; rerun rankcut profile with that layer selected")
    return lp


def pair_ms(profile: Profile, name: str, rank: int) -> float | None:
    """The profile's time of a rank-``rank`` pair for ``name``; None when that rank was not within the timed range."""
    timed = _layer(profile, name).candidates.get(PAIR, ())
    if not timed or not timed[0].size <= rank <= timed[-1].size:
        return None
    return _layer(profile, name).time_at(PAIR, rank)


def slower_pairs(profile: Profile, model: nn.Module, ranks: dict[str, int]) -> dict[str, str]:
    """Layers whose asked pair the profile measured as no faster than the layer, with the reason to report."""
    out = {}
    for name, k in ranks.items():
        lp = _layer(profile, name)
        if k >= current_rank(get_module(model, name)):
            continue
        ms = pair_ms(profile, name, k)
        if ms is not None and ms >= lp.ms:
            out[name] = f"whole: pair slower than the layer: {ms:.3f} ms vs {lp.ms:.3f} ms"
    return out


def never_faster(profile: Profile, names: list[str]) -> dict[str, str]:
    """Layers where no pair the profile timed is faster than the layer, with the reason to report."""
    out = {}
    for name in names:
        lp = _layer(profile, name)
        timed = lp.candidates.get(PAIR, ())
        if timed and min(c.ms for c in timed) >= lp.ms:
            best = min(c.ms for c in timed)
            out[name] = f"whole: pair slower than the layer at every rank timed: {best:.3f} ms vs {lp.ms:.3f} ms"
    return out


def timed_options(profile: Profile):
    """An ``adjust`` for ``plan_budget``: drop options the profile measured as no faster, attach latency costs."""

    def adjust(o: LayerOptions) -> LayerOptions:
        lp = _layer(profile, o.name)
        times = [pair_ms(profile, o.name, int(k)) for k in o.ranks[:-1]] + [lp.ms]
        keep = [i for i, t in enumerate(times) if i == len(times) - 1 or (t is not None and t < lp.ms)]
        ns = np.array([round(times[i] * profile.scale * NS) for i in keep], dtype=np.int64)
        return replace(o, ranks=o.ranks[keep], macs=o.macs[keep], params=o.params[keep], loss=o.loss[keep], latency=ns)

    return adjust


def latency_total(profile: Profile) -> int:
    """The whole model now in the profile's cost model, in nanoseconds: its measured whole."""
    return round(profile.whole_ms * NS)


def _chain(profile: Profile, chain: Chain) -> ChainProfile:
    cp = profile.chains.get(chain.producer)
    if cp is None:
        raise RankcutError(f"the profile has no channel widths for chain {chain.producer}; rerun rankcut profile "
                           "(it times every chain of a model torch.fx can trace)")
    if (cp.consumer, cp.channels) != (chain.consumer, chain.channels) or \
            set(cp.modules) - {PATH} != {chain.producer, chain.consumer}:
        raise RankcutError(f"the profile's chain {chain.producer} ({cp.consumer}, {cp.channels} channels) is not the "
                           f"checkpoint's ({chain.consumer}, {chain.channels} channels)")
    return cp


def chain_price(profile: Profile, chains: list[Chain]) -> Price:
    """A ``channel_budget.Price`` in nanoseconds: a resized module's time at the chains' widths, scaled.

    A producer also carries its chain's path (the operations up to the consumer, carried BatchNorms and
    functional ones alike), so carried modules cost nothing of their own. The scale is the profile's, or
    lower where the chains' parts with their paths would add up to more than the whole.
    """
    timed = {c.producer: _chain(profile, c) for c in chains}

    def unscaled(name: str, touch: Touch, widths: dict[str, int]) -> float:
        if touch.channelwise:
            return 0.0
        ms, ratio, path = None, 1.0, 0.0
        for chain in (touch.out_of, touch.in_of):
            if chain is not None:
                cp = timed[chain]
                ms = cp.modules[name].ms if ms is None else ms
                ratio *= cp.modules[name].ratio_at(widths[chain], cp.channels)
        if touch.out_of is not None and PATH in timed[touch.out_of].modules:
            cp = timed[touch.out_of]
            path = cp.modules[PATH].ms * cp.modules[PATH].ratio_at(widths[touch.out_of], cp.channels)
        return ms * ratio + path

    full = {c.producer: c.channels for c in chains}
    now = sum(unscaled(n, t, full) for n, t in touches(chains).items())
    scale = min(profile.scale, profile.whole_ms / now) if now > 0 else profile.scale
    return lambda name, touch, widths: round(unscaled(name, touch, widths) * scale * NS)


def chain_latency(profile: Profile, chains: list[Chain], widths: dict[str, int]) -> int:
    """The whole model with ``chains`` at ``widths`` (missing: as they are) in the profile's cost model, in ns."""
    price = chain_price(profile, chains)
    return latency_total(profile) - priced_total(chains, price, {}) + priced_total(chains, price, widths)
