"""rankcut's use cases, each one call from objects to objects; the CLI and the benchmarks are shells around them.

    stats = collect_stats(model, contract, dataset, StatsConfig(grad="kl"))
    result = project(model, contract, stats, ProjectConfig(method="fisher", budget=Budget("macs", 0.5)))
    figures = evaluate([model], contract, test_set, EvalConfig(), reference=original)
    result = refit(model, original, contract, calibration_set, RefitConfig(damping=1e-3))
    frontier = sweep(model, contract, stats, test_set, 10, SweepConfig(methods=("pca", "fisher"),
                     budgets=(("macs", 0.5), ("macs", 0.25))))

Configs validate themselves when made (a wrong value is a ``RankcutError`` naming the CLI flag), so a
Python caller gets exactly the checks the CLI does. ``project`` changes the model in place, as torchao's
``quantize_`` does; ``result.edits`` are what a checkpoint records so the structure replays on load.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from torch import nn
from torch.utils.data import Dataset

from rankcut import dist
from rankcut.compress.auto import AutoResult, auto_model
from rankcut.compress.budget import BUDGET_KINDS, Allocation, no_loss, plan_budget, ranks_from_keep
from rankcut.compress.methods import DEFAULT_DAMPING, METHODS, Method, get_method
from rankcut.compress.project import LayerReport, project_model
from rankcut.compress.refit import (CACHE_BYTES, LayerRefit, batchnorms_after_change, layer_sums, products_dtype,
                                    reestimate_batchnorm, refit_one, refit_targets, teacher_cache_fits,
                                    teacher_outputs)
from rankcut.compress.replay import Replay
from rankcut.compress.prune import PruneResult, fitting_chains, prune_model
from rankcut.compress.sequential import project_sequential
from rankcut.compress.timed import latency_total, never_faster, slower_pairs, timed_options
from rankcut.errors import RankcutError
from rankcut.files.profilefile import Profile
from rankcut.files.statsfile import StatsFile, check_fits
from rankcut.model.contract import InputContract
from rankcut.model.cost import count_macs, count_params, target_cost
from rankcut.model.edits import Edit, get_module
from rankcut.model.graph import PROJECT_STRUCTURES, check_structure, find_chains, select_chains
from rankcut.model.layers import LowRank, current_rank, max_rank
from rankcut.model.targets import Target, match, select, trace, untargeted, warn_output_layer
from rankcut.run.data import UNLABELED, loader, shard, shard_indices, subset
from rankcut.run.evaluate import check_dataset_labels, evaluate_many, known_labels
from rankcut.run.frontier import KINDS, label, point_key, summarize
from rankcut.run.latency import RUNTIMES, compare_runtime
from rankcut.run.sweepcache import SweepCache
from rankcut.run.train import TrainConfig, fit
from rankcut.stats.collect import LOSSES, collect_gradients, collect_moments
from rankcut.stats.inputs import input_moments, observe_inputs
from rankcut.stats.moments import ChainStats, LayerStats

# ---------------------------------------------------------------------------------------------- statistics


@dataclass(frozen=True)
class StatsConfig:
    """What ``collect_stats`` gathers: output moments always; probe-gradient statistics with ``grad``; with
    ``structure="channels"`` also the input moments of every chain consumer (``project --structure channels``)."""

    grad: str | None = None
    probes: int = 1
    layers: tuple[str, ...] | None = None
    exclude: tuple[str, ...] | None = None
    batch_size: int = 64
    workers: int = 0
    seed: int = 0
    structure: str = "pair"

    def __post_init__(self):
        check_structure(self.structure)
        if self.grad is not None and self.grad not in LOSSES:
            raise RankcutError(f"--grad must be one of {', '.join(LOSSES)}, got {self.grad!r}")
        if self.probes < 1:
            raise RankcutError("--probes must be at least 1")
        _check_loading(self.batch_size, self.workers)


def _check_loading(batch_size: int, workers: int) -> None:
    if batch_size < 1:
        raise RankcutError(f"--batch-size must be at least 1, got {batch_size}")
    if workers < 0:
        raise RankcutError(f"--workers must be 0 or more, got {workers}")


def _check_shards(dataset: Dataset, ctx: dist.Context) -> None:
    """Every process checks, so all stop together (and rank 0 says why) when some would get no sample."""
    if len(dataset) < ctx.world:
        raise RankcutError(f"the data has {len(dataset)} sample(s), fewer than the {ctx.world} processes torchrun "
                           "started: give every process at least one (more data or a smaller --nproc_per_node)")


def _stages(progress, total: int):
    """``stage(name)`` adds a progress task of ``total`` steps and returns the callback that advances it."""

    def stage(name: str):
        if progress is None:
            return lambda: None
        task = progress.add_task(name, total=total, info="")
        return lambda: progress.advance(task)

    return stage


def collect_stats(model: nn.Module, contract: InputContract, dataset: Dataset, config: StatsConfig, *,
                  checkpoint: str = "", ctx: dist.Context | None = None, progress=None,
                  info: dict | None = None) -> StatsFile:
    """Statistics of every selected target over ``dataset`` (one forward pass per batch; more with ``grad``).

    ``checkpoint`` is the digest of the file the model came from (``project`` on the CLI refuses statistics of
    another file). The layers that are not targets are recorded, each with the reason. Under torchrun (``ctx``) each process takes a shard and the sums are combined exactly.
    """
    ctx = ctx or dist.Context(0, 1, next(model.parameters()).device)
    targets = select(model, contract, list(config.layers or []) or None, list(config.exclude or []) or None)
    _check_shards(dataset, ctx)
    batches = loader(shard(dataset, ctx.rank, ctx.world), config.batch_size, config.workers)
    stage = _stages(progress, len(batches))

    chains = [] if config.structure == "pair" else select_chains(find_chains(model, contract)[0],
                                                                  list(config.layers or []) or None,
                                                                  list(config.exclude or []) or None)
    with observe_inputs(model, chains) as chain_sums:
        moments = collect_moments(model, targets, batches, ctx, stage("moments"))
    chain_moments = input_moments(chain_sums, chains, ctx)
    gradients = {}
    if config.grad is not None:
        gradients = collect_gradients(model, targets, batches, moments, config.grad, config.probes, config.seed,
                                      ctx, stage(f"gradients ({config.grad})"),
                                      shard_indices(len(dataset), ctx.rank, ctx.world))
    layers = {t.name: LayerStats(t, moments[t.name], gradients.get(t.name, {})) for t in targets}
    extra = {**(info or {}), "seed": config.seed, **({"probes": config.probes} if config.grad else {}),
             "not_targets": untargeted(model, contract)}
    chain_stats = {c.producer: ChainStats(c, chain_moments[c.producer]) for c in chains}
    return StatsFile(checkpoint, len(dataset), layers, loss=config.grad, info=extra, chains=chain_stats)


def rank_limits(model: nn.Module, stats: StatsFile) -> dict[str, int]:
    """The most directions each measured layer's outputs can span, given its structure (``layers.max_rank``)."""
    return {name: max_rank(model.get_submodule(name)) for name in stats.layers}


# ---------------------------------------------------------------------------------------------- projection


@dataclass(frozen=True)
class Budget:
    """A global budget: the projected model costs at most ``fraction`` of the input's total ``kind``."""

    kind: str
    fraction: float

    def __post_init__(self):
        if self.kind not in BUDGET_KINDS:
            raise RankcutError(f"unknown budget kind {self.kind!r}; choose from {', '.join(BUDGET_KINDS)}")
        if not 0 < self.fraction < 1:
            raise RankcutError(f"--{self.kind} must be in (0, 1), got {self.fraction}")


@dataclass(frozen=True)
class ProjectConfig:
    """How ``project`` rank-reduces: the method, and how much to keep (``keep`` or a ``budget``, not both).

    ``damping`` is fisher's option (None: its default); ``seed`` seeds methods that draw (random).
    ``structure`` is ``pair`` (rank-k pairs, by ``method``), ``channels`` (channels removed from
    producer -> consumer chains and the consumer refitted; ``method`` is not used) or ``auto`` (each layer
    whole, a fisher pair or channel-pruned, chosen jointly under a budget: ``compress.auto``).
    ``round_channels``: kept channel counts are multiples of it (``channels`` and ``auto``).
    ``sequential``: each layer's basis from statistics measured on the model with the layers before it already
    projected (one pass over the data per layer, ``batch_size`` and ``workers`` as in ``stats``); the ranks are
    decided first, from the statistics file as without it (pairs only).
    """

    method: str = "pca"
    keep: float | None = None
    budget: Budget | None = None
    layers: tuple[str, ...] | None = None
    exclude: tuple[str, ...] | None = None
    damping: float | None = None
    seed: int = 0
    structure: str = "pair"
    round_channels: int = 1
    sequential: bool = False
    batch_size: int = 64
    workers: int = 0

    def __post_init__(self):
        check_structure(self.structure, PROJECT_STRUCTURES)
        if self.sequential and self.structure != "pair":
            raise RankcutError("--sequential re-measures the bases of rank-k pairs; --structure "
                               f"{self.structure} is not supported with it")
        _check_loading(self.batch_size, self.workers)
        method = get_method(self.method)
        if self.keep is None and self.budget is None:
            raise RankcutError("say how much to keep: --keep F, --macs F, --params F or --latency F")
        if self.keep is not None and self.budget is not None:
            raise RankcutError(f"--keep and --{self.budget.kind} are alternatives: give one")
        if self.keep is not None and not 0 < self.keep <= 1:
            raise RankcutError(f"--keep must be in (0, 1], got {self.keep}")
        if self.structure == "auto" and self.budget is not None and self.budget.kind == "latency":
            raise RankcutError("--latency budgets pairs or channels (the profile times both); with --structure auto "
                               "use --macs or --params")
        if self.structure == "auto" and self.budget is None:
            raise RankcutError("--structure auto chooses each layer's structure under a budget: give --macs F or "
                               "--params F, not --keep")
        if self.structure == "auto" and self.method != "fisher":
            raise RankcutError("--structure auto compares pairs and channels in fisher's currency: use --method "
                               "fisher (statistics from rankcut stats --grad kl --structure channels)")
        if not isinstance(self.round_channels, int) or self.round_channels < 1:
            raise RankcutError(f"--round-channels must be a whole number of at least 1, got {self.round_channels}")
        if self.round_channels > 1 and self.structure == "pair":
            raise RankcutError("--round-channels rounds kept channels: it needs --structure channels or auto")
        if self.structure == "pair" and self.budget is not None and method.budget is None:
            raise RankcutError(no_loss(method))
        if self.damping is not None:
            if "damping" not in method.options:
                takers = ", ".join(m.name for m in METHODS.values() if "damping" in m.options)
                raise RankcutError(f"--damping is an option of --method {takers}, not {self.method}")
            if self.damping < 0:
                raise RankcutError("--damping must be non-negative")

    @property
    def entry(self) -> Method:
        return METHODS[self.method]

    @property
    def options(self) -> dict:
        """The method options, defaults filled in."""
        return {"damping": DEFAULT_DAMPING if self.damping is None else self.damping, "seed": self.seed}


@dataclass
class ProjectResult:
    """What ``project`` did: the edits to record, a report per selected layer, totals, and the budget plan."""

    config: ProjectConfig
    edits: list[Edit]
    layers: list[LayerReport]
    totals: dict
    allocation: Allocation | None = None
    budget: dict | None = field(default=None)

    def history(self) -> dict:
        """The checkpoint history entry's details (the ``project`` command adds the statistics digest)."""
        how = {"keep": self.config.keep} if self.allocation is None else {self.allocation.kind: self.allocation.fraction}
        how.update({"sequential": True} if self.config.sequential else {})
        return {"method": self.config.method, **how, "layers": sum(r.status == "projected" for r in self.layers)}

    def to_dict(self) -> dict:
        rows = [r.to_dict() for r in self.layers]
        if self.allocation is not None:
            for row in rows:
                row["budget_loss"] = self.allocation.chosen(row["layer"])["loss"]
        return {"method": self.config.method, "keep": self.config.keep, "budget": self.budget, "layers": rows,
                "totals": self.totals}


def project_targets(model: nn.Module, contract: InputContract, stats: StatsFile | None, config: ProjectConfig,
                    where: str = "the statistics") -> list[Target]:
    """The layers ``project`` works on: the measured ones when there are statistics, else the model's targets."""
    layers, exclude = list(config.layers or []) or None, list(config.exclude or []) or None
    if stats is None:
        return select(model, contract, layers, exclude)
    check_fits(stats, model, contract, where)
    names = match(list(stats.layers), layers, exclude, f"layer in {where}")
    targets = [stats.layers[n].target for n in names]
    warn_output_layer(targets, trace(model, contract)[1])
    return targets


def project(model: nn.Module, contract: InputContract, stats: StatsFile | None, config: ProjectConfig,
            where: str = "the statistics", *, profile: Profile | None = None, dataset: Dataset | None = None,
            ctx: dist.Context | None = None, progress=None) -> ProjectResult | PruneResult | AutoResult:
    """Rank-reduce ``model`` in place as ``config`` says; ``where`` names the statistics in error messages.

    With a latency ``profile`` of this model (``rankcut profile``), no layer becomes a pair the profile measured
    as no faster than the layer, whatever the budget; a ``latency`` budget needs one. With
    ``structure="channels"`` channels are removed instead (``compress.prune``; statistics from
    ``StatsConfig(structure="channels")``), and a profile prices the chains' widths in measured time.

    With ``config.sequential`` the ranks are decided exactly as without it (from ``stats`` for a budget, so
    the cost is met the same), then the bases are measured again layer by layer on ``dataset``, each on the
    model with the layers before it already projected (``compress.sequential``; the gradient pass takes the
    loss and probes ``stats`` were made with). Under torchrun (``ctx``) each process takes a shard of
    ``dataset`` and the sums are combined exactly.
    """
    if config.structure != "pair":
        if stats is None:
            raise RankcutError(f"--structure {config.structure} needs --stats (made with: rankcut stats --structure "
                               "channels)")
        budget = None if config.budget is None else (config.budget.kind, config.budget.fraction)
        layers, exclude = list(config.layers or []) or None, list(config.exclude or []) or None
        if config.structure == "auto":
            if profile is not None:
                raise RankcutError("--profile times pairs and channels one structure at a time; it does not apply "
                                   "to --structure auto")
            targets = project_targets(model, contract, stats, config, where)
            chains, refused = fitting_chains(model, contract, stats, where, layers, exclude, required=False)
            return auto_model(model, contract, stats, targets, chains, refused, budget, config.options,
                              config.round_channels)
        return prune_model(model, contract, stats, keep=config.keep, budget=budget, layers=layers, exclude=exclude,
                           where=where, profile=profile, step=config.round_channels)
    method = config.entry
    if stats is None:
        method.check_stats(None)
    if profile is None and config.budget is not None and config.budget.kind == "latency":
        raise RankcutError("a --latency budget needs a latency profile of the checkpoint (rankcut profile)")
    targets = project_targets(model, contract, stats, config, where)
    layer_stats = {} if stats is None else stats.layers
    macs_before, per_before = count_macs(model, contract)
    params_before = count_params(model)
    costs_before = {t.name: target_cost(model, t.name, per_before) for t in targets}
    plan, chosen, slower = None, targets, {}
    if config.budget is None:
        ranks = ranks_from_keep(model, [t.name for t in targets], config.keep)
        if profile is not None:
            slower = slower_pairs(profile, model, ranks)
            chosen = [t for t in targets if t.name not in slower]
    else:
        kind = config.budget.kind
        total = {"macs": macs_before, "params": params_before}.get(kind) or latency_total(profile)
        plan = plan_budget(model, targets, layer_stats, method, kind, config.budget.fraction, total, per_before,
                           config.options, adjust=None if profile is None else timed_options(profile))
        ranks = plan.ranks
        chosen = [t for t in targets if ranks[t.name] < current_rank(get_module(model, t.name))]
    if config.sequential:
        edits, reports = _project_sequential(model, chosen, stats, dataset, method, ranks, config, ctx, progress)
    else:
        with torch.no_grad():
            edits, reports = project_model(model, chosen, layer_stats, method, ranks, config.options,
                                           bases=None if plan is None else plan.bases)
    if plan is not None or slower:
        reports = _with_unchanged(reports, model, targets)
    if profile is not None:  # say which layers stayed whole because a pair would be slower
        reasons = {**never_faster(profile, [r.layer for r in reports if r.new_rank == r.old_rank]), **slower}
        for r in reports:
            if r.new_rank == r.old_rank:
                r.status = reasons.get(r.layer, r.status)
    macs_after, per_after = count_macs(model, contract)
    params_after = count_params(model)
    for r in reports:
        (r.macs_before, r.params_before), (r.macs_after, r.params_after) = \
            costs_before[r.layer], target_cost(model, r.layer, per_after)
    totals = {"macs_before": macs_before, "macs_after": macs_after, "macs_ratio": macs_after / macs_before,
              "params_before": params_before, "params_after": params_after,
              "params_ratio": params_after / params_before}
    result = ProjectResult(config, edits, reports, totals, plan)
    if plan is not None:  # a latency budget is met by the profile's cost model: its own prediction
        achieved = {"macs": macs_after, "params": params_after}.get(plan.kind) or plan.total
        result.budget = _budget_summary(plan, method, achieved)
    return result


CALIBRATION_TOLERANCE = 0.02  # a measured latency ratio this close to the budget ends calibration


@dataclass(frozen=True)
class CalibrationRound:
    """One closed-loop round: the fraction given to the allocator, its prediction, and the built model measured."""

    budget: float
    predicted: float
    measured: float
    measured_q25: float
    measured_q75: float


def predicted_latency(result: ProjectResult | PruneResult) -> float:
    """The latency ratio a ``--latency`` plan predicts in its profile's cost model."""
    if isinstance(result, PruneResult):
        return result.totals["latency_ratio"]
    return result.budget["achieved"] / result.budget["total_before"]


def next_budget(rounds: list[CalibrationRound], target: float) -> float:
    """The next fraction to give the allocator, so that the measured ratio meets ``target``.

    Between the nearest rounds measured below and above the target once there are both (false position,
    which keeps the answer bracketed), else a secant through the last two rounds, else a proportional step.
    """
    below = [r for r in rounds if r.measured < target]
    above = [r for r in rounds if r.measured > target]
    if below and above:
        a, b = max(below, key=lambda r: r.measured), min(above, key=lambda r: r.measured)
    elif len(rounds) > 1:
        a, b = rounds[-2], rounds[-1]
    else:
        a, b = CalibrationRound(0.0, 0.0, 0.0, 0.0, 0.0), rounds[-1]  # the line through the origin
    if a.measured == b.measured or (b.measured - a.measured) / (b.budget - a.budget or 1e-12) <= 0:
        a = CalibrationRound(0.0, 0.0, 0.0, 0.0, 0.0)  # noise made the response fall: step proportionally
        b = rounds[-1]
    step = (target - a.measured) * (b.budget - a.budget) / (b.measured - a.measured)
    return min(0.99, max(0.01, a.budget + step))


def project_calibrated(model: nn.Module, contract: InputContract, stats: StatsFile | None, config: ProjectConfig,
                       where: str = "the statistics", *, profile: Profile, rounds: int, seconds: float = 4.0
                       ) -> tuple[nn.Module, ProjectResult | PruneResult, list[CalibrationRound]]:
    """``project`` to a ``--latency`` budget, then measure and re-solve: a closed loop on the measured ratio.

    Each round projects a copy of ``model`` (left as it is) with the current fraction, times it against
    ``model`` as ``eval --latency`` does (runtime, threads and batch size of the profile), and takes a secant
    step on the fraction toward the measured ratio asked for, up to ``rounds`` re-solves; it stops early
    within ``CALIBRATION_TOLERANCE``. Returns the model measured nearest the budget, its result, and every
    round. What the cost model misses (interactions between layers, the runtime's fusion) is corrected by
    measurement; noise on the machine is not, which is why every round is reported.
    """
    if config.budget is None or config.budget.kind != "latency":
        raise RankcutError("--calibrate re-solves a --latency budget; give --latency F")
    target, fraction = config.budget.fraction, config.budget.fraction
    device = torch.device(profile.device)
    tried, best = [], None
    for _ in range(rounds + 1):
        small = copy.deepcopy(model)
        try:
            result = project(small, contract, stats, replace(config, budget=Budget("latency", fraction)), where,
                             profile=profile)
        except RankcutError:
            if best is None:
                raise
            break  # the secant asked for a budget the allocator cannot meet: keep the best so far
        timing = compare_runtime([small.to(device), model.to(device)], contract, profile.batch_size, device,
                                 runtime=profile.runtime, threads=profile.threads, reference=1, max_seconds=seconds)[0]
        small.cpu(), model.cpu()
        tried.append(CalibrationRound(fraction, predicted_latency(result), timing["ratio"], timing["ratio_q25"],
                                      timing["ratio_q75"]))
        if best is None or abs(timing["ratio"] - target) < abs(best[2].measured - target):
            best = (small, result, tried[-1])
        if abs(timing["ratio"] - target) <= CALIBRATION_TOLERANCE:
            break
        fraction = next_budget(tried, target)
    return best[0], best[1], tried


def _project_sequential(model: nn.Module, chosen: list[Target], stats: StatsFile | None, dataset: Dataset | None,
                        method: Method, ranks: dict[str, int], config: ProjectConfig, ctx: dist.Context | None,
                        progress) -> tuple[list[Edit], list[LayerReport]]:
    """``project``'s bases measured layer by layer on ``dataset`` (``compress.sequential``), in call order."""
    if dataset is None:
        raise RankcutError("--sequential needs --data D: the statistics are measured again, layer by layer")
    ctx = ctx or dist.Context(0, 1, next(model.parameters()).device)
    _check_shards(dataset, ctx)
    batches = loader(shard(dataset, ctx.rank, ctx.world), config.batch_size, config.workers)
    probes = 1 if stats is None else stats.info.get("probes", 1)
    return project_sequential(model, chosen, method, ranks, batches, ctx, config.options,
                              grad=None if stats is None else stats.loss, probes=probes, seed=config.seed,
                              indices=shard_indices(len(dataset), ctx.rank, ctx.world),
                              stage=_stages(progress, len(batches)))


def _with_unchanged(reports: list[LayerReport], model: nn.Module, targets: list[Target]) -> list[LayerReport]:
    """One report per target in order: the projected ones, and the ones the budget left as they were."""
    by_name = {r.layer: r for r in reports}
    out = []
    for t in targets:
        layer = get_module(model, t.name)
        rank, what = current_rank(layer), "pair" if isinstance(layer, LowRank) else "whole"
        out.append(by_name.get(t.name) or LayerReport(t.name, rank, rank, f"{what}: kept by the budget"))
    return out


def _budget_summary(plan: Allocation, method: Method, achieved: int) -> dict:
    if achieved > plan.budget:  # the cost model is exact; this guards the promise, not the arithmetic
        raise RankcutError(f"internal error: the projected model has {achieved:,} {plan.kind}, over the budget "
                           f"{plan.budget:,} (predicted {plan.total:,}); nothing written")
    return {"kind": plan.kind, "fraction": plan.fraction, "total_before": plan.total_before, "target": plan.budget,
            "achieved": achieved, "of_target": achieved / plan.budget, "loss": plan.loss,
            "loss_units": method.budget_units, "note": plan.note}


# ---------------------------------------------------------------------------------------------- evaluation


@dataclass(frozen=True)
class EvalConfig:
    """How ``evaluate`` runs: batching, and whether (and at what batch size) to time inference."""

    batch_size: int = 64
    workers: int = 0
    latency: bool = False
    threads: int | None = None  # CPU threads while timing; None: as the process has now
    runtime: str = "torch"  # what runs the timed passes: torch, or onnxruntime on exported graphs
    seconds: float = 20.0  # how long the comparison lasts (at least its minimum of rounds)

    def __post_init__(self):
        _check_loading(self.batch_size, self.workers)
        if self.threads is not None and self.threads < 1:
            raise RankcutError(f"--threads must be at least 1, got {self.threads}")
        if not 0 < self.seconds < float("inf"):  # NaN fails every comparison
            raise RankcutError(f"--seconds must be a positive number, got {self.seconds}")
        if self.runtime not in RUNTIMES:
            raise RankcutError(f"unknown runtime {self.runtime!r}; choose from {', '.join(RUNTIMES)}")


def evaluate(models: list[nn.Module], contract: InputContract, dataset: Dataset, classes: int, config: EvalConfig,
             *, reference: nn.Module | None = None, ctx: dist.Context | None = None, progress=None) -> list[dict]:
    """Accuracy, loss, size and cost of each model (and latency with ``config.latency``), in one data pass.

    With a ``reference``, each entry also has the reference's figures under ``"reference"`` and the
    ``"ratios"`` of MACs, parameters (and latency) to it. Latencies are timed in turns, in short rounds, and a
    latency ratio is the median of pairwise ratios to the reference (else the first model), so load from other
    processes hits all of them alike.
    """
    device = next(models[0].parameters()).device
    ctx = ctx or dist.Context(0, 1, device)
    figures = evaluate_many(models, dataset, classes, device=ctx.device, batch_size=config.batch_size,
                            workers=config.workers, reference=reference, ctx=ctx, progress=progress)
    timed = list(models) + ([reference] if reference is not None else [])
    costs = [{"params": count_params(m), "macs": count_macs(m, contract)[0]} for m in timed]
    if config.latency and ctx.primary:
        latencies = compare_runtime(timed, contract, config.batch_size, ctx.device, runtime=config.runtime,
                                    threads=config.threads, reference=len(timed) - 1 if reference is not None else 0,
                                    max_seconds=config.seconds)
        for cost, lat in zip(costs, latencies):
            cost["latency"] = lat
    results = []
    for result, cost in zip(figures, costs):
        result = {**result, **cost}
        if reference is not None:
            ref = result["reference"] = {**result["reference"], **costs[-1]}
            result["ratios"] = {"macs": result["macs"] / ref["macs"], "params": result["params"] / ref["params"]}
            if "latency" in ref:
                result["ratios"]["latency"] = result["latency"]["ratio"]
        results.append(result)
    return results


# ---------------------------------------------------------------------------------------------- refit

DEFAULT_REFIT_DAMPING = 1e-3


@dataclass(frozen=True)
class RefitConfig:
    """How ``refit`` refits: ridge ``damping`` (relative to the mean eigenvalue of each layer's input second
    moment), alternating ``rounds`` for pairs, ``bn_only`` (only re-estimate BatchNorm statistics), ``every``
    (also refit unchanged layers after the first compressed one), ``positions`` (that many random output
    positions per sample in each layer's least squares, drawn per sample from ``seed``; None: all)."""

    damping: float = DEFAULT_REFIT_DAMPING
    rounds: int = 2
    bn_only: bool = False
    every: bool = False
    batch_size: int = 64
    workers: int = 0
    positions: int | None = None
    seed: int = 0

    def __post_init__(self):
        if not (isinstance(self.damping, (int, float)) and self.damping >= 0 and self.damping < float("inf")):
            raise RankcutError(f"--damping must be a finite number >= 0, got {self.damping}")
        if self.rounds < 1:
            raise RankcutError(f"--rounds must be at least 1, got {self.rounds}")
        if self.positions is not None and self.positions < 1:
            raise RankcutError(f"--positions must be at least 1, got {self.positions}")
        _check_loading(self.batch_size, self.workers)


@dataclass
class RefitResult:
    """What ``refit`` did: a report per refitted layer, the layers left alone (why), the BatchNorms re-estimated."""

    config: RefitConfig
    layers: list[LayerRefit]
    skipped: dict[str, str]
    batchnorms: list[str]
    samples: int

    def history(self) -> dict:
        return {"damping": self.config.damping, "rounds": self.config.rounds, "bn_only": self.config.bn_only,
                "all": self.config.every, "samples": self.samples,
                **({} if self.config.positions is None else {"positions": self.config.positions,
                                                              "seed": self.config.seed}),
                "layers": sum(r.status == "refit" for r in self.layers), "batchnorms": len(self.batchnorms)}

    def to_dict(self) -> dict:
        return {**self.history(), "layers": [r.to_dict() for r in self.layers], "skipped": self.skipped,
                "batchnorms": self.batchnorms}


def refit(model: nn.Module, teacher: nn.Module | None, contract: InputContract, dataset: Dataset,
          config: RefitConfig, *, ctx: dist.Context | None = None, progress=None) -> RefitResult:
    """Refit ``model``'s compressed layers in place so each matches ``teacher``'s output there (``compress.refit``).

    One pass over ``dataset`` per refitted layer (the compressed model, stopped at that layer and started from
    the kept input of the deepest block holding it, ``compress.replay``; the teacher's
    outputs at every layer from one pass of its own where they fit in ``compress.refit.CACHE_BYTES``), plus one pass
    before and one after to re-estimate the unfolded BatchNorms downstream of the first change. With
    ``bn_only`` only the BatchNorms (``teacher`` may then be None: all BatchNorms). Under torchrun each process
    takes a shard and the sums are combined exactly, so every process computes the same weights.
    """
    ctx = ctx or dist.Context(0, 1, next(model.parameters()).device)
    if teacher is None and not config.bn_only:
        raise RankcutError("refit needs the model it was compressed from (--teacher BASE), unless --bn-only")
    model.eval()
    if teacher is not None:
        teacher.eval()
    batches = loader(shard(dataset, ctx.rank, ctx.world), config.batch_size, config.workers)
    stage = _stages(progress, len(batches))

    targets, skipped = ([], {}) if config.bn_only else refit_targets(model, teacher, contract, config.every)
    norms = batchnorms_after_change(model, teacher, contract)
    reestimate_batchnorm(model, norms, batches, ctx, stage("batchnorm statistics"))
    taught = None  # the teacher's outputs at every target, from one pass, where they fit in memory
    indices = shard_indices(len(dataset), ctx.rank, ctx.world)
    if targets and teacher_cache_fits(teacher, targets, contract, len(batches.dataset), positions=config.positions):
        taught = teacher_outputs(teacher, targets, batches, ctx, stage("teacher outputs"), positions=config.positions,
                                 seed=config.seed, indices=indices)
    reports = []
    replay = Replay(model, contract, len(batches.dataset), CACHE_BYTES) if targets else None
    for target in targets:
        sums = layer_sums(model, teacher, target, batches, ctx, stage(f"refit {target.name}"), taught=taught,
                          positions=config.positions, seed=config.seed,
                          indices=indices, replay=replay,
                          dtype=products_dtype(config.damping))
        reports.append(refit_one(model, target, sums, config.damping, config.rounds))
    if any(r.status == "refit" for r in reports) and norms:
        reestimate_batchnorm(model, norms, batches, ctx, stage("batchnorm statistics, after the refits"))
    return RefitResult(config, reports, skipped, norms, len(dataset))
# ---------------------------------------------------------------------------------------------- sweep

SWEEP_FIGURES = ("top1", "topk", "k", "loss", "agreement", "kl", "nonfinite", "samples", "labeled", "macs", "params",
                 "ratios")
COSTS = ("macs", "latency")


@dataclass(frozen=True)
class SweepConfig:
    """What to sweep: every ``structures`` x ``methods`` (``pair`` only; ``channels`` takes no method) x ``budgets``.

    ``budgets`` are ``(kind, fraction)`` with kind ``keep`` (every layer keeps that fraction of its rank),
    ``macs``, ``params`` or ``latency`` (a global budget; latency needs a profile, one that timed the chains
    for channels points). ``within``: the recommendation is the cheapest point (in ``cost``: MACs, or the
    measured latency ratio, which needs ``eval.latency``) whose top-1 is at most this many percentage points
    below the original's. ``damping``, ``seed``, ``layers`` and ``exclude`` are ``ProjectConfig``'s, the same
    for every point.

    After ``project``, each point is refitted (``refit``, on ``refit_samples`` of the training data, all when
    None) and fine-tuned for ``finetune_epochs`` (``TrainConfig``'s defaults otherwise), in that order, when asked.
    With ``eval.latency`` each point is timed against the original (``evaluate``'s pairwise comparison).

    ``per_layer``: per-layer sensitivity instead: each selected layer (for ``channels``, each chain's producer)
    alone at each ``keep`` fraction, all others whole; the points are ordered by their top-1 drop. Without
    budgets it keeps 0.75, 0.5 and 0.25 of each layer's rank (width).
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
    per_layer: bool = False
    refit: bool = False
    refit_samples: int | None = None
    finetune_epochs: int = 0
    cost: str = "macs"

    def __post_init__(self):
        if self.per_layer and not self.budgets:
            object.__setattr__(self, "budgets", PER_LAYER_KEEPS)
        for s in self.structures:
            check_structure(s)
        if not self.structures:
            raise RankcutError("--structures names no structure")
        if "pair" in self.structures and not self.methods:
            raise RankcutError("--methods names no method")
        if not self.budgets:
            raise RankcutError("say which budgets to sweep: --keep, --macs, --params or --latency, e.g. --macs "
                               "0.5,0.25")
        for kind, _ in self.budgets:
            if kind not in KINDS:
                raise RankcutError(f"a sweep budget is one of {', '.join(KINDS)}, got {kind!r}")
            if self.per_layer and kind != "keep":
                raise RankcutError(f"--per-layer keeps each layer alone at --keep fractions; --{kind} budgets the "
                                   "whole model")
        if not self.within >= 0:
            raise RankcutError(f"--within must be 0 or more percentage points, got {self.within}")
        if self.cost not in COSTS:
            raise RankcutError(f"--cost must be one of {', '.join(COSTS)}, got {self.cost!r}")
        if self.cost == "latency" and not self.eval.latency:
            raise RankcutError("--cost latency ranks points by their measured latency: add --measure-latency")
        if self.refit_samples is not None and (not self.refit or self.refit_samples < 1):
            raise RankcutError("--refit-samples is a positive number of samples for --refit")
        if self.finetune_epochs < 0:
            raise RankcutError(f"--finetune-epochs must be 0 or more, got {self.finetune_epochs}")
        self.configs()  # each point's ProjectConfig checks itself (a method's options, its budget currency)

    @property
    def trains(self) -> bool:
        """Whether the points need training data (refit or fine-tuning)."""
        return self.refit or self.finetune_epochs > 0

    def fingerprint(self) -> dict:
        """The options a point's figures depend on beyond its key; a cached point is reused only when they match.

        The later options appear only when used, so a cache written before they existed stays valid.
        """
        timing = {"threads": self.eval.threads, "runtime": self.eval.runtime,
                  **({"seconds": self.eval.seconds} if self.eval.seconds != EvalConfig.seconds else {})}
        return {"seed": self.seed, "damping": self.damping, "layers": self.layers and list(self.layers),
                "exclude": self.exclude and list(self.exclude), "batch_size": self.eval.batch_size,
                **({"per_layer": True} if self.per_layer else {}),
                **({"refit": {"samples": self.refit_samples}} if self.refit else {}),
                **({"finetune": {"epochs": self.finetune_epochs}} if self.finetune_epochs else {}),
                **({"latency": timing} if self.eval.latency else {})}

    def configs(self, layers: dict[str, list[str]] | None = None) -> list[tuple[tuple, ProjectConfig]]:
        """Each point's key ``(structure, method, kind, fraction, layer)`` and ``ProjectConfig``, in sweep order.

        ``layer`` is None but with ``per_layer``, where ``layers[structure]`` names the layers to take one at a
        time (``sweep_layers``); without it the per-layer points are checked with ``config.layers``.
        """
        out, seen = [], set()
        for structure in dict.fromkeys(self.structures):
            names = [None] if not self.per_layer else (layers or {}).get(structure, [None])
            for method in dict.fromkeys(self.methods) if structure == "pair" else [None]:
                for layer in names:
                    for kind, fraction in dict.fromkeys((k, float(f)) for k, f in self.budgets):
                        key = (structure, method, kind, fraction, layer)
                        if key in seen:
                            continue
                        seen.add(key)
                        how = {"keep": fraction} if kind == "keep" else {"budget": Budget(kind, fraction)}
                        pair = structure == "pair"
                        chosen = self.layers if layer is None else (layer,)
                        out.append((key, ProjectConfig(method=method if pair else "pca", structure=structure,
                                                       damping=self.damping if pair else None, seed=self.seed,
                                                       layers=chosen, exclude=None if layer else self.exclude,
                                                       **how)))
        return out


PER_LAYER_KEEPS = (("keep", 0.75), ("keep", 0.5), ("keep", 0.25))


def sweep_layers(model: nn.Module, contract: InputContract, stats: StatsFile | None, config: SweepConfig,
                 where: str = "the statistics") -> dict[str, list[str]]:
    """Per structure, the layers a per-layer sweep takes one at a time: the targets ``project`` would work on
    (pairs), the measured chains' producers (channels), as ``config.layers`` / ``exclude`` select them."""
    out = {}
    layers, exclude = list(config.layers or []) or None, list(config.exclude or []) or None
    if "pair" in config.structures:
        chosen = ProjectConfig(keep=1.0, layers=config.layers, exclude=config.exclude)
        out["pair"] = [t.name for t in project_targets(model, contract, stats, chosen, where)]
    if "channels" in config.structures:
        out["channels"] = [c.producer for c in fitting_chains(model, contract, stats, where, layers, exclude)[0]]
    return out


def check_sweep_inputs(stats: StatsFile | None, config: SweepConfig, train_set: Dataset | None,
                       refit_set: Dataset | None, profile: Profile | None) -> None:
    """Refuse, before any work, inputs that lack what one of the swept points needs."""
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
    if profile is None and any(kind == "latency" for kind, _ in config.budgets):
        raise RankcutError("--latency budgets need --profile P.json (make one with: rankcut profile CHECKPOINT "
                           "-o P.json)")
    if (config.finetune_epochs and train_set is None) or (config.refit and refit_set is None):
        raise RankcutError("--refit and --finetune-epochs need --train-data T (the data to refit and train on; "
                           "never the evaluation data)")


def sweep(model: nn.Module, contract: InputContract, stats: StatsFile | None, dataset: Dataset, classes: int,
          config: SweepConfig, *, train_set: Dataset | None = None, refit_set: Dataset | None = None,
          profile: Profile | None = None,
          cache: SweepCache | None = None, where: str = "the statistics", ctx: dist.Context | None = None,
          progress=None, on_point: Callable[[dict, nn.Module, object, dict], None] | None = None) -> dict:
    """Project a copy of ``model`` (left as it is) at every point of ``config`` and evaluate it against ``model``.

    ``model`` is on the CPU, as ``project`` loads it; each copy is evaluated on ``ctx.device``. ``train_set``:
    the data points are fine-tuned on, and refitted on unless ``refit_set`` is given (``rankcut sweep`` opens the
    training data with training transforms for the one and evaluation transforms for the other, as ``finetune``
    and ``refit`` do), when ``config`` asks. ``profile``: a latency profile of
    ``model``, given to every pair point and to channels points of a latency budget, as ``project`` takes it. ``cache``: the
    points of an earlier sweep from the same inputs and options are reused by key, and the file is rewritten
    after every new point (``run.sweepcache``). ``on_point(point, model, project_result, original)`` is
    called after each new point (what it adds to ``point`` is kept). Returns ``summarize``'s dict plus
    ``computed`` and ``reused`` counts (and ``inputs``, the fingerprint, with a cache). ``dataset`` must be
    labelled (top-1 orders the points).
    """
    refit_set = train_set if refit_set is None else refit_set
    check_sweep_inputs(stats, config, train_set, refit_set, profile)
    _check_labels(dataset, classes, "the sweep's data", "a sweep orders its points by top-1 and needs labelled data")
    if config.finetune_epochs:
        _check_labels(train_set, classes, "the training data", "--finetune-epochs trains on labels (--refit alone "
                      "needs none)")
    if config.refit:
        _check_labels(refit_set, classes, "the refit data")
    ctx = ctx or dist.Context(0, 1, next(model.parameters()).device)
    fingerprint = {**(cache.inputs if cache else {}), **config.fingerprint(), "device": ctx.device.type}
    known = (cache.read(fingerprint) if cache else None) or {}
    cached = {point_key(p): p for p in known.get("points", [])}
    original = known.get("original")
    todo = config.configs(sweep_layers(model, contract, stats, config, where) if config.per_layer else None)
    reference = copy.deepcopy(model).to(ctx.device)
    done: dict[tuple, dict] = {}
    written = dict(cached)  # what the cache file holds: the reusable points and every new one
    task = progress.add_task("sweep", total=sum(k not in cached for k, _ in todo), info="") if progress else None
    for key, project_config in todo:
        if key in cached:
            done[key] = {k: v for k, v in cached[key].items() if k != "pareto"}
            continue
        structure, method, kind, fraction, layer = key
        if task is not None:
            at = "" if layer is None else f" {layer}"
            progress.update(task, info=f"{label(dict(structure=structure, method=method))}{at} {kind} {fraction:g}")
        small = copy.deepcopy(model)
        result = project(small, contract, stats, project_config, where,
                         profile=profile if structure == "pair" or kind == "latency" else None)
        small.to(ctx.device)
        steps, history = _after_project(small, reference, contract, dataset, (refit_set, train_set), classes,
                                        config, ctx, progress)
        figures = evaluate([small], contract, dataset, classes, config.eval, reference=reference, ctx=ctx,
                           progress=progress)[0]
        ref = figures["reference"]
        if figures["top1"] is None:
            raise RankcutError("the sweep's data has no labelled samples; a sweep orders its points by top-1")
        original = {**{k: ref[k] for k in ("top1", "topk", "loss", "macs", "params")},
                    **{k: figures[k] for k in ("k", "samples", "labeled")}}
        point = {"structure": structure, "method": method, "kind": kind, "fraction": fraction,
                 **{k: figures[k] for k in SWEEP_FIGURES}, "changed": len(result.edits), **steps,
                 **({"latency": figures["latency"]} if "latency" in figures else {})}
        if layer is not None:
            point = {"layer": layer, **point, **_layer_change(result, layer)}
        done[key] = written[key] = point
        if on_point is not None:
            on_point(point, small, result, original)
        if cache is not None:
            cache.keep(point, small, result.edits, _history(result, history, cache.inputs))
            cache.write(fingerprint, {**summarize(original, list(written.values()), config.within, config.per_layer,
                                                  config.cost), "complete": False})
        if task is not None:
            progress.advance(task)
    if original is None:  # nothing new and no figures of the original known: evaluate it alone
        figures = evaluate([reference], contract, dataset, classes, config.eval, ctx=ctx, progress=progress)[0]
        original = {k: figures[k] for k in ("top1", "topk", "loss", "macs", "params", "k", "samples", "labeled")}
    points = [done[k] for k, _ in todo]
    computed = sum(k not in cached for k, _ in todo)
    out = {**summarize(original, points, config.within, config.per_layer, config.cost), "computed": computed,
           "reused": len(points) - computed}
    if cache is not None:
        cache.write(fingerprint, {**out, "complete": True})
        out = {"inputs": fingerprint, **out, "complete": True}
    return out


def _check_labels(dataset: Dataset, classes: int, what: str, labelled: str | None = None) -> None:
    """Refuse, before any work, labels the model cannot predict, and with ``labelled`` (why labels are needed)
    unlabelled samples."""
    check_dataset_labels(dataset, classes, False, what)
    labels = known_labels(dataset)
    if labelled is not None and labels is not None and bool((labels == UNLABELED).any()):
        raise RankcutError(f"{what} has unlabelled samples; {labelled}")


def _history(result: ProjectResult | PruneResult, steps: list[tuple[str, dict]],
             inputs: dict) -> list[tuple[str, dict]]:
    """A kept point's history entries: ``project``'s as ``rankcut project`` writes it for the same point, then
    the refit and fine-tuning steps, with the digests of the input files where the cache knows them."""
    def short(key: str) -> str | None:
        return inputs[key][:16] if inputs.get(key) else None

    profile = {"profile": short("profile")} if inputs.get("profile") else {}
    data = {"data": inputs.get("train_data")}
    more = {"refit": {**data, "teacher": short("checkpoint")}, "finetune": data}
    return [("project", {**result.history(), "stats": short("stats"), **profile}),
            *((command, {**details, **more[command]}) for command, details in steps)]


def _after_project(small: nn.Module, reference: nn.Module, contract: InputContract, dataset: Dataset,
                   training: tuple[Dataset | None, Dataset | None], classes: int, config: SweepConfig,
                   ctx: dist.Context, progress) -> tuple[dict, list[tuple[str, dict]]]:
    """Refit and fine-tune a projected point as ``config`` asks, on ``training`` (the refit data, the training
    data); per step, what it did and the top-1 before it (on the sweep's data), and the history entries a kept
    checkpoint records."""
    steps, history = {}, []
    refit_data, train_set = training

    def top1() -> float:
        return evaluate_many([small], dataset, classes, device=ctx.device, batch_size=config.eval.batch_size,
                             workers=config.eval.workers, ctx=ctx, progress=progress)[0]["top1"]

    if config.refit:
        before = top1()
        refit_set = subset(refit_data, config.refit_samples, config.seed)
        done = refit(small, reference, contract, refit_set, RefitConfig(batch_size=config.eval.batch_size,
                                                                        workers=config.eval.workers),
                     ctx=ctx, progress=progress)
        steps["refit"] = {"top1_before": before, "samples": done.samples,
                          "layers": sum(r.status == "refit" for r in done.layers)}
        history.append(("refit", done.history()))
    if config.finetune_epochs:
        before = top1()
        train = TrainConfig(epochs=config.finetune_epochs, batch_size=config.eval.batch_size, seed=config.seed,
                            workers=config.eval.workers)
        last = fit(small, train_set, train, ctx, classes=classes, progress=progress)[-1]
        steps["finetune"] = {"top1_before": before, "epochs": config.finetune_epochs, "samples": len(train_set),
                             "loss": last.loss, "train_top1": last.acc}
        history.append(("finetune", {**train.to_dict(), "samples": len(train_set), "loss": last.loss,
                                     "acc": last.acc}))
    return steps, history


def _layer_change(result: ProjectResult | PruneResult, layer: str) -> dict:
    """A per-layer point's layer: its rank (pairs) or channels (chains) before and after, and what happened."""
    if isinstance(result, PruneResult):
        row = next(r for r in result.chains if r["producer"] == layer)
        return {"before": row["channels"], "after": row["kept"], "status": row["status"]}
    report = next(r for r in result.layers if r.layer == layer)
    return {"before": report.old_rank, "after": report.new_rank, "status": report.status}
