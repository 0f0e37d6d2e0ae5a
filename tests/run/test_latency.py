"""``rankcut.run.latency``: alternating rounds, the median of per-round ratios, pinned threads, the kept heap;
``eval --latency``."""

from __future__ import annotations

import resource
import sys

import pytest
import torch
from cli_helpers import rankcut
from torch import nn

from rankcut.errors import RankcutError
from rankcut.model.archs import InputContract
from rankcut.run.latency import compare, compare_models, kept_heap, pinned_threads


class Repeat(nn.Module):
    """The same layer applied ``times`` times: exactly ``times`` x the work of one application."""

    def __init__(self, layer: nn.Module, times: int):
        super().__init__()
        self.layer, self.times = layer, times

    def forward(self, x):
        for _ in range(self.times):
            x = self.layer(x)
        return x


def test_twice_the_work_measures_about_twice_the_time():
    torch.manual_seed(0)
    layer = nn.Sequential(nn.Flatten(), nn.Linear(1024, 1024))  # 1M MACs per image: dominates call overhead
    once, twice = Repeat(layer, 1), Repeat(layer, 2)
    contract = InputContract((1, 32, 32), (0.0,), (1.0,))
    torch.set_num_threads(2)  # not the 1 it measures with (conftest pins 1), so restoring is checked
    before = torch.get_num_threads()
    once_fig, twice_fig = compare_models([once, twice], contract, 64, torch.device("cpu"), threads=1, rounds=20,
                                         min_rounds=20)
    assert torch.get_num_threads() == before, "the thread count must be restored"
    assert once_fig["threads"] == twice_fig["threads"] == 1
    assert once_fig["ratio"] == 1.0 and once_fig["ratio_q25"] == once_fig["ratio_q75"] == 1.0
    # CPU time with one thread is immune to preemption: a tight band. Wall time on a machine shared with
    # other jobs is not (measured 1.5-3.4 with 4 runnable processes per core): a wide one.
    assert 1.7 < twice_fig["cpu_ratio"] < 2.3, f"twice the work measured {twice_fig['cpu_ratio']:.3f}x the CPU time"
    assert 1.3 < twice_fig["ratio"] < 4, f"twice the work measured {twice_fig['ratio']:.3f}x the wall time"
    assert twice_fig["ratio_q25"] <= twice_fig["ratio"] <= twice_fig["ratio_q75"]
    assert twice_fig["rounds"] == 20 and twice_fig["repeats"] == 20 * twice_fig["passes"]


def test_each_ratio_is_taken_within_its_round(monkeypatch):
    """A burst of load that slows one round slows both sides of that round's ratio, so the ratio holds.

    A fake clock: model b costs 3 units, a 1; every third round the machine is 10x slower. Separate medians
    of each model would mix busy and quiet rounds; the per-round ratio is 3 in every round.
    """
    import rankcut.run.latency as latency

    clock = {"t": 0.0, "calls": 0}

    def runner(cost):
        def run():
            round_ = max(clock["calls"] - 2, 0) // 2  # 2 warm-up calls, then 2 calls (1 pass each) per round
            clock["t"] += cost * (10.0 if round_ % 3 == 0 else 1.0)
            clock["calls"] += 1
        return run

    monkeypatch.setattr(latency.time, "perf_counter", lambda: clock["t"])
    timings = compare([runner(1.0), runner(3.0)], warmup=1, round_seconds=0.0, rounds=9, min_rounds=9)
    assert timings[1].passes == 1 and timings[1].rounds == 9
    assert timings[1].ratio == timings[1].ratio_q25 == timings[1].ratio_q75 == 3.0
    assert timings[1].spread_ms[1] > 2 * timings[1].spread_ms[0], "the fake load should show in the times"


@pytest.mark.parametrize("others", [0, 5])
def test_each_model_is_timed_warm_however_many_are_compared(monkeypatch, others):
    """A pass right after another model's pass pays for refilling the caches (4 ms on a fake clock); a deployed
    model runs pass after pass and never does. So the ratio is the warm one, 2, beside one model or six."""
    import rankcut.run.latency as latency

    clock = {"t": 0.0, "last": None}

    def runner(name, ms):
        def run():
            clock["t"] += (ms + (4.0 if clock["last"] != name else 0.0)) / 1e3
            clock["last"] = name
        return run

    monkeypatch.setattr(latency.time, "perf_counter", lambda: clock["t"])
    models = [runner("a", 1.0), runner("b", 2.0), *(runner(f"other{i}", 1.5) for i in range(others))]
    timings = compare(models, warmup=3, round_seconds=0.004, rounds=6, min_rounds=6)  # 2 passes: the median
    assert timings[1].passes == 2 and timings[1].repeats == 12                         # needs both warm
    assert timings[1].ratio == pytest.approx(2.0) and timings[1].ratio_q25 == pytest.approx(2.0)
    assert timings[1].batch_ms == pytest.approx(2.0)
    # pass by pass (how the profile times a layer, as it runs inside its network): b, never at the end of an
    # order that reverses every pass, is timed cold every time
    cold = compare(models, warmup=3, round_seconds=0.004, rounds=6, min_rounds=6, pass_by_pass=True)[1]
    assert cold.batch_ms == pytest.approx(6.0 if others else 4.0)  # beside a alone, every other pass follows b


def test_a_comparison_lasts_its_seconds_not_a_count_of_rounds():
    """The ratio moves with the neighbours' load over tens of seconds, so the comparison is timed, not counted:
    with passes of 2 ms it goes on well past any fixed number of rounds until its seconds are spent."""
    import time

    def run():
        time.sleep(0.002)

    began = time.perf_counter()
    timings = compare([run, run], warmup=1, round_seconds=0.0, max_seconds=0.6)
    assert time.perf_counter() - began >= 0.6
    assert timings[1].passes == 1 and timings[1].rounds > 60, f"stopped after {timings[1].rounds} rounds"


def test_pinned_threads_refuses_zero():
    with pytest.raises(RankcutError, match="--threads"):
        with pinned_threads(0):
            pass


def test_eval_latency_reports_interval_threads_rounds_and_warmup(mnist_ckpt):
    result = rankcut("eval", mnist_ckpt, "--data", "synthetic:8", "--reference", mnist_ckpt, "--latency", "-b", "2",
                     "--threads", "1", "--seconds", "0.5", "--device", "cpu", "--json")["results"][0]
    lat, ref = result["latency"], result["reference"]["latency"]
    assert lat["threads"] == ref["threads"] == 1 and lat["runtime"] == "torch" and lat["heap_kept"] is True
    assert ref["ratio"] == 1.0 and result["ratios"]["latency"] == lat["ratio"]
    assert lat["ratio_q25"] <= lat["ratio"] <= lat["ratio_q75"] and lat["rounds"] >= 10 and lat["warmup"] == 3
    assert 0.5 < lat["ratio"] < 2, f"the same model twice measured {lat['ratio']:.3f}x"


def test_eval_latency_in_onnxruntime(mnist_ckpt, tmp_path):
    small = tmp_path / "small.safetensors"
    rankcut("project", mnist_ckpt, "--method", "svd", "--keep", "0.25", "-o", small)
    result = rankcut("eval", small, "--data", "synthetic:8", "--reference", mnist_ckpt, "--latency", "-b", "8",
                     "--threads", "1", "--runtime", "onnxruntime", "--seconds", "1", "--device", "cpu", "--json")["results"][0]
    lat = result["latency"]
    assert lat["runtime"] == "onnxruntime" and lat["threads"] == 1 and result["reference"]["latency"]["ratio"] == 1.0
    # rank 0.25 of conv2 and fc1 leaves 0.32x the MACs; in CPU time the graph must be clearly cheaper
    assert lat["cpu_ratio"] < 0.9, f"the projected graph took {lat['cpu_ratio']:.3f}x the CPU time"




def _faults_of_a_buffer(times: int, mb: int = 64) -> int:
    """Page faults (minor) of filling a fresh tensor of ``mb`` MB, the last of ``times`` in a row (the first
    ones also move the allocator into its steady state, as warm-up passes do)."""
    for _ in range(times):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.empty(mb << 18).fill_(1.0)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    return faults


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_timing_keeps_freed_memory_so_passes_do_not_fault_pages_in_again():
    faults = _faults_of_a_buffer(3)
    with kept_heap() as kept:
        assert kept, "glibc's mallopt should be found on Linux"
        kept_faults = _faults_of_a_buffer(6)
    assert faults > 1000 and kept_faults < 100, (faults, kept_faults)
    # afterwards the allocator returns buffers again (one larger than any memory the heap kept meanwhile)
    assert _faults_of_a_buffer(3, mb=256) > 1000
