"""Builders shared by several test files: small models and data, files to compare, a live pickle payload."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from rankcut.dist import Context
from rankcut.files.checkpoint import load_with_meta, save
from rankcut.files.fileio import file_digest
from rankcut.files.profilefile import FORMAT
from rankcut.model import archs
from rankcut.model.archs import InputContract
from rankcut.run.data import open_data

CPU = Context(0, 1, torch.device("cpu"))


def batches(contract: InputContract, n: int, batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *contract.shape, generator=g)
    return [(x[i:i + batch], torch.zeros(len(x[i:i + batch]))) for i in range(0, n, batch)]


def assert_same_state(a: torch.nn.Module | dict, b: torch.nn.Module | dict) -> None:
    """Same names, and every tensor bit-identical (dtype, shape and values)."""
    a = a if isinstance(a, dict) else a.state_dict()
    b = b if isinstance(b, dict) else b.state_dict()
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key


def randomize_(model: torch.nn.Module, seed: int = 0, scale: float = 0.1) -> torch.nn.Module:
    """Random values in every parameter and BatchNorm statistic, so eval outputs depend on all of them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=g) * scale)
    return model.eval()


def small_resnet(width: int = 4, **kwargs) -> torch.nn.Module:
    return archs.build("rankcut:small-resnet", {"width": width, **kwargs})


def with_weights(src: Path, dst: Path, **tensors: torch.Tensor) -> Path:
    """A copy of checkpoint ``src`` with some parameters overwritten (finite or not: saving does not check)."""
    model, meta = load_with_meta(src)
    with torch.no_grad():
        for name, value in tensors.items():
            model.get_parameter(name).copy_(value)
    save(model, meta, dst)
    return dst


def digits_npz(path, n: int, labels: bool = True, offset: int = 0):
    """The first ``n`` mnist5k training digits as a tensor file, with or without labels."""
    from rankcut.model.archs import MNIST

    digits = open_data("mnist5k:train", MNIST)
    arrays = {"x": digits.x[offset:offset + n].numpy()}
    if labels:
        arrays["y"] = digits.y[offset:offset + n].numpy()
    np.savez(path, **arrays)
    return path


def logits_of(path, data: str) -> np.ndarray:
    model, meta = load_with_meta(path)
    x = torch.stack([item[0] for item in open_data(data, meta.input)])
    with torch.no_grad():
        return model(x).double().numpy()


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(1, keepdims=True)
    return z - np.log(np.exp(z).sum(1, keepdims=True))


def folder_listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class Payload:
    """Unpickling this would run ``Path(marker).touch()``: a stand-in for arbitrary code in a pickle (.pth, .npz)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def pickled_payload(tmp_path: Path) -> tuple[Path, Path]:
    """A .pth whose unpickling would create the returned marker file."""
    marker = tmp_path / "PWNED"
    weights = tmp_path / "evil.pth"
    torch.save({"conv1.weight": torch.zeros(1), "payload": Payload(str(marker))}, weights)
    assert not marker.exists()
    return weights, marker


def hand_profile(ckpt, tmp_path, conv1_pair_ms=2.0) -> str:
    """A hand-made latency profile of the mnist-cnn checkpoint ``ckpt`` (written in ``tmp_path``), so the
    budget's arithmetic can be checked exactly."""
    def pair(sizes, ms):
        return [{"size": k, "ms": m, "ratio": m, "q25": m, "q75": m} for k, m in zip(sizes, ms)]
    layers = {
        "conv1": {"ms": 1.0, "spread_ms": [1, 1], "candidates": {"pair": pair([1, 7], [conv1_pair_ms, conv1_pair_ms])}},
        "conv2": {"ms": 10.0, "spread_ms": [10, 10], "candidates": {"pair": pair([1, 30, 52], [3.0, 6.0, 12.0])}},
        "fc1": {"ms": 2.0, "spread_ms": [2, 2], "candidates": {"pair": pair([1, 126], [0.1, 2.5])}},
    }
    profile = {"format": FORMAT, "checkpoint": file_digest(ckpt), "device": "cpu", "threads": 1, "runtime": "torch",
               "batch_size": 1, "torch": "x", "host": "h", "whole_ms": 14.0, "whole_spread_ms": [14, 14],
               "others_ms": 0.5, "layers": layers}
    path = tmp_path / "hand.json"
    path.write_text(json.dumps(profile))
    return str(path)


CHAIN_CHANNELS = {"conv1": 32, "conv2": 64, "fc1": 128}
CHAIN_CONSUMER = {"conv1": "conv2", "conv2": "fc1", "fc1": "fc2"}
CHAIN_MODULE_MS = {"conv1": 1.0, "conv2": 6.0, "fc1": 3.0, "fc2": 0.2}
CHAIN_PATH_MS = {"conv1": 0.5, "conv2": 1.5, "fc1": 0.1}


def chain_ratio(k: int, channels: int) -> float:
    """The hand-made profile's time ratio at width k: linear, so interpolating between its widths is exact."""
    return 0.1 + 0.9 * k / channels


def hand_chain_profile(ckpt, tmp_path, whole_ms: float, name: str = "chains.json") -> str:
    """A hand-made profile of mnist-cnn's three chains (conv1 -> conv2 -> fc1 -> fc2), paths included."""
    def widths(side, ms, channels):
        sizes = [1, channels // 2, channels - 1]
        return {"side": side, "ms": ms, "candidates": [
            {"size": k, "ms": ms * chain_ratio(k, channels), "ratio": chain_ratio(k, channels), "q25": 0, "q75": 0} for k in sizes]}
    chains = {p: {"consumer": q, "channels": CHAIN_CHANNELS[p], "modules": {
        p: widths("out", CHAIN_MODULE_MS[p], CHAIN_CHANNELS[p]), "(path)": widths("out", CHAIN_PATH_MS[p], CHAIN_CHANNELS[p]),
        q: widths("in", CHAIN_MODULE_MS[q], CHAIN_CHANNELS[p])}} for p, q in CHAIN_CONSUMER.items()}
    profile = {"format": FORMAT, "checkpoint": file_digest(ckpt), "device": "cpu", "threads": 1, "runtime": "torch",
               "batch_size": 1, "torch": "x", "host": "h", "whole_ms": whole_ms, "whole_spread_ms": [1, 1],
               "others_ms": 0.5, "layers": {}, "chains": chains}
    path = tmp_path / name
    path.write_text(json.dumps(profile))
    return str(path)
