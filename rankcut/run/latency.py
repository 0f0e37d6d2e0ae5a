"""Real inference latency that holds on a shared machine: models timed in alternating short rounds.

Load from other processes comes and goes in bursts of seconds. Timing model A for ten seconds and then
model B for ten seconds lets a burst land on one of them only, so their separate medians can disagree by
a factor of two from run to run. Here the models take turns pass by pass (the order reversed every pass, so
a slow drift hits all alike), in short rounds, and the figure of merit is the median of each model's pass
time *divided by the reference model's pass next to it*: load that lasts longer than two passes slows both
sides of a ratio, and a short burst spoils single pairs in either direction, which the median ignores. The
interval is the 25-75% quantiles of those pairwise ratios (the spread between pairs, not a confidence
interval of the median).

On a machine with more runnable threads than cores, though, nearly every pass is preempted, and wall
times carry the scheduler's noise whatever the statistic. So each pass is also timed in the process's CPU
time, and ``cpu_ratio`` (the median of the pairwise CPU-time ratios) is reported beside the wall-time
``ratio``: with one thread it is the work each model does, immune to preemption (measured: a layer applied
twice vs once, 4 runnable processes per core: wall ratios 1.5-3.4, CPU ratios 1.94-1.99). With several
threads CPU time also counts threads waiting for work, so there the wall ratio is the figure.
"""

from __future__ import annotations

import contextlib
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
    """One model's figures from an alternating comparison; ratios are to the reference model, pass by pass."""

    batch_ms: float      # median time of one pass
    spread_ms: tuple[float, float]  # 25% and 75% quantiles of the pass times
    ratio: float         # median of (this model's pass / the reference's pass beside it); 1.0 for the reference
    ratio_q25: float
    ratio_q75: float
    cpu_ratio: float     # the same median over pairs, of the process's CPU time per pass
    rounds: int
    passes: int          # passes per round
    repeats: int         # passes timed in all


def compare(runners: list[Runner], *, reference: int = 0, rounds: int | None = None, warmup: int = 3,
            round_seconds: float = 0.05, max_passes: int = 20, max_seconds: float = 20.0,
            min_rounds: int = 10) -> list[Timing]:
    """Time ``runners`` in alternating rounds; per model the median time and the median ratio to ``reference``.

    Each runner first runs ``warmup`` times; the slowest model's median warm-up sets the passes per round so
    that one model's share of a round lasts about ``round_seconds`` (1 to ``max_passes``). Within a round the
    models take turns pass by pass, in an order reversed every pass, and each pass of a model is paired with
    the reference's pass next to it: the ratio is the median of those pairs' ratios, the interval their 25-75%
    quantiles. A burst of load mostly spoils single pairs, in either direction, which the median ignores.

    Rounds go on until ``max_seconds`` have been spent (at least ``min_rounds``; at most ``rounds`` if given).
    The duration matters more than the count: on a shared machine the neighbours' use of the caches and memory
    changes over tens of seconds and slows a memory-bound model more than a compute-bound one, so the ratio
    itself moves between such states (measured: 0.81-1.05 between 4-second comparisons of the same two models
    on an idle 2-core machine, 0.97-1.00 between 25-second ones). A longer comparison takes the median over
    more of those states.
    """
    if not runners:
        raise RankcutError("nothing to time")
    if not 0 <= reference < len(runners):
        raise RankcutError(f"reference index {reference} out of range")
    typical = 0.0
    for run in runners:
        warm = []
        for _ in range(max(warmup, 1)):
            start = time.perf_counter()
            run()
            warm.append(time.perf_counter() - start)
        typical = max(typical, statistics.median(warm))
    passes = int(min(max_passes, max(1, round_seconds // max(typical, 1e-9))))
    times: list[list[float]] = [[] for _ in runners]  # per pass, the same index in every list is one pairing
    cpu: list[list[float]] = [[] for _ in runners]
    began = time.perf_counter()
    done = 0
    while rounds is None or done < rounds:
        for p in range(passes):
            order = range(len(runners)) if (done + p) % 2 == 0 else reversed(range(len(runners)))
            for i in order:
                start, start_cpu = time.perf_counter(), time.process_time()
                runners[i]()
                times[i].append(time.perf_counter() - start)
                cpu[i].append(time.process_time() - start_cpu)
        done += 1
        if done >= min_rounds and time.perf_counter() - began > max_seconds:
            break
    ref, ref_cpu = np.array(times[reference]), np.maximum(np.array(cpu[reference]), 1e-9)
    out = []
    for t, c in zip(times, cpu):
        t = np.array(t)
        ratios = t / ref
        out.append(Timing(float(np.median(t) * 1e3), (float(np.quantile(t, 0.25) * 1e3), float(np.quantile(t, 0.75) * 1e3)),
                          float(np.median(ratios)), float(np.quantile(ratios, 0.25)), float(np.quantile(ratios, 0.75)),
                          float(np.median(np.maximum(np.array(c), 1e-9) / ref_cpu)), done, passes, len(t)))
    return out


def compare_models(models: list[nn.Module], contract: InputContract, batch_size: int, device: torch.device, *,
                   reference: int = 0, threads: int | None = None, **options) -> list[dict]:
    """``compare`` for torch models at ``batch_size``: one dict per model, in the JSON shape ``eval`` prints.

    Keys: batch_size, batch_ms, image_ms, repeats (as before), and ratio, ratio_q25, ratio_q75, cpu_ratio
    (to the reference, pass by pass), spread_ms, rounds, passes, threads, runtime.
    """
    x = random_input(contract, batch_size, device)
    with eval_mode(*models), pinned_threads(threads) as used, torch.inference_mode():
        timings = compare([torch_runner(m, x) for m in models], reference=reference, **options)
    return [figures(t, batch_size, used, "torch") for t in timings]


RUNTIMES = ("torch", "onnxruntime")


def compare_runtime(models: list[nn.Module], contract: InputContract, batch_size: int, device: torch.device, *,
                    runtime: str = "torch", reference: int = 0, threads: int | None = None, **options) -> list[dict]:
    """``compare_models`` in ``runtime``: torch as is, or each model exported to ONNX and run by ONNX Runtime.

    Exported graphs are kept in memory and checked against torch (relative 1e-4) before they are timed.
    """
    if runtime == "torch":
        return compare_models(models, contract, batch_size, device, reference=reference, threads=threads, **options)
    if runtime != "onnxruntime":
        raise RankcutError(f"unknown runtime {runtime!r}; choose from {', '.join(RUNTIMES)}")
    from rankcut.run import export  # onnx is an optional extra

    if device.type != "cpu":
        raise RankcutError("--runtime onnxruntime runs on the CPU here; pass --device cpu")
    x = random_input(contract, batch_size, device)
    with pinned_threads(threads) as used:
        runners = []
        for m in models:
            sess = export.session(export.onnx_bytes(m, x), used)
            check = export.agreement(m, sess, contract.shape, (batch_size,))
            if not check.max_rel <= 1e-4:
                raise RankcutError(f"the ONNX graph of a model disagrees with torch (relative {check.max_rel:.3g})")
            runners.append(export.ort_runner(sess, x))
        timings = compare(runners, reference=reference, **options)
    return [figures(t, batch_size, used, runtime) for t in timings]


def figures(t: Timing, batch_size: int, threads: int, runtime: str) -> dict:
    """A ``Timing`` as the dict ``eval --latency`` reports."""
    return {"batch_size": batch_size, "batch_ms": t.batch_ms, "image_ms": t.batch_ms / batch_size,
            "repeats": t.repeats, "ratio": t.ratio, "ratio_q25": t.ratio_q25, "ratio_q75": t.ratio_q75,
            "cpu_ratio": t.cpu_ratio,
            "spread_ms": list(t.spread_ms), "rounds": t.rounds, "passes": t.passes, "threads": threads,
            "runtime": runtime}

