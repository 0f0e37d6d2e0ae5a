"""One forward pass on a probe input, in eval mode, leaving the model's training flag as it was."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

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


T = TypeVar("T")


def shapes_only(run: Callable[[], T]) -> T:
    """``run()`` on fake tensors (shapes and dtypes only: no memory, whatever the input size), or for real.

    Tensors must be made inside ``run``. A model whose forward needs real values (data-dependent control
    flow, torchvision's RegNet builder) fails on fake tensors; then ``run`` runs again on real ones, so it must
    not keep state from the failed attempt.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: PLC0415 (heavy, and only needed here)

    quiet = logging.getLogger("torch._subclasses.fake_tensor")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)  # a failing fake op logs its traceback; the real pass reports the error
    try:
        with FakeTensorMode(allow_non_fake_inputs=True):
            return run()
    except Exception:  # noqa: BLE001 - any failure of the fake pass: run with real tensors (and real errors)
        pass
    finally:
        quiet.setLevel(level)
    return run()
