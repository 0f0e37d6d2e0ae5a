"""Data as tensors in a file (x, optionally y): what is refused, with one line saying why."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from rankcut.errors import RankcutError
from rankcut.files.tensorfile import read_xy
from rankcut.model import archs
from rankcut.model.archs import InputContract
from rankcut.run.data import open_data

MNIST = archs.default_input("rankcut:mnist-cnn", {})                           # 1x28x28
RGB32 = InputContract((3, 32, 32), (0.5, 0.4, 0.3), (0.25, 0.2, 0.3))


@pytest.mark.parametrize("arrays, message", [
    ({"images": np.zeros((2, 28, 28), np.uint8)}, "no tensor named x"),
    ({"x": np.zeros((2, 28, 28), np.int32)}, "uint8"),
    ({"x": np.zeros((2, 28, 28), np.uint8), "y": np.zeros(2, np.float32)}, "integer"),
    ({"x": np.zeros((2, 28, 28), np.uint8), "y": np.zeros(3, np.int64)}, "2 samples but y has 3"),
    ({"x": np.zeros((2, 28), np.uint8)}, "N,C,H,W"),
    ({"x": np.zeros((2, 28, 28, 3), np.uint8)}, "N,H,W,C"),
])
def test_bad_tensor_files(tmp_path, arrays, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(RankcutError, match=message):
        open_data(str(path), RGB32 if arrays.get("x", np.zeros(1)).ndim == 4 else MNIST)


def test_npz_with_pickled_objects_is_refused(tmp_path):
    path = tmp_path / "objects.npz"
    np.savez(path, x=np.array([{"a": 1}, None], dtype=object))
    with pytest.raises(RankcutError, match="refusing to unpickle"):
        open_data(str(path), MNIST)


@pytest.mark.parametrize("name", ["junk.npz", "junk.safetensors"])
def test_unreadable_tensor_files(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"\x00not really" * 50)
    with pytest.raises(RankcutError, match="not a readable"):
        open_data(str(path), MNIST)


def test_npz_and_safetensors_hold_the_same_tensors(tmp_path):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 256, (5, 28, 28), generator=g, dtype=torch.uint8), torch.arange(5)
    np.savez(tmp_path / "d.npz", x=x.numpy(), y=y.numpy())
    save_file({"x": x, "y": y}, str(tmp_path / "d.safetensors"))
    np.savez(tmp_path / "unlabelled.npz", x=x.numpy())
    for name in ("d.npz", "d.safetensors"):
        got_x, got_y = read_xy(tmp_path / name)
        assert torch.equal(got_x, x) and torch.equal(got_y, y), name
    assert read_xy(tmp_path / "unlabelled.npz")[1] is None
    np.savez(tmp_path / "bool.npz", x=x.numpy(), y=np.ones(5, bool))
    with pytest.raises(RankcutError, match="y must be a 1-D integer tensor"):
        read_xy(tmp_path / "bool.npz")
