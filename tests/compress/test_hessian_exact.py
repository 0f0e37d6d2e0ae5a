"""The hessian method's statistic and predicted loss against exact second derivatives, on a model small enough.

Exact references, no probes: the output loss's Hessian in logit space and the Jacobian of the logits at the
layer's output (``torch.autograd.functional``), and the second derivative of the loss along the edit that
projects directions out. The probe statistics are made exact by replacing the random probes with a weighted
quadrature of their distribution (every logit for mse, every class weighted by its probability for kl), which
has the same second moment; ``draw_probes``' second moment is checked on its own.

What the method claims (DESIGN §4, README "The methods"): with ``S = sum_p g_p (z_p - mu)^T`` per sample,
``H = E[sym(S)^2]``, and for a unit v the exact second-order change of the loss from projecting v out is
``E[(v' S v)^2] <= v' H v`` (Cauchy-Schwarz), with equality when the layer has one channel. For several
directions the predicted loss adds their single-direction bounds; the joint change is at most that sum times
the number of directions (it may exceed the sum itself).
"""

from __future__ import annotations

import pytest
import torch
from builders import CPU
from torch import nn
from torch.autograd.functional import hessian, jacobian

import rankcut.stats.collect as collect_module
from rankcut.compress.methods import METHODS
from rankcut.model.targets import Target
from rankcut.stats.collect import (
    collect_gradients,
    collect_moments,
    draw_probes,
    sample_generator,
)
from rankcut.stats.moments import LayerStats

CLASSES = 5


def output_loss(loss: str, before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """Per-sample loss of logits ``after`` against the original ``before``: the losses --grad names."""
    if loss == "mse":
        return (after - before).pow(2).mean(-1)
    p = before.softmax(-1)
    return (p * (before.log_softmax(-1) - after.log_softmax(-1))).sum(-1)


def tiny(channels: int):
    """A conv target (2 -> ``channels``, 3x3 on 5x5: 9 positions) with a non-linear head, in float64."""
    torch.manual_seed(channels)
    model = nn.Sequential(nn.Conv2d(2, channels, 3), nn.Tanh(), nn.Flatten(), nn.Linear(channels * 9, CLASSES))
    x = torch.randn(6, 2, 5, 5, generator=torch.Generator().manual_seed(1))
    return model.double().eval(), x.double()


def quadrature(loss: str):
    """``draw_probes`` replaced by atom j on its j-th call per batch: the atoms' mean of r r^T is E[r r^T]."""
    calls = {"n": 0}

    def atom(logits, _loss, _generators):
        j = calls["n"] % CLASSES
        calls["n"] += 1
        onehot = torch.zeros_like(logits.detach())
        onehot[:, j] = 1.0
        if loss == "mse":  # r ~ N(0, I / n): E[r r^T] = I / n = mean over j of e_j e_j^T
            return onehot
        p = logits.detach().softmax(-1)  # y ~ p: E[r r^T] = sum_j p_j r_j r_j^T = mean over j of (n p_j) r_j r_j^T
        return (CLASSES * p[:, j:j + 1]).sqrt() * (onehot - p) / 2 ** 0.5

    return atom


def exact_pieces(model, x, loss):
    """Per sample: A[a] = sym(sum_p J_a,p (z_p - mu)^T) for every logit a, and M = half the loss's Hessian in
    logit space, so that sym(S) = sum_a r_a A[a] and E[r r^T] = M."""
    conv, head = model[0], model[1:]
    with torch.no_grad():
        z = conv(x)
        logits = head(z)
    mu = z.mean((0, 2, 3))
    pieces = []
    for zn, ln in zip(z, logits):
        jac = jacobian(lambda zz: head(zz[None])[0], zn).flatten(2)  # (logits, C, positions)
        s = jac @ (zn.flatten(1) - mu[:, None]).T
        m = hessian(lambda l, ln=ln: output_loss(loss, ln, l), ln) / 2
        pieces.append(((s + s.transpose(1, 2)) / 2, m))
    return z, mu, pieces


def exact_change(model, x, loss, z, mu, directions: torch.Tensor) -> float:
    """Half the second derivative in t of the mean loss when the layer's output becomes z - t P (z - mu)."""
    head = model[1:]
    proj = directions @ directions.T
    before = head(z).detach()

    def mean_loss(t):
        return output_loss(loss, before, head(z - t * torch.einsum("ij,njhw->nihw", proj, z - mu.view(1, -1, 1, 1)))).mean()

    return (hessian(mean_loss, torch.zeros((), dtype=torch.float64)) / 2).item()


def pipeline_stats(model, x, loss, monkeypatch) -> LayerStats:
    """The statistics ``rankcut stats --grad`` gathers, with the probes' quadrature in place of random draws."""
    target = Target("0")
    moments = collect_moments(model, [target], [(x, None)], CPU)
    monkeypatch.setattr(collect_module, "draw_probes", quadrature(loss))
    grads = collect_gradients(model, [target], [(x[:4], None), (x[4:], None)], moments, loss, CLASSES, 0, CPU)
    return LayerStats(target, moments["0"], grads["0"])


@pytest.mark.parametrize("loss", ["kl", "mse"])
def test_hessian_statistic_and_predicted_loss_against_exact_second_derivatives(loss, monkeypatch):
    model, x = tiny(4)
    stats = pipeline_stats(model, x, loss, monkeypatch)
    z, mu, pieces = exact_pieces(model, x, loss)
    torch.testing.assert_close(stats.moments.mean, mu, rtol=1e-12, atol=1e-14)
    want = sum(torch.einsum("ab,aij,bjk->ik", m, a, a) for a, m in pieces) / len(pieces)
    h = stats.grad["hessian"] / stats.grad["grad_count"]
    torch.testing.assert_close(h, want, rtol=1e-9, atol=1e-14)  # H = E[sym(S)^2]

    g = torch.Generator().manual_seed(2)
    for _ in range(5):
        v = torch.randn(4, 1, generator=g, dtype=torch.float64)
        v /= v.norm()
        exact = exact_change(model, x, loss, z, mu, v)
        via_s = sum((m * torch.outer(q := (v.T @ a @ v).flatten(), q)).sum() for a, m in pieces) / len(pieces)
        assert exact == pytest.approx(via_s.item(), rel=1e-9)  # r . (output change) = -v' S v, exactly
        assert 0 < exact <= (v.T @ h @ v).item() * (1 + 1e-12)  # the bound v'Hv

    basis = METHODS["hessian"].basis(None, stats)
    for k in range(4):
        discarded = basis.up[:, k:]
        exact = exact_change(model, x, loss, z, mu, discarded)
        assert exact <= (4 - k) * basis.loss[k].item() * (1 + 1e-12), f"rank {k}"
    assert exact <= basis.loss[3].item() * (1 + 1e-12)  # one direction: the bound itself


@pytest.mark.parametrize("loss", ["kl", "mse"])
def test_one_channel_predicted_loss_is_the_exact_second_order_change(loss, monkeypatch):
    """With one channel, sym(S) is a number: the bound is an equality, so loss[0] is the exact change."""
    model, x = tiny(1)
    stats = pipeline_stats(model, x, loss, monkeypatch)
    z, mu, _ = exact_pieces(model, x, loss)
    predicted = METHODS["hessian"].basis(None, stats).loss[0].item()
    exact = exact_change(model, x, loss, z, mu, torch.ones(1, 1, dtype=torch.float64))
    assert exact > 0 and predicted == pytest.approx(exact, rel=1e-9)


@pytest.mark.parametrize("loss", ["kl", "mse"])
def test_probe_second_moment_is_half_the_loss_hessian(loss):
    """What the quadrature above stands in for: ``draw_probes`` has E[r] = 0 and E[r r^T] = M (20,000 draws)."""
    logits = torch.tensor([[1.5, -0.5, 0.2, 0.0, -1.0]], dtype=torch.float64)
    n = 20_000
    r = draw_probes(logits.expand(n, -1), loss, [sample_generator(3, i) for i in range(n)])
    m = hessian(lambda l: output_loss(loss, logits[0], l), logits[0]) / 2
    second = r.T @ r / n
    err = ((second - m).norm() / m.norm()).item()
    assert err < 0.05, f"E[r r^T] is {err:.1%} off half the loss Hessian"
    assert r.mean(0).norm().item() < 0.05 * m.diagonal().sqrt().sum().item()
