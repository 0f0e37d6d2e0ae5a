"""One forward pass on a probe input, in eval mode, leaving the model's training flag as it was."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """Put ``models`` in eval mode for the block and restore each one's training flag after it."""
    modes = [m.training for m in models]
    try:
        for m in models:
            m.eval()
        yield
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)


def device_of(model: nn.Module) -> torch.device:
    """Where the model's parameters live (CPU for a model without any)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def probe(model: nn.Module, shape: tuple[int, ...]):
    """The model's output for one all-zero sample of ``shape``, in eval mode without gradients."""
    with eval_mode(model), torch.no_grad():
        return model(torch.zeros(1, *shape, device=device_of(model)))
