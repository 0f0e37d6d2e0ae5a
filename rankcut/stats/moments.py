"""Exact-to-merge sufficient statistics of layer outputs, and what is known about one target layer.

Per layer: the sample count, mean and centred scatter matrix (``m2``) of the output channels, in float64,
merged by the parallel-axis formula, so shards, files and processes combine exactly; and, with gradient
statistics, the probe sums of ``GradientSums``. Only sums are kept, never activations.

Where the channels are is a property of the target's type (``layers.channels_last``): axis 1 for a conv
(``(N, C, *spatial)``), the last axis for a linear (``(N, *positions, C)``, e.g. channels-last blocks and
token sequences).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from rankcut.dist import Context, all_reduce_sum_
from rankcut.errors import RankcutError
from rankcut.model.graph import Chain
from rankcut.model.targets import Target


@dataclass
class Moments:
    """Count, mean and centred scatter of a layer's output channels (float64, exact to merge)."""

    count: float
    mean: torch.Tensor
    m2: torch.Tensor

    @classmethod
    def empty(cls, channels: int) -> "Moments":
        return cls(0.0, torch.zeros(channels, dtype=torch.float64), torch.zeros(channels, channels, dtype=torch.float64))

    @classmethod
    def of(cls, out: torch.Tensor, last: bool = False) -> "Moments":
        """The moments of one layer output, (N, C, *spatial) or with ``last`` (N, *positions, C).

        Every sample and position is an observation.
        """
        acc = ShiftedSums(last)
        acc.add(out)
        return acc.moments()

    def merge(self, other: "Moments") -> "Moments":
        """The moments of the union of both samples (parallel-axis formula)."""
        n = self.count + other.count
        if n == 0:
            return self
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / n)
        m2 = self.m2 + other.m2 + torch.outer(delta, delta) * (self.count * other.count / n)
        return Moments(n, mean, m2)

    @property
    def covariance(self) -> torch.Tensor:
        return self.m2 / max(self.count, 1.0)

    def all_reduce(self, ctx: Context) -> "Moments":
        """Combine the moments of every process's shard into those of all the data."""
        if not ctx.distributed:
            return self
        total = torch.tensor([self.count], dtype=torch.float64)
        weighted = self.mean * self.count
        all_reduce_sum_([total, weighted], ctx)
        mean = weighted / max(total.item(), 1.0)
        d = self.mean - mean
        m2 = self.m2 + torch.outer(d, d) * self.count
        all_reduce_sum_([m2], ctx)
        return Moments(total.item(), mean, m2)


def _observations(out: torch.Tensor, last: bool) -> torch.Tensor:
    """A layer output as (N, C, positions), a view where the layout allows.

    ``last``: channels on the last axis, every other axis after the first a position.
    """
    if last:
        return out.reshape(out.shape[0], -1, out.shape[-1]).transpose(1, 2)
    return out.reshape(out.shape[0], out.shape[1], -1) if out.dim() > 2 else out[:, :, None]


def _rows(out: torch.Tensor, last: bool) -> torch.Tensor:
    """A layer output as (observations, C, 1): for channels-last outputs every leading position is a row."""
    if last:
        return out.reshape(-1, out.shape[-1])[:, :, None]
    return _observations(out, False)


class ShiftedSums:
    """Running sums of a layer's outputs around a fixed per-channel shift (the first batch's mean).

    Subtracting a shift close to the mean before the scatter product keeps float32 products accurate;
    the sums are kept in float64 and turned into exact moments at the end. Per batch this costs one
    subtraction, one batched matrix product and one sum over the activations.
    """

    def __init__(self, last: bool = False):
        self.last = last
        self.shift: torch.Tensor | None = None
        self.count = 0
        self.first: torch.Tensor | None = None
        self.second: torch.Tensor | None = None

    def add(self, out: torch.Tensor) -> None:
        x = _rows(out, self.last)
        if self.shift is None:
            self.shift = x.mean((0, 2), keepdim=True)
            self.first = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
            self.second = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
        centred = x - self.shift
        self.count += x.shape[0] * x.shape[2]
        self.first += centred.sum((0, 2)).double()
        flat = centred[:, :, 0] if x.shape[2] == 1 else None
        scatter = flat.T @ flat if flat is not None else torch.bmm(centred, centred.transpose(1, 2)).sum(0)
        self.second += scatter.double()

    def finite(self) -> bool:
        """False once a NaN or Inf has reached the sums (they propagate, so this catches every one)."""
        return bool(torch.isfinite(self.first).all() and torch.isfinite(self.second).all())

    def moments(self) -> Moments:
        if self.shift is None:
            raise ValueError("no observations")
        n = float(self.count)
        mean = self.shift.reshape(-1).double() + self.first / n
        return Moments(n, mean.cpu(), (self.second - torch.outer(self.first, self.first) / n).cpu())


class GradientSums:
    """Per-layer sums of the probe statistics: ``hessian = sum sym(S)^2`` and ``grad_m2 = sum g g^T``.

    ``S = sum_p g_p (z_p - mu)^T`` per sample, with g_p the probe's gradient at position p of the layer's
    output. For a unit v, ``v' (hessian / grad_count) v`` bounds the expected output loss from projecting v
    out of the layer (to second order); ``grad_m2 / grad_count`` is the output-gradient covariance G.
    """

    def __init__(self, mean: torch.Tensor, last: bool = False):
        c = len(mean)
        self.mean = mean
        self.last = last
        self.count = 0.0
        self.hessian = torch.zeros(c, c, dtype=torch.float64, device=mean.device)
        self.grad_m2 = torch.zeros(c, c, dtype=torch.float64, device=mean.device)

    def add(self, out: torch.Tensor, grad: torch.Tensor) -> None:
        z = _observations(out, self.last) - self.mean.to(out.dtype)[None, :, None]
        g = _observations(grad, self.last)
        s = torch.bmm(g, z.transpose(1, 2))
        sym = (s + s.transpose(1, 2)).flatten(0, 1) / 2  # rows of every sample's sym(S), stacked
        self.hessian += (sym.T @ sym).double()
        self.grad_m2 += torch.bmm(g, g.transpose(1, 2)).sum(0).double()
        self.count += out.shape[0]

    def arrays(self, ctx: Context) -> dict[str, torch.Tensor]:
        count = torch.tensor(self.count, dtype=torch.float64)
        arrays = {"grad_count": count, "hessian": self.hessian.cpu(), "grad_m2": self.grad_m2.cpu()}
        all_reduce_sum_(list(arrays.values()), ctx)
        if not all(torch.isfinite(a).all() for a in arrays.values()):
            raise RankcutError("gradient statistics hold NaN or Inf (the model's outputs or gradients overflowed)")
        return arrays


@dataclass
class LayerStats:
    """Everything measured at one target layer."""

    target: Target
    moments: Moments
    grad: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def channels(self) -> int:
        return self.moments.mean.shape[0]


def rank_for(values: torch.Tensor, fraction: float) -> int:
    """The smallest number of leading (descending) eigenvalues that keeps ``fraction`` of their sum."""
    total = values.sum().item()
    if total <= 0:
        return 1
    kept = torch.cumsum(values, 0) / total
    return int(torch.searchsorted(kept, torch.tensor(fraction - 1e-12, dtype=kept.dtype)).item()) + 1


@dataclass
class ChainStats:
    """The moments of one chain consumer's input (after the non-linearity): what a channel refit needs."""

    chain: Chain
    moments: Moments
