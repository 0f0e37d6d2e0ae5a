"""The latency profile contract: one JSON file of measured times for one checkpoint, machine, runtime and batch.

Top level: ``format`` (``rankcut-profile/1``), ``checkpoint`` (SHA-256 of the checkpoint file), ``device``,
``threads``, ``runtime``, ``batch_size``, ``torch`` (version), ``host``; ``whole_ms`` (the model as one
piece) with ``whole_spread_ms``; ``others_ms`` (every leaf module that is not a target, each timed alone);
and ``layers``: per target, ``ms`` (as it is, with its BatchNorm) and ``spread_ms``, and ``candidates``:
per structure name (``pair``) a list of ``{"size", "ms", "ratio", "q25", "q75"}``, where ``ratio`` is the
median pairwise ratio to the layer as it is and ``ms`` = ``ratio`` x the layer's ``ms``. Every part's ``ms``
is its median pairwise ratio to the whole model, timed in the same comparison, times ``whole_ms``, so parts
and whole are measured under the same load.

``chains`` (optional; files without it have none): per channel chain, by producer name, ``consumer``,
``channels`` and ``modules``: every module the chain resizes, with ``side`` (``out``: the producer and the
modules carried between, which lose output channels; ``in``: the consumer, which loses inputs), ``ms`` (as it
is) and ``candidates``, the same list of ``{"size", ...}`` with ``size`` the kept width. A profile is refused
for any checkpoint other than the one it was measured on.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field

from rankcut.errors import RankcutError
from rankcut.files.fileio import atomic_write, file_digest, require_file

FORMAT = "rankcut-profile/1"
PAIR = "pair"  # the structure name of rank-k pairs
PATH = "(path)"  # a chain's modules entry for the operations between producer and consumer, carried ones included
SIDES = ("out", "in")  # how a chain resizes a module: its outputs (producer, carried) or its inputs (consumer)
MAX_BYTES = 64 << 20


@dataclass(frozen=True)
class Candidate:
    """One timed replacement of a layer: its size (a rank for ``pair``) and its time."""

    size: int
    ms: float
    ratio: float
    q25: float
    q75: float


@dataclass(frozen=True)
class LayerProfile:
    """One target: its time as it is, and its candidates by structure name."""

    ms: float
    spread_ms: tuple[float, float]
    candidates: dict[str, tuple[Candidate, ...]] = field(default_factory=dict)

    def time_at(self, structure: str, size: float) -> float:
        """Milliseconds of ``structure`` at ``size``, linear between the sizes timed (sizes outside: refused)."""
        return _between(self.candidates.get(structure, ()), size, "ms", structure)


def _between(timed: tuple[Candidate, ...], size: float, field_name: str, what: str) -> float:
    """``field_name`` of the candidates at ``size``, linear between the sizes timed (outside them: refused)."""
    if not timed or not timed[0].size <= size <= timed[-1].size:
        raise RankcutError(f"the profile has no {what} time at size {size}")
    for a, b in zip(timed, timed[1:]):
        if a.size <= size <= b.size:
            lo, hi = getattr(a, field_name), getattr(b, field_name)
            return lo + (hi - lo) * (size - a.size) / (b.size - a.size)
    return getattr(timed[0], field_name)


@dataclass(frozen=True)
class ModuleWidths:
    """One module a chain resizes: which side, its time as it is, and its times at the kept widths timed."""

    side: str
    ms: float
    candidates: tuple[Candidate, ...]

    def ratio_at(self, width: int, channels: int) -> float:
        """Time at ``width`` kept channels over the time as it is: linear between the widths timed, 1 at full."""
        if width >= channels:
            return 1.0
        full = Candidate(channels, self.ms, 1.0, 1.0, 1.0)
        return _between(self.candidates + (full,), width, "ratio", "channel width")


@dataclass(frozen=True)
class ChainProfile:
    """One channel chain: its consumer and width, and every module it resizes, timed at a grid of widths."""

    consumer: str
    channels: int
    modules: dict[str, ModuleWidths]


@dataclass(frozen=True)
class Profile:
    checkpoint: str
    device: str
    threads: int
    runtime: str
    batch_size: int
    torch: str
    host: str
    whole_ms: float
    whole_spread_ms: tuple[float, float]
    others_ms: float
    layers: dict[str, LayerProfile]
    chains: dict[str, ChainProfile] = field(default_factory=dict)

    @property
    def parts_ms(self) -> float:
        """Every leaf timed alone, added up: targets as they are plus everything else."""
        return self.others_ms + sum(p.ms for p in self.layers.values())

    @property
    def scale(self) -> float:
        """What the parts' times are multiplied by so that they never add up to more than the whole.

        1 when the parts add up to less (the rest, functional operations such as ``F.relu`` or residual adds,
        is then a fixed cost: the whole minus the parts); below 1 where each part alone pays an overhead the
        whole does not (a small layer in its own ONNX Runtime session).
        """
        return min(1.0, self.whole_ms / self.parts_ms) if self.parts_ms > 0 else 1.0

    def describe(self) -> str:
        return (f"{self.runtime} on {self.device}, {self.threads} threads, batch {self.batch_size}, "
                f"host {self.host}")

    def to_dict(self) -> dict:
        return {"format": FORMAT, **asdict(self)}


def save_profile(profile: Profile, path: str | os.PathLike) -> None:
    """Write ``profile`` as JSON, atomically."""
    text = json.dumps(profile.to_dict(), indent=1)

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    atomic_write(path, write)


def _number(value, what: str, path: str, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < 0 or (positive and value == 0):
        raise RankcutError(f"{path}: {what} must be a {'positive' if positive else 'non-negative'} number")
    return float(value)


def _spread(value, what: str, path: str) -> tuple[float, float]:
    if not isinstance(value, list) or len(value) != 2:
        raise RankcutError(f"{path}: {what} must be a list of two numbers")
    return _number(value[0], what, path), _number(value[1], what, path)


def _layer(name: str, d, path: str) -> LayerProfile:
    if not isinstance(d, dict) or not isinstance(d.get("candidates"), dict):
        raise RankcutError(f"{path}: layer {name!r} is not a layer profile")
    candidates = {str(structure): _candidates(items, f"{name}/{structure}", path)
                  for structure, items in d["candidates"].items()}
    return LayerProfile(_number(d.get("ms"), f"{name} ms", path, positive=True),
                        _spread(d.get("spread_ms"), f"{name} spread_ms", path), candidates)


def _candidates(items, what: str, path: str) -> tuple[Candidate, ...]:
    """A list of ``{"size", "ms", "ratio", "q25", "q75"}`` with positive increasing sizes."""
    if not isinstance(items, list) or not all(isinstance(c, dict) for c in items):
        raise RankcutError(f"{path}: {what} must be a list of candidates")
    try:
        timed = tuple(Candidate(int(c["size"]), *(_number(c[k], f"{what} {k}", path) for k in
                                                  ("ms", "ratio", "q25", "q75"))) for c in items)
    except (KeyError, TypeError, ValueError):
        raise RankcutError(f"{path}: a candidate of {what} lacks size, ms, ratio, q25 or q75") from None
    if [c.size for c in timed] != sorted({c.size for c in timed}) or any(c.size < 1 for c in timed):
        raise RankcutError(f"{path}: {what} sizes must be positive and increasing")
    return timed


def _chain(producer: str, d, path: str) -> ChainProfile:
    if not isinstance(d, dict) or not isinstance(d.get("consumer"), str) or not isinstance(d.get("modules"), dict):
        raise RankcutError(f"{path}: chain {producer!r} is not a chain profile (consumer, channels, modules)")
    channels = d.get("channels")
    if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
        raise RankcutError(f"{path}: chain {producer!r} channels must be a positive integer")
    modules = {}
    for name, m in d["modules"].items():
        if not isinstance(m, dict) or m.get("side") not in SIDES:
            raise RankcutError(f"{path}: module {name!r} of chain {producer!r} needs a side ({' or '.join(SIDES)})")
        timed = _candidates(m.get("candidates"), f"{producer}/{name}", path)
        if timed and timed[-1].size >= channels:
            raise RankcutError(f"{path}: {producer}/{name} widths must be below the chain's {channels} channels")
        modules[str(name)] = ModuleWidths(m["side"], _number(m.get("ms"), f"{name} ms", path, positive=True), timed)
    return ChainProfile(d["consumer"], channels, modules)


def load_profile(path: str | os.PathLike) -> Profile:
    """Read and validate a profile; anything malformed is one line naming the file."""
    p = require_file(path, "profile")
    if p.stat().st_size > MAX_BYTES:
        raise RankcutError(f"{path} is too large to be a rankcut profile")
    try:
        d = json.loads(p.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise RankcutError(f"{path} is not a rankcut profile (not JSON); make one with rankcut profile") from None
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise RankcutError(f"{path} is not a rankcut profile ({FORMAT}); make one with rankcut profile")
    try:
        texts = {k: d[k] for k in ("checkpoint", "device", "runtime", "torch", "host")}
        ints = {k: d[k] for k in ("threads", "batch_size")}
        layers = d["layers"]
        chains = d.get("chains", {})
    except KeyError as e:
        raise RankcutError(f"{path}: missing {e.args[0]!r}") from None
    if not all(isinstance(v, str) for v in texts.values()) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in ints.values()) or not isinstance(layers, dict) \
            or not isinstance(chains, dict):
        raise RankcutError(f"{path}: malformed header (texts, positive integers, layers and chains objects)")
    return Profile(**texts, **ints, whole_ms=_number(d.get("whole_ms"), "whole_ms", path, positive=True),
                   whole_spread_ms=_spread(d.get("whole_spread_ms"), "whole_spread_ms", path),
                   others_ms=_number(d.get("others_ms"), "others_ms", path),
                   layers={str(n): _layer(n, v, path) for n, v in layers.items()},
                   chains={str(n): _chain(n, v, path) for n, v in chains.items()})


def check_profile(profile: Profile, checkpoint: str | os.PathLike, path: str | os.PathLike) -> None:
    """Refuse a profile measured on another checkpoint (its digest differs)."""
    digest = file_digest(checkpoint)
    if profile.checkpoint != digest:
        raise RankcutError(f"{path} was measured on another checkpoint (digest {profile.checkpoint[:12]}), not "
                           f"{checkpoint} ({digest[:12]}); rerun rankcut profile on {checkpoint}")
