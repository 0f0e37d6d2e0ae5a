"""Reading .npz files without pickles and within a size cap."""

from __future__ import annotations

import os

import numpy as np
import pytest

from rankcut.errors import RankcutError
from rankcut.files.safenpz import _default_cap, read_npz


def test_npz_size_cap_follows_the_machine(monkeypatch):
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    monkeypatch.delenv("RANKCUT_MAX_NPZ_BYTES", raising=False)
    assert _default_cap() == min(16 << 30, ram // 2)
    monkeypatch.setenv("RANKCUT_MAX_NPZ_BYTES", "1234")
    assert _default_cap() == 1234


def test_arrays_come_back_and_the_cap_is_on_their_decompressed_size(tmp_path):
    a, b = np.arange(12.0).reshape(3, 4), np.array(["x"])
    np.savez_compressed(tmp_path / "ok.npz", a=a, b=b)
    arrays = read_npz(tmp_path / "ok.npz")
    assert sorted(arrays) == ["a", "b"] and np.array_equal(arrays["a"], a) and arrays["b"][0] == "x"
    np.savez_compressed(tmp_path / "zeros.npz", z=np.zeros(1 << 20, np.uint8))  # 1 MiB that compresses to ~1 KiB
    assert (tmp_path / "zeros.npz").stat().st_size < 1 << 14
    with pytest.raises(RankcutError, match="would decompress to more than 0 MiB"):
        read_npz(tmp_path / "zeros.npz", max_total_bytes=1 << 19)
    assert read_npz(tmp_path / "zeros.npz", max_total_bytes=2 << 20)["z"].sum() == 0


def test_object_arrays_are_refused_before_unpickling(tmp_path):
    np.savez(tmp_path / "objects.npz", a=np.arange(3), o=np.array([{"a": 1}, None], dtype=object))
    with pytest.raises(RankcutError, match="holds Python objects in o.npy; refusing to unpickle"):
        read_npz(tmp_path / "objects.npz")
