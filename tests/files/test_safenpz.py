"""Reading .npz files without pickles and within a size cap."""

from __future__ import annotations

import os

from rankcut.files.safenpz import _default_cap


def test_npz_size_cap_follows_the_machine(monkeypatch):
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    monkeypatch.delenv("RANKCUT_MAX_NPZ_BYTES", raising=False)
    assert _default_cap() == min(16 << 30, ram // 2)
    monkeypatch.setenv("RANKCUT_MAX_NPZ_BYTES", "1234")
    assert _default_cap() == 1234
