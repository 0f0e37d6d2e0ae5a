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
    assert rank_for(torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64), 0.8) == 2  # a total under 1 is variance too


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


def _all_reduced(parts: list[Moments], monkeypatch) -> list[Moments]:
    """Each part's ``all_reduce`` as process ``r`` of ``len(parts)``, run in threads over a fake collective."""
    monkeypatch.setattr(moments_module, "all_reduce_sum_", _fake_collective(len(parts)))
    got = [None] * len(parts)
    threads = [threading.Thread(target=lambda r=r: got.__setitem__(r, parts[r].all_reduce(
        Context(r, len(parts), torch.device("cpu"))))) for r in range(len(parts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    return got


def test_all_reduce_of_shard_moments_equals_the_moments_of_all_the_data(monkeypatch):
    g = torch.Generator().manual_seed(1)
    shards = [torch.randn(n, 3, generator=g, dtype=torch.float64) * (i + 1) + i for i, n in enumerate((5, 17, 1))]
    got = _all_reduced([Moments.of(s) for s in shards], monkeypatch)
    whole = Moments.of(torch.cat(shards))
    for m in got:
        assert m.count == whole.count == 23.0
        torch.testing.assert_close(m.mean, whole.mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(m.m2, whole.m2, rtol=1e-10, atol=1e-10)
    # one observation in all: its mean, whichever process holds it
    lone = [Moments.of(torch.tensor([[2.0, -1.0, 5.0]], dtype=torch.float64)), Moments.empty(3)]
    got = _all_reduced(lone, monkeypatch)
    assert [m.count for m in got] == [1.0, 1.0]
    for m in got:
        torch.testing.assert_close(m.mean, lone[0].mean, rtol=0, atol=0)
    # counts past float32's exact range (2^24): the total is summed in float64
    big = [Moments(2.0 ** 24 + 1, torch.ones(3, dtype=torch.float64), torch.zeros(3, 3, dtype=torch.float64)),
           Moments(2.0, torch.ones(3, dtype=torch.float64), torch.zeros(3, 3, dtype=torch.float64))]
    got = _all_reduced(big, monkeypatch)
    assert got[0].count == got[1].count == 2.0 ** 24 + 3
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
    acc = GradientSums(mean, last=True) if last else GradientSums(mean)  # conv layout by default
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
    assert all(a.dtype == torch.float64 for a in arrays.values())
    torch.testing.assert_close(arrays["hessian"], hessian, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(arrays["grad_m2"], grad_m2, rtol=1e-12, atol=1e-12)
    # every array is summed over the processes (two identical ones here)
    twice = lambda tensors, ctx: [t.mul_(2) for t in tensors]  # noqa: E731
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(moments_module, "all_reduce_sum_", twice)
        summed = acc.arrays(Context(0, 2, torch.device("cpu")))
    assert summed["grad_count"].item() == 6.0
    torch.testing.assert_close(summed["hessian"], 2 * hessian, rtol=1e-12, atol=1e-12)
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
    with pytest.raises(ValueError, match="^no observations$"):
        ShiftedSums().moments()
    for bad in (torch.nan, torch.inf):
        acc = ShiftedSums()
        acc.add(x[:2].float())
        acc.add(torch.full((1, 3, 4), bad))
        assert not acc.finite()


def test_shifted_sums_are_exact_in_float64_when_the_mean_drifts_and_channels_differ():
    """The shift is the first batch's per-channel mean; later batches drift far from it (float64 sums keep it
    exact), channel offsets differ by thousands, and samples with exactly two positions take the general path."""
    g = torch.Generator().manual_seed(4)
    offsets = torch.tensor([1000.0, -3000.0, 10.0], dtype=torch.float64)[None, :, None]
    batches = [torch.randn(40, 3, 2, generator=g, dtype=torch.float64) + offsets * (1 + i) for i in range(3)]
    acc = ShiftedSums()
    for b in batches:
        acc.add(b)
    rows = torch.cat(batches).transpose(1, 2).reshape(-1, 3)
    got = acc.moments()
    assert got.count == 240.0
    torch.testing.assert_close(got.mean, rows.mean(0), rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(got.covariance, torch.cov(rows.T, correction=0), rtol=1e-9, atol=1e-6)
    # float32 outputs, channels far apart: a per-channel shift keeps the float32 scatter accurate
    acc32 = ShiftedSums()
    acc32.add(batches[0].float())
    rows0 = batches[0].float().double().transpose(1, 2).reshape(-1, 3)
    torch.testing.assert_close(acc32.moments().covariance, torch.cov(rows0.T, correction=0), rtol=1e-4, atol=1e-4)


def test_shifted_sums_report_an_overflowing_scatter():
    acc = ShiftedSums()
    acc.add(torch.zeros(2, 3, 4))
    acc.add(torch.full((1, 3, 4), 1e30))  # the first moment stays finite, the float32 scatter overflows
    assert torch.isfinite(acc.first).all() and not acc.finite()
