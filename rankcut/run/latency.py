"""Real inference latency that holds on a shared machine: models timed in alternating short rounds.

Load from other processes comes and goes in bursts of seconds. Timing model A for ten seconds and then
model B for ten seconds lets a burst land on one of them only, so their separate medians can disagree by
a factor of two from run to run. Here the models take turns in short rounds (about 0.05 s of passes per
model, the order reversed every round, so a slow drift hits all alike), and the figure of merit is the median
of each model's pass time *divided by the reference model's pass in the same round*: load that lasts longer
than a round slows both sides of a ratio, and a short burst spoils single pairs in either direction, which the
median ignores. The interval is the 25-75% quantiles of those pairwise ratios (the spread between pairs, not a
confidence interval of the median).

Within its turn a model runs its passes back to back, as a deployed model runs, after one untimed pass when
its pass is short: the first pass after another model finds the caches full of that model's weights. Taking turns
pass by pass instead timed every pass cold, which is not what a deployer sees and made a ratio depend on how
many models were compared (mnist-cnn in onnxruntime at batch 1, one thread: 0.51 beside the original alone,
0.60 among seven models, whose weights together overflow the 32 MiB L3; back to back: 0.501 and 0.504).

On a machine with more runnable threads than cores, though, nearly every pass is preempted, and wall
times carry the scheduler's noise whatever the statistic. So each pass is also timed in the process's CPU
time, and ``cpu_ratio`` (the median of the pairwise CPU-time ratios) is reported beside the wall-time
``ratio``: with one thread it is the work each model does, immune to preemption (measured: a layer applied
twice vs once, 4 runnable processes per core: wall ratios 1.5-3.4, CPU ratios 1.94-1.99). With several
threads CPU time also counts threads waiting for work, so there the wall ratio is the figure.

What made the same comparison disagree between processes was none of these but glibc's allocator, which
maps every large activation afresh and unmaps it on free, so each pass paid page faults in an amount fixed by
the process's allocation history; timing is done with freed memory kept in the process (``kept_heap``).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from rankcut.errors import RankcutError
from rankcut.model.contract import InputContract
from rankcut.model.forward import eval_mode

Runner = Callable[[], object]  # one forward pass, synchronised: when it returns, the work is done


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def pinned_threads(threads: int | None) -> Iterator[int]:
    """Run the block with ``torch.set_num_threads(threads)`` (None: as now); yield the count in force."""
    before = torch.get_num_threads()
    if threads is not None and threads < 1:
        raise RankcutError(f"--threads must be at least 1, got {threads}")
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc mallopt parameters, and their defaults below
_GLIBC_DEFAULTS = {_M_TRIM_THRESHOLD: 128 * 1024, _M_MMAP_MAX: 65536}


@functools.cache
def _mallopt():
    """glibc's ``mallopt`` from the process's own symbols (None where the C library has none)."""
    return getattr(ctypes.CDLL(None), "mallopt", None)


@contextlib.contextmanager
def kept_heap() -> Iterator[bool]:
    """Time with glibc keeping freed memory in the process; yield whether it could (not glibc: False).

    By default glibc serves a large buffer (an activation of a few MB) from pages it maps for it and unmaps on
    free, so every pass faults them in again, and how often depends on the process's allocation history.
    Measured on the 2-core development machine (the example's two models, batch 64, one thread, five fresh
    processes of 6 s each): 2.2-2.8 s of each process's 8 s CPU time was the kernel's, the original's pass
    took 37-48 ms and the ratio read 0.90-1.02; with freed memory kept (no mapping per buffer, no trimming)
    0.3 s, 24-27 ms, and 0.80-0.84. The figure of merit is the models' work, not the allocator's page faults
    (which a deployment removes with jemalloc or tcmalloc). Afterwards the two settings return to glibc's
    defaults; the dynamic mmap threshold stays off for the rest of the process.
    """
    mallopt = _mallopt()
    if mallopt is None:
        yield False
        return
    kept = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    try:
        yield kept
    finally:
        for param, value in _GLIBC_DEFAULTS.items():
            mallopt(param, value)


def torch_runner(model: nn.Module, x: torch.Tensor) -> Runner:
    """A runner for one torch module on a fixed input (eval mode and ``inference_mode`` are the caller's)."""
    device = x.device

    def run():
        out = model(x)
        _sync(device)
        return out

    return run


def random_input(contract: InputContract, batch_size: int, device: torch.device) -> torch.Tensor:
    """The seeded batch every latency figure is measured on (the values do not matter, the shape does)."""
    return torch.randn(batch_size, *contract.shape, generator=torch.Generator().manual_seed(0)).to(device)


@dataclass
class Timing:
    """One model's figures from an alternating comparison; ratios are to the reference's passes in each round."""

    batch_ms: float      # median time of one pass
    spread_ms: tuple[float, float]  # 25% and 75% quantiles of the pass times
    ratio: float         # median of (this model's pass / the reference's pass beside it); 1.0 for the reference
    ratio_q25: float
    ratio_q75: float
    cpu_ratio: float     # the same median over pairs, of the process's CPU time per pass
    rounds: int
    passes: int          # passes per round
    repeats: int         # passes timed in all
    warmup: int          # untimed passes of each model first
    heap_kept: bool      # freed memory kept in the process while timing (``kept_heap``)


@dataclass
class Passes:
    """Raw pass times from one alternating comparison: index j of every model's list is one pairing."""

    wall: list[list[float]]
    cpu: list[list[float]]
    rounds: int
    passes: int  # passes per round
    warmup: int  # untimed passes of each model before the rounds
    heap_kept: bool  # timed with freed memory kept in the process (``kept_heap``)


# A pass this long refills every cache many times over (32 MiB of L3 from memory: a few ms), so the one
# cold pass after another model's turn costs it under 1%; a shorter one gets an untimed pass first.
SETTLE_BELOW_SECONDS = 0.5


def _warm_up(runners: list[Runner], warmup: int) -> list[float]:
    """Run every runner ``warmup`` times; each one's median pass time."""
    typical = []
    for run in runners:
        warm = []
        for _ in range(warmup):
            start = time.perf_counter()
            run()
            warm.append(time.perf_counter() - start)
        typical.append(statistics.median(warm))
    return typical


def _rounds(runners: list[Runner], passes: int, settle: list[bool], rounds: int | None, max_seconds: float,
            min_rounds: int, pass_by_pass: bool) -> tuple[list[list[float]], list[list[float]], int]:
    """The timed rounds: per model its wall and CPU time per pass, and the rounds done.

    In a round each model runs its ``passes`` back to back, after one untimed pass where ``settle`` says so
    (the first pass after another model's turn runs with the caches full of that model's weights); the
    models' order is reversed every round. ``pass_by_pass``: the models take turns every pass instead (the
    order reversed every pass, nothing untimed), so each pass runs with the caches full of the others'.
    """
    times: list[list[float]] = [[] for _ in runners]
    cpu: list[list[float]] = [[] for _ in runners]

    def timed(i: int) -> None:
        start, start_cpu = time.perf_counter(), time.process_time()
        runners[i]()
        times[i].append(time.perf_counter() - start)
        cpu[i].append(time.process_time() - start_cpu)

    def order(k: int):
        return range(len(runners)) if k % 2 == 0 else reversed(range(len(runners)))

    began = time.perf_counter()
    done = 0
    while rounds is None or done < rounds:
        if pass_by_pass:
            for p in range(passes):
                for i in order(done + p):
                    timed(i)
        else:
            for i in order(done):
                if settle[i]:
                    runners[i]()
                for _ in range(passes):
                    timed(i)
        done += 1
        if done >= min_rounds and time.perf_counter() - began > max_seconds:
            break
    return times, cpu, done


def _alternate(runners: list[Runner], *, rounds: int | None = None, warmup: int = 3, round_seconds: float = 0.05,
              max_passes: int = 20, max_seconds: float = 20.0, min_rounds: int = 10,
              pass_by_pass: bool = False) -> Passes:
    """Time ``runners`` in alternating rounds and return every pass's wall and CPU time.

    Each runner first runs ``warmup`` times; the slowest model's median warm-up sets the passes per round so
    that one model's share of a round lasts about ``round_seconds`` (1 to ``max_passes``). Within a round each
    model runs its passes back to back (``_rounds``), after an untimed one if its passes are shorter than
    ``SETTLE_BELOW_SECONDS``, so pass j of every model in a round was timed within a round's length of pass j
    of the others. Rounds go on until ``max_seconds`` have been spent (at least ``min_rounds``; at most
    ``rounds`` if given). ``pass_by_pass`` times every pass with the caches full of the other models' data, as
    a layer runs inside its network (``run.profile`` times parts so).
    """
    warmup = max(warmup, 1)  # the first pass also sets the passes per round
    with kept_heap() as kept:
        typical = _warm_up(runners, warmup)
        passes = int(min(max_passes, max(1, round_seconds // max(max(typical), 1e-9))))
        settle = [t < SETTLE_BELOW_SECONDS for t in typical]
        times, cpu, done = _rounds(runners, passes, settle, rounds, max_seconds, min_rounds, pass_by_pass)
    return Passes(times, cpu, done, passes, warmup, kept)


def _summarize(passes: Passes, reference: int = 0) -> list[Timing]:
    """Per model the median pass time and the median ratio to ``reference`` over the pairs of passes.

    The ratio is the median of the pairs' ratios, the interval their 25-75% quantiles: a burst of load mostly
    spoils single pairs, in either direction, which the median ignores.
    """
    ref, ref_cpu = np.array(passes.wall[reference]), np.maximum(np.array(passes.cpu[reference]), 1e-9)
    out = []
    for t, c in zip(passes.wall, passes.cpu):
        t = np.array(t)
        ratios = t / ref
        out.append(Timing(float(np.median(t) * 1e3), (float(np.quantile(t, 0.25) * 1e3), float(np.quantile(t, 0.75) * 1e3)),
                          float(np.median(ratios)), float(np.quantile(ratios, 0.25)), float(np.quantile(ratios, 0.75)),
                          float(np.median(np.maximum(np.array(c), 1e-9) / ref_cpu)), passes.rounds, passes.passes,
                          len(t), passes.warmup, passes.heap_kept))
    return out


def compare(runners: list[Runner], *, reference: int = 0, **options) -> list[Timing]:
    """Time ``runners`` in alternating rounds (``_alternate``); per model the median time and the median ratio
    to ``reference`` (``_summarize``).

    The duration matters more than the count of rounds: on a shared machine the neighbours' use of the caches
    and memory changes over tens of seconds and slows a memory-bound model more than a compute-bound one (the
    example's two models: 0.80 quiet, 0.83-0.87 beside two busy processes), and a longer comparison takes the
    median over more of those states. Measured with the heap kept, one thread, the example's models at batch
    64 on the 2-core development machine: five 4-second comparisons in fresh processes 0.788-0.826 beside one
    busy process; three 20-second ones within 0.006-0.008 of each other on a quiet machine.
    """
    if not 0 <= reference < len(runners):
        raise RankcutError("nothing to time" if not runners else f"reference index {reference} out of range")
    return _summarize(_alternate(runners, **options), reference)


RUNTIMES = ("torch", "onnxruntime")


@contextlib.contextmanager
def runners(models: list[nn.Module], contract: InputContract, batch_size: int, device: torch.device, *,
            runtime: str = "torch", threads: int | None = None) -> Iterator[tuple[list[Runner], int]]:
    """One runner per model on the seeded batch, in ``runtime``, and the thread count in force while they run.

    torch runs the modules (eval mode, ``inference_mode``); onnxruntime runs each model exported to ONNX, the
    graphs kept in memory and checked against torch (relative 1e-4) before they are timed.
    """
    if runtime not in RUNTIMES:
        raise RankcutError(f"unknown runtime {runtime!r}; choose from {', '.join(RUNTIMES)}")
    if runtime == "onnxruntime" and device.type != "cpu":
        raise RankcutError("--runtime onnxruntime runs on the CPU here; pass --device cpu")
    x = random_input(contract, batch_size, device)
    with pinned_threads(threads) as used:
        if runtime == "torch":
            with eval_mode(*models), torch.inference_mode():
                yield [torch_runner(m, x) for m in models], used
            return
        from rankcut.run import export  # onnx is an optional extra

        built = []
        for m in models:
            sess = export.session(export.onnx_bytes(m, x), used)
            check = export.agreement(m, sess, contract.shape, (batch_size,))
            if not check.max_rel <= 1e-4:
                raise RankcutError(f"the ONNX graph of a model disagrees with torch (relative {check.max_rel:.3g})")
            built.append(export.ort_runner(sess, x))
        yield built, used


def compare_runtime(models: list[nn.Module], contract: InputContract, batch_size: int, device: torch.device, *,
                    runtime: str = "torch", reference: int = 0, threads: int | None = None, **options) -> list[dict]:
    """``compare`` for models at ``batch_size`` in ``runtime``: one dict per model, in the JSON shape ``eval``
    prints (``figures``)."""
    with runners(models, contract, batch_size, device, runtime=runtime, threads=threads) as (run, used):
        timings = compare(run, reference=reference, **options)
    return [figures(t, batch_size, used, runtime) for t in timings]


def compare_models(models: list[nn.Module], contract: InputContract, batch_size: int, device: torch.device, *,
                   reference: int = 0, threads: int | None = None, **options) -> list[dict]:
    """``compare_runtime`` in torch (the benches' shorthand)."""
    return compare_runtime(models, contract, batch_size, device, reference=reference, threads=threads, **options)


def figures(t: Timing, batch_size: int, threads: int, runtime: str) -> dict:
    """A ``Timing`` as the dict ``eval --latency`` reports."""
    return {"batch_size": batch_size, "batch_ms": t.batch_ms, "image_ms": t.batch_ms / batch_size,
            "repeats": t.repeats, "ratio": t.ratio, "ratio_q25": t.ratio_q25, "ratio_q75": t.ratio_q75,
            "cpu_ratio": t.cpu_ratio,
            "spread_ms": list(t.spread_ms), "rounds": t.rounds, "passes": t.passes, "warmup": t.warmup,
            "heap_kept": t.heap_kept, "threads": threads, "runtime": runtime}

