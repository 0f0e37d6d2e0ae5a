"""Real inference latency: warm-up, device synchronisation, ``torch.inference_mode``, the median of many runs."""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from rankcut.model.archs import InputContract


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
    was_training = model.training
    model.eval()
    x = torch.randn(batch_size, *contract.shape, generator=torch.Generator().manual_seed(0)).to(device)
    times: list[float] = []
    try:
        with torch.inference_mode():
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
    finally:
        model.train(was_training)
    batch_ms = statistics.median(times) * 1e3
    return {"batch_size": batch_size, "batch_ms": batch_ms, "image_ms": batch_ms / batch_size, "repeats": len(times)}
