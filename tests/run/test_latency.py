"""Latency: the median of enough timed runs."""

from __future__ import annotations

import pytest
import torch

from rankcut.run.latency import measure_latency


def test_measure_latency_takes_the_median_of_enough_runs():
    from rankcut.model.archs import MNIST

    figures = measure_latency(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10)), MNIST, 3,
                              torch.device("cpu"), min_seconds=0.01)
    assert 5 <= figures["repeats"] <= 200 and figures["image_ms"] == pytest.approx(figures["batch_ms"] / 3)
