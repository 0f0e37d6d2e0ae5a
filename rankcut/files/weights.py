"""Reading weights a user brings (``.pth`` without unpickling code, or ``.safetensors``) into a model."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from rankcut.errors import RankcutError

_PREFIXES = ("module.", "_orig_mod.")
_NESTED = ("state_dict", "model", "model_state_dict")


def _read(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise RankcutError(f"{path} is not a readable safetensors file ({(str(e).splitlines() or [''])[0][:160]})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for bad or unsafe pickles
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise RankcutError(f"cannot read weights from {path} with weights_only=True: {first}") from None
    for key in _NESTED:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise RankcutError(f"{path} does not hold a state dict of tensors")
    return obj


def _strip(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


def mismatches(expected: dict[str, tuple], found: dict[str, tuple]) -> str | None:
    """The first few differences between two ``name -> shape`` maps, as one phrase (None if equal)."""
    problems = [f"missing {k}" for k in expected if k not in found]
    problems += [f"unexpected {k}" for k in found if k not in expected]
    problems += [f"{k}: file {found[k]} vs model {expected[k]}" for k in expected
                 if k in found and found[k] != expected[k]]
    if not problems:
        return None
    more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
    return "; ".join(problems[:3]) + more


def load_weights(model: nn.Module, path: str) -> None:
    """Load a state dict from ``path`` into ``model`` strictly; list the first mismatches if it does not fit.

    BatchNorm ``num_batches_tracked`` counters may be absent (weights saved before PyTorch 0.4.1, e.g.
    torchvision's original ImageNet files): they only matter for momentum-free training and are kept as
    the model has them.
    """
    state = {_strip(k): v for k, v in _read(Path(path)).items()}
    own = model.state_dict()
    for key, value in own.items():
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = value
    problem = mismatches({k: tuple(v.shape) for k, v in own.items()},
                         {k: tuple(v.shape) for k, v in state.items()})
    if problem:
        raise RankcutError(f"weights in {path} do not fit the architecture: {problem}")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:  # names and shapes fit; a dtype that cannot be copied (e.g. complex)
        raise RankcutError(f"weights in {path} do not load: {str(e).strip().splitlines()[-1][:200]}") from None
