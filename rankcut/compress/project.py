"""Apply bases to a model: fold BatchNorms, replace targets by rank-k pairs, and report what changed."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from rankcut.compress.methods import Basis, Method, foldable_bn, get_method, kept_variance, layer_basis
from rankcut.errors import RankcutError
from rankcut.model.cost import pair_saves
from rankcut.model.edits import Edit, FoldBatchNorm, LowRankPair, get_module, set_module
from rankcut.model.layers import current_rank, project_layer
from rankcut.model.targets import Target
from rankcut.stats.moments import LayerStats


@dataclass
class LayerReport:
    """What happened to one selected layer."""

    layer: str
    old_rank: int
    new_rank: int
    status: str
    kept_variance: float | None = None
    predicted_loss: float | None = None
    loss_units: str = ""
    macs_before: int = 0
    macs_after: int = 0
    params_before: int = 0
    params_after: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def project_model(model: nn.Module, targets: list[Target], stats: dict[str, LayerStats], method: Method | str,
                  ranks: dict[str, int], options: dict | None = None, *, only_if_saves: bool = True,
                  bases: dict[str, Basis] | None = None) -> tuple[list[Edit], list[LayerReport]]:
    """Rank-reduce each target in place to ``ranks[name]`` with ``method``; return the edits and a report.

    A target where the asked rank would not save MACs is left whole (with ``only_if_saves``), and so is
    its BatchNorm. ``bases`` are already computed bases (of the BatchNorm-folded layers), e.g. by a budget
    plan; the others are computed here. ``options`` go to the method (``damping``, ``seed``).
    """
    method = get_method(method)
    edits: list[Edit] = []
    reports: list[LayerReport] = []
    for target in targets:
        layer = get_module(model, target.name)
        old, k = current_rank(layer), ranks[target.name]
        if only_if_saves and not pair_saves(layer, k):
            reports.append(LayerReport(target.name, old, old, f"whole: rank {k} would not save MACs"))
            continue
        if foldable_bn(model, target) is not None:
            fold = FoldBatchNorm(target.name, target.bn)
            fold.apply(model)
            edits.append(fold)
            layer = get_module(model, target.name)
        layer_stats = stats.get(target.name)
        basis = (bases or {}).get(target.name) or layer_basis(layer, target.name, layer_stats, method, options)
        up, down, mu = basis.pair(k)
        pair = project_layer(layer, up, down, mu)
        if not all(torch.isfinite(p).all() for p in pair.parameters()):
            raise RankcutError(f"--method {method.name} gave NaN or Inf weights for layer {target.name} (its "
                               "weights or statistics are too extreme); nothing written")
        set_module(model, target.name, pair)
        edits.append(LowRankPair(target.name, k))
        reports.append(LayerReport(
            target.name, old, k, "projected",
            kept_variance=None if layer_stats is None else kept_variance(up, down, layer_stats),
            predicted_loss=None if basis.loss is None else float(basis.loss[k]), loss_units=method.loss_units))
    return edits, reports
