"""Channel selection with least-squares reconstruction, folded into the consumer (``--structure channels``).

For a chain producer P -> channel-wise ops -> consumer Q (``rankcut.model.graph``), let ``a`` be Q's input
(C channels, after the non-linearity), with mean ``mu`` and covariance ``Sigma`` over all positions. Keeping
channels S, the dropped ones are predicted from the kept ones by least squares, ``a ~ A a_S + c`` with
``A = Sigma[:, S] (Sigma[S, S] + lambda I)^-1`` on the dropped rows (the identity on S) and ``c = mu - A mu_S``.
``A`` and ``c`` fold into Q: ``W_t' = W_t A`` for every kernel tap t, bias ``+= sum_t W_t c``.

The loss is the squared error of Q's output. With ``W_t`` (O x C) Q's weight at tap t and
``M = sum_t W_t^T W_t`` (the per-input-channel weight energy), the error of one output position is
``sum_t W_t e(p + t)`` where ``e = a - A a_S - c`` has mean 0 and covariance ``R Sigma R^T`` (R = I - A on
the kept columns). Its expected square, per sample:

    loss = positions * tr(M R Sigma R^T)        (positions: Q's output positions per sample)

This is exact for a Linear consumer and a 1x1 conv (stride 1, no padding): every output reads one input
position through one tap. For a kxk conv, and a Linear after a flatten (a "kernel" covering the whole map,
with moments pooled over its positions), it keeps only the same-tap terms ``E[e(p+t)^T W_t^T W_t e(p+t)]``
and drops the cross terms between taps, i.e. it is exact when the errors at different positions are
uncorrelated; the tests measure how far the real error is from it. A zero-padded conv also sees 0, not c,
outside the image, so the folded bias is slightly off at the borders (measured in the tests as well).

Selection is greedy forward selection on this loss, which with ``M`` fixed is a pivoted Cholesky
factorisation of Sigma whose pivot is the channel that removes the most ``M``-weighted residual variance
(``r_j^T M r_j / R_jj`` for the Schur complement R). Greedy because the best subset is NP-hard in general,
and because its selections are nested: one O(C^3) pass gives the order and the predicted loss at every k,
which is what a budget needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from rankcut.errors import RankcutError
from rankcut.model.edits import ChannelPrune, get_module
from rankcut.model.graph import Chain
from rankcut.stats.moments import Moments

PIVOT_FLOOR = 1e-12  # residual variance below this fraction of the largest is already explained
RIDGE = 1e-8         # damping of Sigma[S, S], relative to its mean diagonal


@dataclass(frozen=True)
class Selection:
    """Channels in the order greedy selection keeps them, and the predicted loss of keeping the first k."""

    order: torch.Tensor  # C channel indices
    loss: torch.Tensor   # C + 1 values, loss[k] for k = 0..C (loss[C] == 0), squared output error per sample

    def kept(self, k: int) -> list[int]:
        """The first k channels of the order, sorted (the pruned layers keep the original channel order)."""
        return sorted(int(c) for c in self.order[:k])


def consumer_taps(consumer: nn.Module, block: int) -> torch.Tensor:
    """The consumer's weight as (outputs, channels, taps) in float64: kernel taps, or the block after a flatten."""
    w = consumer.weight.detach().double()
    channels = w.shape[1] // block if isinstance(consumer, nn.Linear) else w.shape[1]
    return w.reshape(w.shape[0], channels, -1)


def weight_energy(taps: torch.Tensor) -> torch.Tensor:
    """``M = sum_t W_t^T W_t`` (C x C)."""
    return torch.einsum("oct,odt->cd", taps, taps)


def greedy_order(sigma: torch.Tensor, energy: torch.Tensor, positions: int) -> Selection:
    """Greedy forward selection minimising ``tr(M (Sigma - Sigma[:,S] Sigma[S,S]^-1 Sigma[S,:]))``.

    Runs as a pivoted Cholesky on the Schur complement R, updating ``q_i = (R M R)_ii`` by rank-one
    algebra so each step costs O(C^2).
    """
    r = sigma.double().clone()
    m = energy.double()
    c = len(r)
    q = ((r @ m) * r).sum(1)
    trace = (m * r).sum().item()
    floor = PIVOT_FLOOR * max(r.diagonal().max().item(), 1e-300)
    chosen = torch.zeros(c, dtype=torch.bool)
    order, loss = [], [trace]
    for _ in range(c):
        d = r.diagonal()
        live = ~chosen & (d > floor)
        if not live.any():
            break
        gain = torch.where(live, q / d.clamp_min(floor), torch.full_like(q, -torch.inf))
        j = int(gain.argmax())
        col = r[:, j].clone()
        dj = col[j].item()
        v = m @ col
        w = r @ v
        s = (col @ v).item()
        q = q - 2 * col * w / dj + col * col * s / dj ** 2
        r -= torch.outer(col, col) / dj
        trace -= s / dj
        chosen[j] = True
        order.append(j)
        loss.append(max(trace, 0.0))
    rest = [i for i in range(c) if not chosen[i]]  # already explained by the chosen ones
    order += rest
    loss += [max(trace, 0.0)] * len(rest)
    loss[-1] = 0.0
    return Selection(torch.tensor(order, dtype=torch.long), torch.tensor(loss, dtype=torch.float64) * positions)


def reconstruction(moments: Moments, kept: list[int], ridge: float = RIDGE) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, c)``: every channel's least-squares estimate ``A a_S + c`` from the kept ones (A is C x k)."""
    sigma, mu = moments.covariance.double(), moments.mean.double()
    idx = torch.tensor(kept, dtype=torch.long)
    s_s = sigma[idx][:, idx]
    damp = ridge * max(s_s.diagonal().mean().item(), 1e-300)
    solve = torch.linalg.solve(s_s + damp * torch.eye(len(idx), dtype=torch.float64), sigma[idx])  # k x C
    a = solve.T.clone()
    a[idx] = torch.eye(len(idx), dtype=torch.float64)  # kept channels pass through exactly
    return a, mu - a @ mu[idx]


def reconstruction_loss(moments: Moments, energy: torch.Tensor, a: torch.Tensor, kept: list[int],
                        positions: int) -> float:
    """``positions * tr(M R Sigma R^T)`` for the estimate ``A a_S + c``: the predicted loss of these A, c."""
    sigma = moments.covariance.double()
    r = torch.eye(len(sigma), dtype=torch.float64)
    r[:, kept] -= a
    return positions * torch.trace(energy.double() @ r @ sigma @ r.T).item()


def folded_consumer(consumer: nn.Module, block: int, a: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of the consumer that reads only the kept channels and sees ``A a_S + c`` for all."""
    taps = consumer_taps(consumer, block)
    new = torch.einsum("oct,ck->okt", taps, a)
    bias = consumer.bias.detach().double() if consumer.bias is not None else torch.zeros(taps.shape[0], dtype=torch.float64)
    bias = bias + torch.einsum("oct,c->o", taps, c)
    if isinstance(consumer, nn.Linear):
        return new.reshape(taps.shape[0], -1), bias
    return new.reshape(taps.shape[0], a.shape[1], *consumer.weight.shape[2:]), bias


def loss_energy(model: nn.Module, chain: Chain, metric: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """``(M, positions)`` of the predicted loss ``positions * tr(M R Sigma R^T)``.

    Without ``metric``: ``M = sum_t W_t^T W_t`` and the loss is the consumer's squared output error per sample.
    With ``metric`` G (the consumer's output-gradient second moment, summed over its positions per sample, as
    fisher's): ``M = sum_t W_t^T G W_t`` and positions 1, so the loss is the expected squared first-order change
    of the network's loss, fisher's currency (``compress.auto``).
    """
    taps = consumer_taps(get_module(model, chain.consumer), chain.block)
    if metric is None:
        return weight_energy(taps), chain.positions
    return torch.einsum("oct,op,pdt->cd", taps, metric.double(), taps), 1


def select(model: nn.Module, chain: Chain, moments: Moments, metric: torch.Tensor | None = None) -> Selection:
    """The greedy order and predicted losses for one chain, from its consumer-input moments (``loss_energy``)."""
    if moments.mean.shape[0] != chain.channels:
        raise RankcutError(f"statistics for {chain.producer} have {moments.mean.shape[0]} channels, the model "
                           f"{chain.channels}")
    return greedy_order(moments.covariance, *loss_energy(model, chain, metric))


def prune_chain(model: nn.Module, chain: Chain, moments: Moments, kept: list[int], ridge: float = RIDGE,
                metric: torch.Tensor | None = None) -> tuple[ChannelPrune, float]:
    """Keep channels ``kept`` of ``chain`` in place, refitting its consumer; the edit and its predicted loss."""
    consumer = get_module(model, chain.consumer)
    a, c = reconstruction(moments, kept, ridge)
    energy, positions = loss_energy(model, chain, metric)
    loss = reconstruction_loss(moments, energy, a, kept, positions)
    weight, bias = folded_consumer(consumer, chain.block, a, c)
    if not (torch.isfinite(weight).all() and torch.isfinite(bias).all()):
        raise RankcutError(f"the reconstruction for {chain.producer} -> {chain.consumer} is not finite (its "
                           "statistics are too extreme); nothing written")
    edit = ChannelPrune(chain.producer, chain.consumer, chain.carried, chain.block, tuple(kept))
    edit.apply(model)
    new = get_module(model, chain.consumer)
    with torch.no_grad():
        new.weight.copy_(weight.to(new.weight.dtype))
        new.bias.copy_(bias.to(new.bias.dtype))
    return edit, loss
