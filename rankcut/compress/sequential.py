"""Sequential projection: each layer's basis from statistics taken on the model whose earlier layers are
already projected, instead of on the original.

``project`` computes every basis from one statistics file of the original network, so at run time each
projected layer sees inputs that the projected layers before it have already changed. Here the targets are
projected one at a time in the order the network computes them; before layer i, one pass over the data
gathers what the method reads at layer i (output moments; with ``grad``, the probe-gradient statistics as
well) on the model as it is now, with the layers before i projected. The ranks are given (decided before,
e.g. by a budget on the ordinary statistics), so the cost is the same as plain projection's. The passes are
those of ``rankcut stats`` (``stats.collect``), one target at a time, so under torchrun the sums are
all-reduced the same way and every process computes the same bases.
"""

from __future__ import annotations

from torch import nn

from rankcut.compress.methods import Method, get_method
from rankcut.compress.project import LayerReport, project_model
from rankcut.dist import Context
from rankcut.model.cost import pair_saves
from rankcut.model.edits import Edit, get_module
from rankcut.model.targets import Target
from rankcut.stats.collect import collect_gradients, collect_moments
from rankcut.stats.moments import LayerStats


def measure_layer(model: nn.Module, target: Target, method: Method, batches, ctx: Context, grad: str | None,
                  probes: int = 1, seed: int = 0, advance=lambda: None, indices=None) -> LayerStats | None:
    """What ``method`` reads at ``target``, measured on ``model`` as it is (None for a data-free method).

    ``indices``: each sample's index in the whole data (probes are seeded by it, as in ``stats``)."""
    if method.needs == "none":
        return None
    moments = collect_moments(model, [target], batches, ctx, advance)
    gradients = {}
    if method.needs == "grad":
        gradients = collect_gradients(model, [target], batches, moments, grad, probes, seed, ctx, advance,
                                      indices)
    return LayerStats(target, moments[target.name], gradients.get(target.name, {}))


def project_sequential(model: nn.Module, targets: list[Target], method: Method | str, ranks: dict[str, int],
                       batches, ctx: Context, options: dict | None = None, *, grad: str | None = None,
                       probes: int = 1, seed: int = 0, indices=None, only_if_saves: bool = True,
                       stage=lambda name: (lambda: None)) -> tuple[list[Edit], list[LayerReport]]:
    """Project ``targets`` (in call order) one by one in place, each from statistics of the model with the
    targets before it already projected; return the edits and reports, as ``project.project_model`` does.

    ``grad``, ``probes``, ``seed``, ``indices``: the gradient pass's loss and probes (methods reading
    gradients), as ``rankcut stats --grad``. ``stage(name)`` returns the callback that advances a progress bar per batch.
    A layer the asked rank would leave whole costs no pass.
    """
    method = get_method(method)
    edits: list[Edit] = []
    reports: list[LayerReport] = []
    for target in targets:
        stats = {}
        if not only_if_saves or pair_saves(get_module(model, target.name), ranks[target.name]):
            measured = measure_layer(model, target, method, batches, ctx, grad, probes, seed,
                                     stage(f"statistics of {target.name}"), indices)
            stats = {} if measured is None else {target.name: measured}
        done, reported = project_model(model, [target], stats, method, ranks, options, only_if_saves=only_if_saves)
        edits += done
        reports += reported
    return edits, reports
