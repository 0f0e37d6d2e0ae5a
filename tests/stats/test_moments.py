"""The accumulators by hand: empty moments, merging with nothing, channels-last layouts, and rank_for."""

from __future__ import annotations

import threading

import pytest
import torch

from rankcut.dist import Context
from rankcut.errors import RankcutError
from rankcut.stats import moments as moments_module
from rankcut.stats.moments import GradientSums, Moments, ShiftedSums, rank_for


def test_empty_moments_are_zero_and_merge_as_nothing():
    empty = Moments.empty(3)
    assert empty.count == 0.0 and empty.mean.dtype == empty.m2.dtype == torch.float64
    torch.testing.assert_close(empty.mean, torch.zeros(3, dtype=torch.float64), rtol=0, atol=0)
    torch.testing.assert_close(empty.m2, torch.zeros(3, 3, dtype=torch.float64), rtol=0, atol=0)
    torch.testing.assert_close(empty.covariance, empty.m2, rtol=0, atol=0)  # no division by a zero count
    one = Moments.of(torch.tensor([[1.0, -2.0, 3.0]], dtype=torch.float64))  # a single observation
    for merged in (empty.merge(one), one.merge(empty)):
        assert merged.count == 1.0
        torch.testing.assert_close(merged.mean, one.mean, rtol=0, atol=0)
        torch.testing.assert_close(merged.m2, torch.zeros(3, 3, dtype=torch.float64), rtol=0, atol=0)
    assert empty.merge(Moments.empty(3)).count == 0.0


def test_channels_last_moments_treat_every_leading_position_as_an_observation():
    x = torch.randn(6, 5, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 + 1
    rows = x.reshape(-1, 4)
    got = Moments.of(x, last=True)
    assert got.count == 30.0
    torch.testing.assert_close(got.mean, rows.mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got.covariance, torch.cov(rows.T, correction=0), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("fraction,rank", [(0.39, 1), (0.4, 1), (0.41, 2), (0.7, 2), (0.71, 3), (0.99, 4), (1.0, 4)])
def test_rank_for_keeps_the_fewest_leading_values_reaching_the_fraction(fraction, rank):
    assert rank_for(torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64), fraction) == rank


def test_rank_for_without_variance_is_one():
    assert rank_for(torch.zeros(5, dtype=torch.float64), 0.9) == 1
    assert rank_for(torch.tensor([0.0, -1e-18], dtype=torch.float64), 0.5) == 1


def _fake_collective(world: int):
    """An ``all_reduce_sum_`` for ``world`` threads standing in for processes: every caller gets the sums."""
    barrier, slots = threading.Barrier(world), {}

    def all_reduce_sum_(tensors, ctx):
        slots[ctx.rank] = [t.clone() for t in tensors]
        barrier.wait()
        sums = [sum(slots[r][i] for r in range(world)) for i in range(len(tensors))]
        barrier.wait()
        for t, s in zip(tensors, sums):
            t.copy_(s)

    return all_reduce_sum_


def test_all_reduce_of_shard_moments_equals_the_moments_of_all_the_data(monkeypatch):
    g = torch.Generator().manual_seed(1)
    shards = [torch.randn(n, 3, generator=g, dtype=torch.float64) * (i + 1) + i for i, n in enumerate((5, 17, 1))]
    monkeypatch.setattr(moments_module, "all_reduce_sum_", _fake_collective(len(shards)))
    got = [None] * len(shards)

    def rank(r):
        got[r] = Moments.of(shards[r]).all_reduce(Context(r, len(shards), torch.device("cpu")))

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(len(shards))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    whole = Moments.of(torch.cat(shards))
    for m in got:
        assert m.count == whole.count == 23.0
        torch.testing.assert_close(m.mean, whole.mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(m.m2, whole.m2, rtol=1e-10, atol=1e-10)
    single = Moments.of(shards[1])
    assert single.all_reduce(Context(0, 1, torch.device("cpu"))) is single  # one process: nothing to combine


@pytest.mark.parametrize("last", [False, True])
def test_gradient_sums_by_hand(last):
    """hessian = sum_n sym(S_n)^2 with S_n = sum_p g_p (z_p - mu)^T; grad_m2 = sum_n sum_p g_p g_p^T; count = N."""
    g = torch.Generator().manual_seed(2)
    out, grad = (torch.randn(3, 4, 2, 5 if last else 2, generator=g, dtype=torch.float64) for _ in range(2))
    if not last:
        out, grad = out.reshape(3, 4, 2, 2), grad.reshape(3, 4, 2, 2)
    mean = torch.randn(5 if last else 4, generator=g, dtype=torch.float64)
    acc = GradientSums(mean, last=last)
    acc.add(out[:2], grad[:2])
    acc.add(out[2:], grad[2:])
    hessian, grad_m2 = 0, 0
    for z_n, g_n in zip(out, grad):
        cols = (lambda t: t.reshape(-1, t.shape[-1]).T) if last else (lambda t: t.reshape(t.shape[0], -1))
        zc, gc = cols(z_n) - mean[:, None], cols(g_n)
        s = gc @ zc.T
        sym = (s + s.T) / 2
        hessian, grad_m2 = hessian + sym @ sym, grad_m2 + gc @ gc.T
    arrays = acc.arrays(Context(0, 1, torch.device("cpu")))
    assert sorted(arrays) == ["grad_count", "grad_m2", "hessian"] and arrays["grad_count"].item() == 3.0
    torch.testing.assert_close(arrays["hessian"], hessian, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(arrays["grad_m2"], grad_m2, rtol=1e-12, atol=1e-12)
    acc.add(out[:1], grad[:1] * torch.inf)
    with pytest.raises(RankcutError, match=r"^gradient statistics hold NaN or Inf \(the model's outputs or gradients "
                                           r"overflowed\)$"):
        acc.arrays(Context(0, 1, torch.device("cpu")))


def test_shifted_sums_are_exact_far_from_zero_and_report_non_finite_values():
    """Float32 outputs with a large offset: the shift keeps the scatter accurate; NaN and Inf are reported."""
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(200, 3, 4, generator=g, dtype=torch.float64) + 1000.0)
    acc = ShiftedSums()
    for part in x.split(50):
        acc.add(part.float())
    assert acc.finite()
    rows = x.float().double().transpose(1, 2).reshape(-1, 3)
    got = acc.moments()
    assert got.count == 800.0
    torch.testing.assert_close(got.mean, rows.mean(0), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(got.covariance, torch.cov(rows.T, correction=0), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="no observations"):
        ShiftedSums().moments()
    for bad in (torch.nan, torch.inf):
        acc = ShiftedSums()
        acc.add(x[:2].float())
        acc.add(torch.full((1, 3, 4), bad))
        assert not acc.finite()
