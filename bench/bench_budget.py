"""Global budget (``project --macs F``) against uniform ``--keep`` at equal MACs, on real digits (issue 6).

For ``rankcut:mnist-cnn`` and ``torchvision:resnet18`` (3x28x28), each trained briefly on ``mnist5k:train``:
at each MACs fraction, project with ``--macs F`` and with the largest uniform ``--keep`` whose MACs stay
within the same budget (found by bisection on the exact cost model, then checked on the projected model),
for pca and for fisher (``stats --grad kl``), all in one ``rankcut.api.sweep``; then fine-tune each point's
checkpoint for one epoch with the same settings and report test accuracy on ``mnist5k:test`` before and after.

    python bench/bench_budget.py [--work DIR] [--archs rankcut:mnist-cnn torchvision:resnet18] [--samples 1000]

Training, statistics and fine-tuning are the rankcut CLI run in this process (``--json``) and the points are
what ``rankcut sweep`` computes, so the numbers are what a user gets.
The test set has 1,000 digits: differences under about 1% are within noise. Took 6.5 min (mnist-cnn) and
29 min (resnet18) on 2 cores shared with other jobs (load average ~8); most of it is fine-tuning and the
``--grad kl`` statistics pass.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from common import machine, rankcut, show, sweep_checkpoint
from rankcut.api import EvalConfig, SweepConfig
from rankcut.compress.budget import layer_options, ranks_from_keep
from rankcut.files.checkpoint import load_with_meta
from rankcut.model.cost import count_macs
from rankcut.model.targets import select

INIT = {"rankcut:mnist-cnn": [], "torchvision:resnet18": ["--num-classes", "10", "--input", "3,28,28"]}
TRAIN, TEST = "mnist5k:train", "mnist5k:test"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def accuracy(checkpoint: Path) -> float:
    return rankcut("eval", checkpoint, "--data", TEST, "--batch-size", 250)["results"][0]["top1"]


def uniform_keep(checkpoint: Path, fraction: float) -> float:
    """The largest --keep (to 1e-4) whose projected model has at most ``fraction`` of the MACs.

    Uses the exact cost model of rankcut.budget: a layer whose rank would not save MACs stays whole,
    as ``project`` does.
    """
    model, meta = load_with_meta(str(checkpoint))
    total, per = count_macs(model, meta.input)
    targets = select(model, meta.input)
    options = [layer_options(model, t, per, torch.zeros(100_000)) for t in targets]
    fixed = total - sum(int(o.macs[-1]) for o in options)

    def macs(keep: float) -> int:
        ranks = ranks_from_keep(model, [t.name for t in targets], keep)
        cost = fixed
        for o in options:
            hit = (o.ranks == ranks[o.name]).nonzero()[0]
            cost += int(o.macs[hit[0]] if len(hit) else o.macs[-1])
        return cost

    lo, hi = 1e-6, 1.0
    if macs(lo) > fraction * total:
        raise RuntimeError(f"uniform --keep cannot reach {fraction} of the MACs")
    while hi - lo > 1e-4:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if macs(mid) <= fraction * total else (lo, mid)
    return lo


def run_arch(arch: str, work: Path, args) -> tuple[list[dict], dict]:
    name = arch.split(":")[1]
    base0, base = work / f"{name}-init.safetensors", work / f"{name}.safetensors"
    start = time.perf_counter()
    if not (args.reuse and base.exists()):
        rankcut("init", "--arch", arch, *INIT[arch], "--seed", "0", "-o", base0, "--force")
        rankcut("finetune", base0, "--data", TRAIN, "--epochs", args.base_epochs, "--lr", 2e-3, "--batch-size", 64,
                "--seed", "0", "-o", base, "--force")
    info = {"arch": arch, "train_s": time.perf_counter() - start}
    log(f"{arch}: trained {args.base_epochs} epochs in {info['train_s']:.0f} s")
    stats = work / f"{name}.stats.npz"
    start = time.perf_counter()
    rankcut("stats", base, "--data", TRAIN, "--samples", args.samples, "--grad", "kl", "-o", stats, "--force")
    info["stats_s"] = time.perf_counter() - start
    keeps = {uniform_keep(base, fraction): fraction for fraction in args.fractions}  # the uniform twin of each budget
    config = SweepConfig(methods=tuple(args.methods), budgets=tuple(("macs", f) for f in args.fractions) + tuple(
        ("keep", k) for k in keeps), eval=EvalConfig(batch_size=250))

    def tune(point: dict, small: Path) -> None:
        tuned = small.with_name(f"{small.stem}.tuned.safetensors")
        rankcut("finetune", small, "--data", TRAIN, "--epochs", 1, "--lr", args.lr, "--batch-size", 64,
                "--seed", "0", "-o", tuned, "--force")
        point["after"] = accuracy(tuned)
        log(f"{small.stem}: MACs x{point['ratios']['macs']:.4f}, top-1 {point['top1']:.4f} -> {point['after']:.4f} "
            "after 1 epoch")

    result = sweep_checkpoint(base, stats, TEST, config, after=tune)
    info["top1"] = result["original"]["top1"]
    by_key = {(p["method"], p["kind"], p["fraction"]): p for p in result["points"]}
    rows = []
    for fraction in args.fractions:
        keep = next(k for k, f in keeps.items() if f == fraction)
        for method in args.methods:
            for alloc in ("budget", "uniform"):
                p = by_key[(method, "macs", fraction) if alloc == "budget" else (method, "keep", keep)]
                assert p["ratios"]["macs"] <= fraction, (method, alloc, fraction)
                rows.append({"arch": arch, "fraction": fraction, "method": method, "alloc": alloc,
                             "keep": None if alloc == "budget" else keep, "macs": p["ratios"]["macs"],
                             "params": p["ratios"]["params"], "before": p["top1"], "after": p["after"],
                             "ranks": p["ranks"]})
    return rows, info


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--work", help="Folder for the checkpoints (default: a temporary one).")
    p.add_argument("--archs", nargs="+", default=list(INIT))
    p.add_argument("--fractions", nargs="+", type=float, default=[0.5, 0.25, 0.125, 0.0625])
    p.add_argument("--methods", nargs="+", default=["pca", "fisher"])
    p.add_argument("--samples", type=int, default=1000, help="Training images for the statistics.")
    p.add_argument("--base-epochs", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-3, help="Peak learning rate of the 1-epoch fine-tune.")
    p.add_argument("--reuse", action="store_true", help="Keep trained base checkpoints already in --work.")
    p.add_argument("--json", help="Also write the rows to this JSON file.")
    args = p.parse_args()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        results = [run_arch(arch, work, args) for arch in args.archs]
    rows = [r for rs, _ in results for r in rs]
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "bases": [i for _, i in results]}, indent=1))
    for arch_rows, info in results:
        table = Table("MACs budget", "method", "allocation", "MACs", "params", "top-1 projected", "top-1 +1 epoch",
                      title=f"{info['arch']} on mnist5k: base top-1 {info['top1']:.4f} after {args.base_epochs} "
                      f"epochs; stats on {args.samples} images (--grad kl); fine-tune 1 epoch at lr {args.lr:g}",
                      title_justify="left")
        for r in arch_rows:
            alloc = "--macs" if r["alloc"] == "budget" else f"--keep {r['keep']:.4f}"
            table.add_row(f"{100 * r['fraction']:.2f}%", r["method"], alloc, f"x{r['macs']:.4f}", f"x{r['params']:.4f}",
                          f"{r['before']:.4f}", f"{r['after']:.4f}")
            if r["alloc"] == "uniform" and r["method"] == args.methods[-1]:
                table.add_section()
        show(table)
    Console(width=160).print(f"{machine()}; whole run {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
