"""Data given as tensors in a file: ``x`` (images) and optionally ``y`` (labels), as .npz or .safetensors."""

from __future__ import annotations

from pathlib import Path

import torch

from rankcut.errors import RankcutError
from rankcut.files.safenpz import read_npz


def read_xy(path: Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(x, y)`` from a tensor file; ``y`` is None when the file holds no labels."""
    if path.suffix == ".npz":
        arrays = {k: torch.from_numpy(v) for k, v in read_npz(path).items()}
    else:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            arrays = load_file(str(path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise RankcutError(f"{path} is not a readable safetensors file ({(str(e).splitlines() or [''])[0][:160]})") from None
    if "x" not in arrays:
        raise RankcutError(f"{path} has no tensor named x (found: {', '.join(sorted(arrays)) or 'nothing'})")
    x, y = arrays["x"], arrays.get("y")
    if x.dim() not in (3, 4):
        raise RankcutError(f"{path}: x must be N,C,H,W or N,H,W; got shape {tuple(x.shape)}")
    if not (x.dtype == torch.uint8 or x.is_floating_point()):
        raise RankcutError(f"{path}: x must be uint8 (0..255) or floating point (0..1), not {x.dtype}")
    if y is not None and (y.dim() != 1 or y.is_floating_point() or y.dtype == torch.bool):
        raise RankcutError(f"{path}: y must be a 1-D integer tensor of labels")
    return x, y
