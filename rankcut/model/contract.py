"""The input contract: what one sample looks like and how it is normalised (recorded in every checkpoint).

It lives in the model layer because architectures declare their default inputs with it; checkpoints,
data loading and every forward pass at the recorded size read it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from rankcut.errors import RankcutError

# One sample of 2**28 values is a 1 GiB float32 tensor: far beyond any CNN input, small enough that a
# hostile or mistyped contract cannot make ``info`` or ``eval`` allocate without bound.
MAX_INPUT_ELEMENTS = 1 << 28


@dataclass(frozen=True)
class InputContract:
    """What the model expects: one sample's shape and the per-channel normalisation."""

    shape: tuple[int, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self):
        if len(self.shape) != 3 or any(int(s) < 1 for s in self.shape):
            raise RankcutError(f"input shape must be C,H,W with positive sizes, got {self.shape}")
        if math.prod(self.shape) > MAX_INPUT_ELEMENTS:
            raise RankcutError(f"input shape {self.shape} is implausibly large (over {MAX_INPUT_ELEMENTS:,} values)")
        if len(self.mean) != self.shape[0] or len(self.std) != self.shape[0]:
            raise RankcutError(
                f"mean and std need one value per channel ({self.shape[0]}), "
                f"got {len(self.mean)} and {len(self.std)}"
            )
        if not all(math.isfinite(v) for v in self.mean + self.std):
            raise RankcutError("mean and std values must be finite numbers")
        if any(s <= 0 for s in self.std):
            raise RankcutError("std values must be positive")

    def to_dict(self) -> dict:
        return {"shape": list(self.shape), "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: dict) -> "InputContract":
        try:
            return cls(tuple(int(s) for s in d["shape"]), tuple(float(m) for m in d["mean"]),
                       tuple(float(s) for s in d["std"]))
        except (KeyError, TypeError, ValueError, OverflowError) as e:
            raise RankcutError(f"malformed input contract: {type(e).__name__}: {e}") from None
