"""The latency profile contract: chain widths round-trip, malformed chain entries are one line."""

from __future__ import annotations

import json

import pytest

from rankcut.errors import RankcutError
from rankcut.files.profilefile import (PATH, Candidate, ChainProfile, LayerProfile, ModuleWidths, Profile, load_profile,
                                       save_profile)


def _widths(side: str, ms: float, sizes: list[int], channels: int) -> ModuleWidths:
    ratios = [0.1 + 0.9 * k / channels for k in sizes]
    return ModuleWidths(side, ms, tuple(Candidate(k, ms * r, r, r * 0.9, r * 1.1) for k, r in zip(sizes, ratios)))


def _profile() -> Profile:
    pair = (Candidate(1, 0.5, 0.25, 0.2, 0.3), Candidate(8, 1.5, 0.75, 0.7, 0.8))
    chains = {"conv1": ChainProfile("conv2", 32, {"conv1": _widths("out", 1.0, [1, 16], 32),
                                                  PATH: _widths("out", 0.5, [1, 16], 32),
                                                  "conv2": _widths("in", 6.0, [1, 16], 32)})}
    return Profile("ab" * 32, "cpu", 1, "torch", 4, "2.x", "host", 14.0, (13.0, 15.0), 0.5,
                   {"conv1": LayerProfile(2.0, (1.9, 2.1), {"pair": pair})}, chains)


def test_a_profile_with_chain_widths_round_trips(tmp_path):
    path = tmp_path / "p.json"
    save_profile(_profile(), path)
    assert load_profile(path) == _profile()
    module = load_profile(path).chains["conv1"].modules["conv2"]
    assert module.ratio_at(32, 32) == 1.0 and module.ratio_at(24, 32) == pytest.approx(0.1 + 0.9 * 24 / 32)


def test_a_profile_without_chains_loads_with_none(tmp_path):
    path = tmp_path / "p.json"
    save_profile(_profile(), path)
    d = json.loads(path.read_text())
    del d["chains"]
    path.write_text(json.dumps(d))
    assert load_profile(path).chains == {}


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.update(channels=0), "channels must be a positive integer"),
    (lambda c: c["modules"]["conv2"].update(side="up"), "needs a side"),
    (lambda c: c["modules"]["conv1"]["candidates"].append(
        {"size": 32, "ms": 1, "ratio": 1, "q25": 1, "q75": 1}), "widths must be below"),
    (lambda c: c["modules"]["conv1"]["candidates"].reverse(), "sizes must be positive and increasing"),
    (lambda c: c.pop("consumer"), "is not a chain profile"),
])
def test_malformed_chain_entries_are_refused_with_one_line(tmp_path, edit, message):
    path = tmp_path / "p.json"
    save_profile(_profile(), path)
    d = json.loads(path.read_text())
    edit(d["chains"]["conv1"])
    path.write_text(json.dumps(d))
    with pytest.raises(RankcutError, match=message) as e:
        load_profile(path)
    assert "\n" not in str(e.value)
