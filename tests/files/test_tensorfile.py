"""Data as tensors in a file (x, optionally y): what is refused, with one line saying why."""

from __future__ import annotations

import numpy as np
import pytest

from rankcut.errors import RankcutError
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
