"""How many directions each layer keeps."""

from __future__ import annotations

import math

from torch import nn

from .edits import get_module
from .errors import RankcutError
from .layers import current_rank


def ranks_from_keep(model: nn.Module, names: list[str], keep: float) -> dict[str, int]:
    """``round(keep x current rank)`` for every named layer, at least 1 (``--keep``)."""
    if not 0 < keep <= 1:
        raise RankcutError(f"--keep must be in (0, 1], got {keep}")
    return {n: max(1, math.floor(keep * current_rank(get_module(model, n)) + 0.5)) for n in names}
