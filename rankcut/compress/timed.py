"""Measured latency as a budget currency: a profile's times turned into per-option costs, and slower pairs refused.

With a profile (``rankcut profile``), a layer is never replaced by a pair that the profile measured as no
faster than the layer itself, in any mode. A ``--latency F`` budget is solved by the same allocator as
``--macs``: each option costs the profile's time for it (linear between the ranks timed) in integer
nanoseconds, and the layers outside the choice cost the whole model's measured time minus the targets'.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from torch import nn

from rankcut.compress.budget import LayerOptions
from rankcut.errors import RankcutError
from rankcut.files.profilefile import PAIR, LayerProfile, Profile
from rankcut.model.edits import get_module
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
        ns = np.array([round(times[i] * NS) for i in keep], dtype=np.int64)
        return replace(o, ranks=o.ranks[keep], macs=o.macs[keep], params=o.params[keep], loss=o.loss[keep], latency=ns)

    return adjust


def latency_total(profile: Profile, names: list[str]) -> int:
    """The profile's own cost model of the whole model now, in nanoseconds: the measured whole, or the targets'
    sum when that is larger (so the rest never costs less than nothing)."""
    targets = sum(_layer(profile, n).ms for n in names)
    return round(max(profile.whole_ms, targets) * NS)
