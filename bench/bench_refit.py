"""``rankcut refit`` and ``project --sequential`` on real digits (issue 15): top-1 projected (from the ordinary
statistics and with ``--sequential``), projected + refit, each followed by one fine-tune epoch, and refit's
wall time against that epoch's.

``rankcut:mnist-cnn`` and ``torchvision:resnet18`` (3x28x28, the digits repeated to 3 channels), each trained
briefly on ``mnist5k:train``; at each MACs fraction, project with ``--macs F`` (pca, and fisher from ``stats
--grad kl``), and again with ``--sequential`` (the same ranks, each basis measured on the model with the
layers before it projected, on the statistics' images); refit the plain projection against the trained base
on 256 and 1,024 training images (no labels) and evaluate on ``mnist5k:test`` (1,000 digits: differences
under about 1.5 points are noise); the base and its statistics in ``--work`` are reused. The projected model
and the refit on the most samples are each fine-tuned for one epoch (4,000 images, ``--seed 0``) at each peak
learning rate of ``--finetune-lr`` (one or a grid); with a grid, each pipeline's column is its best top-1 over
the grid, with the rate that gave it. The projected model's epoch at the first rate, run just before the
refits, is the one refit's wall time is compared with.

    python bench/bench_refit.py [--work DIR] [--archs rankcut:mnist-cnn torchvision:resnet18]
        [--fractions 0.25 0.125 0.0625 0.03125] [--refit-samples 256 1024] [--finetune-lr 1e-3 [3e-4 1e-4]]
        [--no-sequential] [--no-finetune]
    python bench/bench_refit.py --alternate SMALL BASE [--rounds 3] [--positions 16]

``--alternate`` only times ``refit SMALL --teacher BASE`` (256 samples) against one ``finetune`` epoch of SMALL,
alternated round by round with one torch thread, in CPU seconds (the work done, which preemption by other
jobs does not change) and wall seconds, after one ``eval`` has paid the imports for both. ``--positions N``
passes ``refit --positions N`` (N random output positions per sample) to every refit of a run, and with
``--alternate`` times that refit too.

Every step is the rankcut CLI run in this process (``--json``), so the numbers are what a user gets.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from common import machine, rankcut, show

TRAIN, TEST = "mnist5k:train", "mnist5k:test"
INIT = {"rankcut:mnist-cnn": [], "torchvision:resnet18": ["--num-classes", "10", "--input", "3,28,28"]}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def accuracy(checkpoint: Path) -> float:
    return rankcut("eval", checkpoint, "--data", TEST, "--batch-size", 250, "--device", "cpu")["results"][0]["top1"]


def timed(*args) -> tuple[dict, float]:
    start = time.perf_counter()
    result = rankcut(*args)
    return result, time.perf_counter() - start


def epoch(checkpoint: Path, out: Path, lr: float) -> tuple[float, float]:
    """One fine-tune epoch (seed 0, peak learning rate ``lr``): the tuned model's top-1 and the epoch's wall time."""
    _, seconds = timed("finetune", checkpoint, "--data", TRAIN, "--epochs", 1, "--batch-size", 64, "--seed", 0,
                       "--lr", lr, "--device", "cpu", "-o", out, "--force")
    return accuracy(out), seconds


def best_epoch(checkpoint: Path, out: Path, lrs: list[float]) -> tuple[tuple[float, float], float]:
    """One fine-tune epoch at each peak rate of ``lrs``: the best (top-1, rate) and the first rate's wall time."""
    runs = [(*epoch(checkpoint, out, lr), lr) for lr in lrs]
    top1, _, lr = max(runs, key=lambda run: run[0])
    return (top1, lr), runs[0][1]


def figure(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def tuned(result: tuple[float, float] | None, grid: list[float]) -> str:
    """A fine-tuned top-1, with the rate that gave it when there was a grid to choose from."""
    if result is None:
        return "-"
    return f"{result[0]:.4f}" + (f" ({result[1]:g})" if len(grid) > 1 else "")


def run_arch(arch: str, work: Path, args) -> tuple[list[dict], float]:
    """Every row of one architecture, and its base's top-1."""
    name = arch.split(":")[1]
    base0, base, stats = work / f"{name}-init.safetensors", work / f"{name}.safetensors", work / f"{name}.stats.npz"
    if not base.exists():
        rankcut("init", "--arch", arch, *INIT[arch], "--seed", "0", "-o", base0, "--force")
        rankcut("finetune", base0, "--data", TRAIN, "--epochs", args.base_epochs, "--lr", 2e-3, "--batch-size", 64,
                "--seed", "0", "--device", "cpu", "-o", base, "--force")
    top1 = accuracy(base)
    log(f"{arch}: base top-1 {top1:.4f}")
    if not stats.exists():
        rankcut("stats", base, "--data", TRAIN, "--samples", args.samples, "--grad", "kl", "--device", "cpu",
                "-o", stats, "--force")
    rows = []
    for fraction in args.fractions:
        for method in args.methods:
            tag = f"{name}-{method}-{fraction}"
            small, sequential = work / f"{tag}.safetensors", work / f"{tag}.seq.safetensors"
            budget = ["--stats", stats, "--method", method, "--macs", fraction]
            rankcut("project", base, *budget, "-o", small, "--force")
            row = {"arch": arch, "fraction": fraction, "method": method, "projected": accuracy(small),
                   "sequential": None, "sequential_s": None}
            if not args.no_sequential:
                _, row["sequential_s"] = timed("project", base, *budget, "--sequential", "--data", TRAIN, "--samples",
                                               args.samples, "--device", "cpu", "-o", sequential, "--force")
                row["sequential"] = accuracy(sequential)
            if not args.no_finetune:
                row["tuned"], row["epoch_s"] = best_epoch(small, work / f"{tag}.tuned.safetensors", args.finetune_lr)
            for n in args.refit_samples:
                out = work / f"{tag}.refit{n}.safetensors"
                _, row[f"refit_s_{n}"] = timed("refit", small, "--teacher", base, "--data", TRAIN, "--samples",
                                               n, *positions(args.positions), "--device", "cpu", "-o", out, "--force")
                row[f"refit_{n}"] = accuracy(out)
            most = max(args.refit_samples)
            if not args.no_finetune:
                row["refit_tuned"], _ = best_epoch(work / f"{tag}.refit{most}.safetensors",
                                                   work / f"{tag}.refit{most}.tuned.safetensors", args.finetune_lr)
            rows.append(row)
            log(f"{tag}: {row}")
    return rows, top1


def positions(n: int | None) -> list:
    return [] if n is None else ["--positions", n]


def alternate(small: str, base: str, rounds: int, sampled: int | None) -> None:
    """Refit (256 samples; also with ``--positions sampled``) against one fine-tune epoch, alternated, in CPU
    and wall seconds (one thread)."""
    torch.set_num_threads(1)
    rankcut("eval", small, "--data", TEST, "--device", "cpu")  # imports and first calls: paid by neither side
    refit = ("refit", small, "--teacher", base, "--data", TRAIN, "--samples", 256)
    commands = {"refit 256": refit, **({} if sampled is None else {
                    f"refit 256 --positions {sampled}": (*refit, *positions(sampled))}),
                "1 epoch": ("finetune", small, "--data", TRAIN, "--epochs", 1, "--batch-size", 64, "--seed", 0)}
    seconds = {name: [] for name in commands}
    loads = []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(rounds):
            for name, args in commands.items():
                cpu, wall = time.process_time(), time.perf_counter()
                rankcut(*args, "--device", "cpu", "-o", Path(tmp) / "out.safetensors", "--force")
                seconds[name].append((time.process_time() - cpu, time.perf_counter() - wall))
                loads.append(os.getloadavg()[0])
    table = Table("", "CPU s (median)", "wall s (median)", "CPU s, each round", title=f"refit against one epoch of "
                  f"{small}, alternated, 1 thread", title_justify="left",
                  caption=f"load average (1 min) {min(loads):.1f}-{max(loads):.1f}", caption_justify="left")
    medians = {name: [statistics.median(x[i] for x in runs) for i in (0, 1)] for name, runs in seconds.items()}
    for name, runs in seconds.items():
        table.add_row(name, f"{medians[name][0]:.2f}", f"{medians[name][1]:.2f}", ", ".join(f"{c:.2f}" for c, _ in runs))
    ec, ew = medians["1 epoch"]
    for name in commands:
        if name != "1 epoch":
            rc, rw = medians[name]
            table.add_row(f"{name} / epoch", f"{rc / ec:.2f}", f"{rw / ew:.2f}", "")
    show(table)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--work", help="Folder for the checkpoints (default: a temporary one); a trained base there is "
                   "reused.")
    p.add_argument("--archs", nargs="+", default=list(INIT))
    p.add_argument("--fractions", nargs="+", type=float, default=[0.25, 0.125, 0.0625, 0.03125])
    p.add_argument("--methods", nargs="+", default=["pca", "fisher"])
    p.add_argument("--refit-samples", nargs="+", type=int, default=[256, 1024])
    p.add_argument("--samples", type=int, default=1000, help="Training images for the statistics (and --sequential).")
    p.add_argument("--base-epochs", type=int, default=2)
    p.add_argument("--no-finetune", action="store_true", help="Skip the fine-tune epochs (their columns show -).")
    p.add_argument("--finetune-lr", type=float, nargs="+", default=[1e-3], help="Peak learning rate(s) of both "
                   "fine-tune epochs (finetune's default 1e-3); with several, each pipeline's best.")
    p.add_argument("--no-sequential", action="store_true", help="Skip project --sequential (its columns show -).")
    p.add_argument("--alternate", nargs=2, metavar=("SMALL", "BASE"), help="Only time refit against an epoch.")
    p.add_argument("--rounds", type=int, default=3, help="With --alternate: rounds of refit then epoch.")
    p.add_argument("--positions", type=int, help="refit --positions N in every refit (with --alternate: as well).")
    args = p.parse_args()
    if args.alternate:
        alternate(*args.alternate, args.rounds, args.positions)
        return
    started = time.perf_counter()
    start_load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    rows, tops = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        for arch in args.archs:
            arch_rows, tops[arch] = run_arch(arch, work, args)
            rows += arch_rows
    most, least = max(args.refit_samples), min(args.refit_samples)
    table = Table("model", "MACs budget", "method", "top-1 projected", "top-1 --sequential",
                  *(f"top-1 refit {n}" for n in args.refit_samples), f"gap closed by refit {least}",
                  "top-1 projected + 1 epoch", f"top-1 refit {most} + 1 epoch",
                  *(f"refit {n} s" for n in args.refit_samples), "1 epoch s", "--sequential s",
                  *(f"refit {n} / epoch" for n in args.refit_samples),
                  title=f"on mnist5k: base top-1 {', '.join(f'{a} {t:.4f}' for a, t in tops.items())} after "
                  f"{args.base_epochs} epochs; stats on {args.samples} images (--grad kl); one fine-tune epoch: "
                  f"4,000 images, batch 64, --lr {' '.join(f'{lr:g}' for lr in args.finetune_lr)}"
                  + (" (each pipeline's best)" if len(args.finetune_lr) > 1 else "") + ("" if args.positions is None else
                                              f"; refit --positions {args.positions}"), title_justify="left")
    for r in rows:
        if args.no_finetune:
            r.update(tuned=None, refit_tuned=None, epoch_s=None)
        gap = tops[r["arch"]] - r["projected"]
        closed = f"{(r[f'refit_{least}'] - r['projected']) / gap:.0%}" if gap > 0 else "no gap"
        table.add_row(r["arch"].split(":")[1], f"{100 * r['fraction']:.3g}%", r["method"], f"{r['projected']:.4f}",
                      figure(r["sequential"], ".4f"), *(f"{r[f'refit_{n}']:.4f}" for n in args.refit_samples), closed,
                      tuned(r["tuned"], args.finetune_lr), tuned(r["refit_tuned"], args.finetune_lr),
                      *(f"{r[f'refit_s_{n}']:.1f}" for n in args.refit_samples), figure(r["epoch_s"], ".1f"),
                      figure(r["sequential_s"], ".1f"),
                      *(figure(r["epoch_s"] and r[f"refit_s_{n}"] / r["epoch_s"], ".2f") for n in args.refit_samples))
    show(table)
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    Console(width=160).print(f"{machine()}; whole run {time.perf_counter() - started:.0f} s; load average at the end "
                             f"{load} (started at {start_load})")


if __name__ == "__main__":
    main()
