"""The accuracy/cost frontier: every method x structure x budget projected from one model and evaluated.

    result = sweep(model, meta.input, stats, test_set, 10, SweepConfig(methods=("pca", "fisher"),
                   budgets=(("macs", 0.5), ("macs", 0.25))))

Each point is exactly what ``project`` then ``eval --reference ORIGINAL`` give for that configuration (the same
``api.project`` on a copy of the model, the same ``api.evaluate`` in one pass over the data). ``known`` takes a
previous result (the sweep's JSON) whose points are reused by key, so a rerun with one more budget computes only
that point; the caller decides whether the previous result was made from the same inputs (``cli.sweep`` keys it
by the digests of the checkpoint, statistics and data).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn
from torch.utils.data import Dataset

from rankcut import dist
from rankcut.api import Budget, EvalConfig, ProjectConfig, evaluate, project
from rankcut.errors import RankcutError
from rankcut.files.statsfile import StatsFile
from rankcut.model.contract import InputContract
from rankcut.model.graph import check_structure
from rankcut.run.data import UNLABELED
from rankcut.run.evaluate import check_dataset_labels, known_labels

KINDS = ("keep", "macs", "params")  # latency budgets need a profile: not swept (yet)
FIGURES = ("top1", "topk", "k", "loss", "agreement", "kl", "nonfinite", "samples", "labeled", "macs", "params",
           "ratios")


@dataclass(frozen=True)
class SweepConfig:
    """What to sweep: every ``structures`` x ``methods`` (``pair`` only; ``channels`` takes no method) x ``budgets``.

    ``budgets`` are ``(kind, fraction)`` with kind ``keep`` (every layer keeps that fraction of its rank),
    ``macs`` or ``params`` (a global budget). ``within``: the recommendation is the cheapest point (in MACs)
    whose top-1 is at most this many percentage points below the original's. ``damping``, ``seed``, ``layers``
    and ``exclude`` are ``ProjectConfig``'s, the same for every point.
    """

    methods: tuple[str, ...] = ("pca",)
    structures: tuple[str, ...] = ("pair",)
    budgets: tuple[tuple[str, float], ...] = ()
    within: float = 1.0
    damping: float | None = None
    seed: int = 0
    layers: tuple[str, ...] | None = None
    exclude: tuple[str, ...] | None = None
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self):
        for s in self.structures:
            check_structure(s)
        if not self.structures:
            raise RankcutError("--structures names no structure")
        if "pair" in self.structures and not self.methods:
            raise RankcutError("--methods names no method")
        if not self.budgets:
            raise RankcutError("say which budgets to sweep: --keep, --macs or --params, e.g. --macs 0.5,0.25")
        for kind, _ in self.budgets:
            if kind not in KINDS:
                raise RankcutError(f"a sweep budget is one of {', '.join(KINDS)}, got {kind!r}")
        if not self.within >= 0:
            raise RankcutError(f"--within must be 0 or more percentage points, got {self.within}")
        self.configs()  # every point's ProjectConfig validates itself now, before any work

    def configs(self) -> list[tuple[tuple, ProjectConfig]]:
        """Each point's key ``(structure, method, kind, fraction)`` and ``ProjectConfig``, in sweep order."""
        out, seen = [], set()
        for structure in dict.fromkeys(self.structures):
            for method in dict.fromkeys(self.methods) if structure == "pair" else [None]:
                for kind, fraction in dict.fromkeys((k, float(f)) for k, f in self.budgets):
                    key = (structure, method, kind, fraction)
                    if key in seen:
                        continue
                    seen.add(key)
                    how = {"keep": fraction} if kind == "keep" else {"budget": Budget(kind, fraction)}
                    pair = structure == "pair"
                    out.append((key, ProjectConfig(method=method if pair else "pca", structure=structure,
                                                   damping=self.damping if pair else None, seed=self.seed,
                                                   layers=self.layers, exclude=self.exclude, **how)))
        return out


def point_key(point: dict) -> tuple:
    return point["structure"], point["method"], point["kind"], float(point["fraction"])


def label(point: dict) -> str:
    """``pair/pca`` or ``channels``: one line of the plot, one group of the table."""
    return point["structure"] if point["method"] is None else f"{point['structure']}/{point['method']}"


def check_stats(stats: StatsFile | None, config: SweepConfig) -> None:
    """Refuse, before any work, statistics that lack what one of the swept points needs."""
    from rankcut.compress.methods import get_method

    if "pair" in config.structures:
        for name in dict.fromkeys(config.methods):
            method = get_method(name)
            if method.needs != "none" and stats is None:
                raise RankcutError(f"--methods {name} needs --stats (make them with: rankcut stats CHECKPOINT "
                                   "--data D -o S.npz)")
            if method.needs == "grad" and stats is not None and not stats.loss:
                raise RankcutError(f"--methods {name} needs gradient statistics: rerun rankcut stats with --grad kl")
    if "channels" in config.structures and (stats is None or not stats.chains):
        raise RankcutError("--structures channels needs channel statistics (make them with: rankcut stats "
                           "CHECKPOINT --data D --structure channels -o S.npz)")


def pareto(costs: list[float], accuracies: list[float]) -> list[bool]:
    """Which points no other point beats: none is as cheap and as accurate, and strictly better in one."""
    out = []
    for c, a in zip(costs, accuracies):
        out.append(not any(c2 <= c and a2 >= a and (c2 < c or a2 > a) for c2, a2 in zip(costs, accuracies)))
    return out


def recommend(points: list[dict], original_top1: float, within: float) -> int | None:
    """The index of the cheapest point (MACs, then top-1) within ``within`` top-1 points of the original."""
    floor = original_top1 - within / 100 - 1e-12
    fits = [i for i, p in enumerate(points) if p["top1"] >= floor]
    return min(fits, key=lambda i: (points[i]["ratios"]["macs"], -points[i]["top1"]), default=None)


def summarize(original: dict, points: list[dict], within: float) -> dict:
    """The points with their Pareto marks (top-1 vs MACs ratio) and the recommendation."""
    marks = pareto([p["ratios"]["macs"] for p in points], [p["top1"] for p in points])
    points = [{**p, "pareto": m} for p, m in zip(points, marks)]
    best = recommend(points, original["top1"], within) if points else None
    return {"original": original, "within": within, "points": points,
            "recommendation": None if best is None else points[best]}


def sweep(model: nn.Module, contract: InputContract, stats: StatsFile | None, dataset: Dataset, classes: int,
          config: SweepConfig, *, known: dict | None = None, where: str = "the statistics",
          ctx: dist.Context | None = None, progress=None,
          on_point: Callable[[dict, nn.Module, object, dict], None] | None = None) -> dict:
    """Project a copy of ``model`` (left as it is) at every point of ``config`` and evaluate it against ``model``.

    ``model`` is on the CPU, as ``project`` loads it; each copy is evaluated on ``ctx.device``. ``known``: a
    previous result whose points (and original figures) are reused by key. ``on_point(point, projected,
    project_result, original)`` is called after each new point (the caller keeps the checkpoint, writes the
    cache; what it adds to ``point`` is kept). Returns ``summarize``'s dict plus ``computed`` and
    ``reused`` counts. ``dataset`` must be labelled (top-1 orders the points).
    """
    check_stats(stats, config)
    check_dataset_labels(dataset, classes, False, "the sweep's data")
    labels = known_labels(dataset)
    if labels is not None and bool((labels == UNLABELED).any()):
        raise RankcutError("the sweep's data has unlabelled samples; a sweep orders its points by top-1 and needs "
                           "labelled data")
    ctx = ctx or dist.Context(0, 1, next(model.parameters()).device)
    known = known or {}
    cached = {point_key(p): p for p in known.get("points", [])}
    original = known.get("original")
    todo = config.configs()
    reference = copy.deepcopy(model).to(ctx.device)
    done: dict[tuple, dict] = {}
    task = progress.add_task("sweep", total=sum(k not in cached for k, _ in todo), info="") if progress else None
    for key, project_config in todo:
        if key in cached:
            done[key] = {k: v for k, v in cached[key].items() if k != "pareto"}
            continue
        structure, method, kind, fraction = key
        if task is not None:
            progress.update(task, info=f"{label(dict(structure=structure, method=method))} {kind} {fraction:g}")
        small = copy.deepcopy(model)
        result = project(small, contract, stats, project_config, where)
        small.to(ctx.device)
        figures = evaluate([small], contract, dataset, classes, config.eval, reference=reference, ctx=ctx,
                           progress=progress)[0]
        ref = figures["reference"]
        if figures["top1"] is None:
            raise RankcutError("the sweep's data has no labelled samples; a sweep orders its points by top-1")
        original = {**{k: ref[k] for k in ("top1", "topk", "loss", "macs", "params")},
                    **{k: figures[k] for k in ("k", "samples", "labeled")}}
        point = {"structure": structure, "method": method, "kind": kind, "fraction": fraction,
                 **{k: figures[k] for k in FIGURES}, "changed": len(result.edits)}
        done[key] = point
        if on_point is not None:
            on_point(point, small, result, original)
        if task is not None:
            progress.advance(task)
    if original is None:  # nothing new and no figures of the original known: evaluate it alone
        figures = evaluate([reference], contract, dataset, classes, config.eval, ctx=ctx, progress=progress)[0]
        original = {k: figures[k] for k in ("top1", "topk", "loss", "macs", "params", "k", "samples", "labeled")}
    points = [done[k] for k, _ in todo]
    computed = sum(k not in cached for k, _ in todo)
    return {**summarize(original, points, config.within), "computed": computed, "reused": len(points) - computed}
