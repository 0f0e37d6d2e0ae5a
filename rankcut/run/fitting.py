"""The one rule for images that do not match a checkpoint's input contract, whatever the data source.

rankcut fits what it can fit without inventing content, and says so: a grayscale image is repeated to
the model's channels, an RGB image becomes grayscale (ITU-R 601 luma, as PIL's "L" mode) for a
1-channel model, and an image of another size is resized to the contract's height and width. Each
data source states once, as a ``RankcutWarning`` (one ``warning:`` line in the CLI), what it will do
to its images; any other channel count is refused. Images that already match are left alone.
"""

from __future__ import annotations

import warnings

import torch

from rankcut.errors import RankcutError, RankcutWarning
from rankcut.model.archs import InputContract

LUMA = (0.299, 0.587, 0.114)


def channel_step(have: int, want: int) -> str | None:
    """What turning ``have`` channels into ``want`` takes, in words (None: nothing); refuse the impossible."""
    if have == want:
        return None
    if have == 1:
        return f"grayscale repeated to {want} channels"
    if (have, want) == (3, 1):
        return "converted to grayscale"
    raise RankcutError(f"the data has {have}-channel images but the model takes {want} channels "
                       "(rankcut converts only grayscale <-> RGB)")


def announce(source: str, native: str, steps: list[str | None], contract: InputContract) -> None:
    """Warn once that ``source``'s images (``native``, e.g. "3x64x64") are fitted to ``contract``, and how."""
    done = [s for s in steps if s]
    if done:
        shape = "x".join(map(str, contract.shape))
        warnings.warn(f"{source}: {native} images are fitted to the model's {shape} input: {', '.join(done)}",
                      RankcutWarning, stacklevel=2)


def announce_tensor(source: str, shape: tuple[int, int, int], contract: InputContract) -> None:
    """``announce`` for images held as C,H,W tensors: channels, then bilinear resizing."""
    c, h, w = shape
    size = None if (h, w) == tuple(contract.shape[1:]) else f"resized to {contract.shape[1]}x{contract.shape[2]}"
    announce(source, f"{c}x{h}x{w}", [channel_step(c, contract.shape[0]), size], contract)


def fit_to_contract(x: torch.Tensor, contract: InputContract) -> torch.Tensor:
    """Fit one image (C,H,W, float in [0,1]) to the contract: channels, size, then normalisation."""
    channels, height, width = contract.shape
    if x.dim() != 3:
        raise RankcutError(f"images must be C,H,W; got shape {tuple(x.shape)}")
    if x.shape[0] != channels:
        channel_step(x.shape[0], channels)  # refuses what cannot be fitted
        if x.shape[0] == 1:
            x = x.expand(channels, -1, -1)
        else:
            x = (torch.tensor(LUMA, dtype=x.dtype).view(3, 1, 1) * x).sum(0, keepdim=True)
    if x.shape[1:] != (height, width):
        x = torch.nn.functional.interpolate(x[None], size=(height, width), mode="bilinear",
                                            antialias=True, align_corners=False)[0]
    mean = torch.tensor(contract.mean, dtype=x.dtype).view(-1, 1, 1)
    std = torch.tensor(contract.std, dtype=x.dtype).view(-1, 1, 1)
    return (x - mean) / std
