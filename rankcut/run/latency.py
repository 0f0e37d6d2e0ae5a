"""Real inference latency: warm-up, device synchronisation, ``torch.inference_mode``, the median of many runs."""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from rankcut.model.contract import InputContract
from rankcut.model.forward import eval_mode


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_latency(model: nn.Module, contract: InputContract, batch_size: int, device: torch.device, *,
                    warmup: int = 3, min_repeats: int = 5, min_seconds: float = 1.0,
                    max_repeats: int = 200) -> dict:
    """Median wall time of one forward pass at ``batch_size``: per batch and per image, in milliseconds.

    Runs are repeated until both ``min_repeats`` runs and ``min_seconds`` of timing have passed (at most
    ``max_repeats``), so fast models get many samples and slow ones still finish.
    """
    x = torch.randn(batch_size, *contract.shape, generator=torch.Generator().manual_seed(0)).to(device)
    times: list[float] = []
    with eval_mode(model), torch.inference_mode():
        for _ in range(warmup):
            model(x)
        _sync(device)
        spent = 0.0
        while len(times) < max_repeats and (len(times) < min_repeats or spent < min_seconds):
            start = time.perf_counter()
            model(x)
            _sync(device)
            times.append(time.perf_counter() - start)
            spent += times[-1]
    batch_ms = statistics.median(times) * 1e3
    return {"batch_size": batch_size, "batch_ms": batch_ms, "image_ms": batch_ms / batch_size, "repeats": len(times)}


def alternating_latencies(models: list[nn.Module], contract: InputContract, batch_size: int, device: torch.device,
                          rounds: int = 5) -> list[dict]:
    """Each model's latency; several are timed in alternating rounds, so load from other processes hits all alike."""
    rounds = rounds if len(models) > 1 else 1
    runs: list[list[dict]] = [[] for _ in models]
    for i in range(rounds):
        for model, out in zip(models, runs):
            out.append(measure_latency(model, contract, batch_size, device, warmup=3 if i == 0 else 1,
                                       min_repeats=5 if rounds == 1 else 1, min_seconds=1.0 / rounds))
    figures = []
    for out in runs:
        batch_ms = statistics.median(r["batch_ms"] for r in out)
        figures.append({"batch_size": batch_size, "batch_ms": batch_ms, "image_ms": batch_ms / batch_size,
                        "repeats": sum(r["repeats"] for r in out)})
    return figures
