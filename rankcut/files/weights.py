"""Reading weights a user brings (``.pth`` without unpickling code, or ``.safetensors``) into a model."""

from __future__ import annotations

import re
import zipfile
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from rankcut.errors import RankcutError

_PREFIXES = ("module.", "_orig_mod.")
_NESTED = ("state_dict", "model", "model_state_dict")


def versioned(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with the per-module ``version`` metadata that ``state_dict()`` attaches and a file of plain
    tensors loses: some modules refuse to load without it (torchvision's MNASNet raises ``version should be
    set to 1 or 2``). The model's own versions are right, since the tensors were saved from this code."""
    out = OrderedDict(state)  # a plain dict takes no attributes
    out._metadata = {name: {"version": m._version} for name, m in model.named_modules()}  # as state_dict() does
    return out


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
        raise RankcutError(_unreadable(path, str(e)) or f"cannot read weights from {path}: {type(e).__name__}") from None
    for key in _NESTED:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise RankcutError(f"{path} does not hold a state dict of tensors")
    return obj


_PICKLED_CLASS = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _unreadable(path: Path, message: str) -> str | None:
    """One line for a file ``torch.load(weights_only=True)`` refused; a pickled object gets advice."""
    found = _PICKLED_CLASS.search(message)
    if found:
        return (f"{path} holds a pickled {found.group(1)} object (a whole model saved with torch.save(model)?), "
                "not a state dict; rankcut reads weights with weights_only=True and will not unpickle it, since "
                "unpickling runs code from the file. "
                "Where the model is defined, save its weights with torch.save(model.state_dict(), 'weights.pth') "
                "and pass that file")
    first = next((line.strip() for line in _ANSI.sub("", message).splitlines() if line.strip()), "")
    return f"cannot read weights from {path} with weights_only=True: {first[:200]}" if first else None


def is_torch_save_file(path: str | Path) -> bool:
    """Whether ``path`` is a ``torch.save`` file: a zip archive holding ``data.pkl``, or a raw pickle."""
    try:
        with open(path, "rb") as f:
            head = f.read(2)
        if head == b"PK":
            with zipfile.ZipFile(path) as archive:
                return any(name.endswith("/data.pkl") for name in archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False
    return head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")  # pickle protocols 2-5


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
        model.load_state_dict(versioned(model, state), strict=True)
    except RuntimeError as e:  # names and shapes fit; a dtype that cannot be copied (e.g. complex)
        raise RankcutError(f"weights in {path} do not load: {str(e).strip().splitlines()[-1][:200]}") from None
