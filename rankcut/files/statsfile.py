"""The statistics contract: a ``.npz`` of per-layer float64 accumulators plus JSON metadata.

Arrays, for each target layer ``L``: ``L/count`` (positions seen), ``L/mean`` (C), ``L/m2`` (C x C centred
scatter). With gradient statistics (``stats --grad``) also ``L/grad_count`` (samples x probes),
``L/hessian`` (C x C, the sum of ``sym(S)^2``) and ``L/grad_m2`` (C x C, the sum of ``g g^T``).
``__meta__`` is a one-element string array holding JSON: format, checkpoint digest, samples, loss,
layers (name, capture point, channels). Everything loads with ``allow_pickle=False``.

With ``stats --structure channels`` (or ``auto``), each prunable chain (``rankcut.model.graph``) adds the
moments of its consumer's input, keyed by the producer ``P``: ``P/in_count``, ``P/in_mean`` (C) and
``P/in_m2`` (C x C), and the metadata a ``chains`` list (producer, consumer, carried, channels, block,
positions). Files without them (older ones) load with no chains.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import nn

from rankcut.model.contract import InputContract
from rankcut.errors import RankcutError
from rankcut.files.fileio import atomic_write, file_digest, require_file
from rankcut.model.layers import out_width
from rankcut.files.safenpz import read_npz
from rankcut.stats.moments import ChainStats, LayerStats, Moments
from rankcut.model.targets import Target, trace
from rankcut.model.graph import Chain

FORMAT = "rankcut-stats/1"
GRAD_KEYS = ("grad_count", "hessian", "grad_m2")


@dataclass
class StatsFile:
    """A whole statistics file: per-layer statistics and where they came from."""

    checkpoint: str
    samples: int
    layers: dict[str, LayerStats]
    loss: str | None = None
    info: dict = field(default_factory=dict)
    chains: dict[str, ChainStats] = field(default_factory=dict)

    def merge(self, other: "StatsFile") -> "StatsFile":
        """Statistics of both files' data together (same checkpoint and layers): exact up to rounding."""
        if other.checkpoint != self.checkpoint or other.layers.keys() != self.layers.keys() or other.loss != self.loss:
            raise RankcutError("cannot merge statistics of different checkpoints, layers or losses")
        merged = {}
        for name, a in self.layers.items():
            b = other.layers[name]
            grad = {k: a.grad[k] + b.grad[k] for k in a.grad}
            merged[name] = LayerStats(a.target, a.moments.merge(b.moments), grad)
        if other.chains.keys() != self.chains.keys():
            raise RankcutError("cannot merge statistics with different channel chains")
        chains = {p: ChainStats(c.chain, c.moments.merge(other.chains[p].moments)) for p, c in self.chains.items()}
        return replace(self, samples=self.samples + other.samples, layers=merged, chains=chains)


def save_stats(stats: StatsFile, path: str | os.PathLike) -> None:
    """Write ``stats`` to ``path`` atomically."""
    meta = {**stats.info, "format": FORMAT, "checkpoint": stats.checkpoint, "samples": stats.samples,
            "loss": stats.loss,
            "layers": [{"name": s.target.name, "bn": s.target.bn, "channels": s.channels} for s in stats.layers.values()],
            **({"chains": [c.chain.to_dict() for c in stats.chains.values()]} if stats.chains else {})}
    arrays = {"__meta__": np.array([json.dumps(meta)])}
    for name, s in stats.layers.items():
        arrays[f"{name}/count"] = np.array(s.moments.count, dtype=np.float64)
        arrays[f"{name}/mean"] = s.moments.mean.numpy()
        arrays[f"{name}/m2"] = s.moments.m2.numpy()
        for key, value in s.grad.items():
            arrays[f"{name}/{key}"] = value.double().numpy()
    for producer, c in stats.chains.items():
        arrays[f"{producer}/in_count"] = np.array(c.moments.count, dtype=np.float64)
        arrays[f"{producer}/in_mean"] = c.moments.mean.numpy()
        arrays[f"{producer}/in_m2"] = c.moments.m2.numpy()

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    atomic_write(path, write)


def _array(arrays: dict, key: str, shape: tuple[int, ...], path: str) -> torch.Tensor:
    if key not in arrays:
        raise RankcutError(f"{path} is missing the array {key}")
    a = arrays[key]
    if a.shape != shape or a.dtype != np.float64:
        raise RankcutError(f"{path}: {key} has shape {a.shape} ({a.dtype}), expected {shape} (float64)")
    if not np.isfinite(a).all():
        raise RankcutError(f"{path}: {key} holds NaN or Inf")
    return torch.from_numpy(np.array(a))


def _meta(arrays: dict, path: str) -> dict:
    raw = arrays.get("__meta__")
    if raw is None or raw.shape != (1,) or raw.dtype.kind != "U":
        raise RankcutError(f"{path} is not a rankcut statistics file (no metadata); make one with rankcut stats")
    try:
        meta = json.loads(str(raw[0]))
    except (ValueError, RecursionError):  # RecursionError: JSON arrays nested millions deep
        raise RankcutError(f"{path} has damaged metadata") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise RankcutError(f"{path} is not a {FORMAT} statistics file")
    return meta


def load_stats(path: str | os.PathLike) -> StatsFile:
    """Read and validate a statistics file (never unpickles; every array's shape is checked)."""
    path = str(path)
    require_file(path, "statistics file")
    arrays = read_npz(path)
    meta = _meta(arrays, path)
    layers = {}
    try:
        loss, digest, samples = meta["loss"], str(meta["checkpoint"]), int(meta["samples"])
        entries = [(str(e["name"]), e["bn"], int(e["channels"])) for e in meta["layers"]]
    except (KeyError, TypeError, ValueError, OverflowError):  # OverflowError: int(1e400)
        raise RankcutError(f"{path} has damaged metadata") from None
    if loss is not None and not isinstance(loss, str):
        raise RankcutError(f"{path} has damaged metadata (loss must be a name)")
    for name, bn, c in entries:
        if c < 1:
            raise RankcutError(f"{path}: layer {name} declares {c} channels")
        count = float(_array(arrays, f"{name}/count", (), path))
        if count < 0:
            raise RankcutError(f"{path}: layer {name} has a negative sample count ({count:g})")
        moments = Moments(count, _array(arrays, f"{name}/mean", (c,), path), _array(arrays, f"{name}/m2", (c, c), path))
        grad = {}
        if loss is not None:
            grad["grad_count"] = _array(arrays, f"{name}/grad_count", (), path)
            if grad["grad_count"] < 0:
                raise RankcutError(f"{path}: layer {name} has a negative gradient sample count")
            grad |= {k: _array(arrays, f"{name}/{k}", (c, c), path) for k in GRAD_KEYS[1:]}
        layers[name] = LayerStats(Target(name, bn if isinstance(bn, str) else None), moments, grad)
    info = {k: v for k, v in meta.items() if k not in ("format", "checkpoint", "samples", "loss", "layers", "chains")}
    return StatsFile(digest, samples, layers, loss, info, _load_chains(arrays, meta.get("chains", []), path))


def _load_chains(arrays: dict, entries, path: str) -> dict[str, ChainStats]:
    """The consumer-input moments of every chain listed in the metadata (none in older files)."""
    try:
        parsed = [Chain(str(e["producer"]), str(e["consumer"]), tuple(str(n) for n in e["carried"]),
                        int(e["channels"]), int(e["block"]), int(e["positions"])) for e in entries]
    except (KeyError, TypeError, ValueError, OverflowError):
        raise RankcutError(f"{path} has damaged metadata (chains)") from None
    chains = {}
    for chain in parsed:
        c, p = chain.channels, chain.producer
        if c < 1 or chain.block < 1 or chain.positions < 1:
            raise RankcutError(f"{path}: chain {p} declares {c} channels, block {chain.block}, {chain.positions} positions")
        count = float(_array(arrays, f"{p}/in_count", (), path))
        if count < 0:
            raise RankcutError(f"{path}: chain {p} has a negative sample count ({count:g})")
        moments = Moments(count, _array(arrays, f"{p}/in_mean", (c,), path), _array(arrays, f"{p}/in_m2", (c, c), path))
        chains[p] = ChainStats(chain, moments)
    return chains


def check_digest(stats: StatsFile, checkpoint: str, stats_path: str) -> None:
    """Refuse statistics computed for another checkpoint file than ``checkpoint``."""
    digest = file_digest(checkpoint)
    if stats.checkpoint != digest:
        raise RankcutError(f"{stats_path} was computed for another checkpoint (digest {stats.checkpoint[:12]}), "
                           f"not {checkpoint} ({digest[:12]}); rerun rankcut stats on {checkpoint}")


def check_fits(stats: StatsFile, model: nn.Module, contract: InputContract, path: str) -> None:
    """Refuse statistics whose layers are not the model's targets, or have another width or capture point.

    Statistics made by ``rankcut stats`` for this checkpoint always fit (its digest is checked too); this
    guards against files edited by hand or damaged in a way that kept the digest.
    """
    found = {t.name: t for t in trace(model, contract)[0]}
    for name, s in stats.layers.items():
        if name not in found:
            raise RankcutError(f"{path}: layer {name!r} is not a target layer of the checkpoint "
                               f"(targets: {', '.join(list(found)[:6])}{', ...' if len(found) > 6 else ''})")
        if s.target.bn != found[name].bn:
            raise RankcutError(f"{path}: layer {name} was measured at {s.target.capture}, but in the checkpoint "
                               f"its output is {found[name].capture}'s")
        width = out_width(model.get_submodule(name))
        if s.channels != width:
            raise RankcutError(f"{path}: layer {name} has {s.channels} channels in the statistics, {width} in the model")


# Variances below these are rounding noise: the sums are float32 products accumulated in float64, so
# relative errors of ~1e-7 per product are expected, relative to the largest variance and, where the
# outputs barely vary, to their squared size.
RANK_TOLERANCE = 1e-5
MEAN_TOLERANCE = 1e-10


def _rank_and_floor(stats: LayerStats) -> tuple[int, float]:
    """The numerical rank of the covariance, and the variance below which a direction is noise."""
    values = torch.linalg.eigvalsh(stats.moments.covariance)
    floor = max(values.max().item() * RANK_TOLERANCE, stats.moments.mean.pow(2).max().item() * MEAN_TOLERANCE, 1e-300)
    return int((values > floor).sum()), floor


def numerical_rank(stats: LayerStats) -> int:
    """How many directions the layer's outputs actually vary in: eigenvalues of the covariance above noise."""
    return _rank_and_floor(stats)[0]


def rank_warning(name: str, stats: LayerStats, samples: int, limit: int | None = None) -> str | None:
    """One line saying why a layer's covariance is rank-deficient, or None when it is as full as it can be.

    ``limit`` is the most the layer's structure allows (``layers.max_rank``: a conv with 9 inputs per
    output has rank at most 9 whatever the data). With fewer observed positions than channels the
    covariance has rank at most positions - 1, and the line says how many samples would be enough;
    otherwise constant (dead) channels or inputs that vary in few directions are reported. PCA stays
    exact on the data's span either way: projecting to a rank at least the reported one loses nothing
    on this data, but directions beyond it are not learned from the data.
    """
    c = stats.channels
    bound = c if limit is None else min(c, limit)
    rank, floor = _rank_and_floor(stats)
    if rank >= bound:
        return None
    count = int(stats.moments.count)
    per_sample = max(1, round(count / samples)) if samples > 0 else 1
    if count <= bound:
        need = -(-(bound + 1) // per_sample)
        return (f"layer {name} has {c} channels but the statistics saw only {count:,} positions "
                f"({samples:,} samples x {per_sample:,}); its covariance has rank {rank} < {bound}: "
                f"use at least {need:,} samples (several times more for a stable estimate)")
    variances = torch.diagonal(stats.moments.covariance)
    constant = int((variances <= floor).sum())
    why = (f"{constant} of its channels are constant on this data" if constant else
           "the data varies in few directions; more, or more varied, samples may help")
    return (f"layer {name}: its covariance has rank {rank} < {bound} over {count:,} positions ({why}); "
            f"rank {rank} already keeps all the variation this data shows")
