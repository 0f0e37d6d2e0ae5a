"""Methods compared on real digits before and after fine-tuning, and the cost of ``stats --grad`` (issue 4).

    python bench/bench_methods.py [--out DIR] [--epochs 4] [--quick]

Trains ``rankcut:mnist-cnn`` on mnist5k:train with a fixed seeded recipe, gathers statistics with
``--grad kl`` and ``--grad mse``, then sweeps every method over ``--keep`` in 0.5 ... 0.03125 with
``rankcut.api.sweep`` (one sweep per statistics file): MACs and test accuracy right after ``project``; each
point's checkpoint then gets the same 1-epoch ``finetune``. Training, statistics and fine-tuning are the real
CLI, in-process.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from rich.table import Table

from common import machine, rankcut, show, sweep_checkpoint
from rankcut.api import EvalConfig, SweepConfig
from rankcut.model import archs
from rankcut.dist import Context
from rankcut.stats.collect import collect_gradients, collect_moments
from rankcut.model.targets import select

KEEPS = (0.5, 0.25, 0.125, 0.0625, 0.03125)
METHODS = [("pca", "kl"), ("hessian", "kl"), ("hessian", "mse"), ("fisher", "kl"), ("fisher", "mse"),
           ("svd", None), ("l1", "kl"), ("random", None)]
TUNE = ["--epochs", "1", "--lr", "1e-3", "--batch-size", "64", "--seed", "0", "--quiet"]


def accuracy(ckpt: Path) -> dict:
    return rankcut("eval", ckpt, "--data", "mnist5k:test", "--batch-size", "500", "--quiet")["results"][0]


def grad_cost(images: int, batch: int) -> tuple[float, float, float]:
    """Seconds of a plain forward pass, ``stats``, and ``stats --grad kl`` for resnet18 at 3x224x224."""
    torch.manual_seed(0)
    model = archs.build("torchvision:resnet18", {}).eval()
    contract = archs.default_input("torchvision:resnet18", {})
    x = torch.rand(images, *contract.shape)
    batches = [(x[i:i + batch], None) for i in range(0, images, batch)]
    ctx = Context(0, 1, torch.device("cpu"))
    targets = select(model, contract)
    with torch.inference_mode():
        model(batches[0][0])
        start = time.perf_counter()
        for b, _ in batches:
            model(b)
        forward = time.perf_counter() - start
    start = time.perf_counter()
    moments = collect_moments(model, targets, batches, ctx)
    stats = time.perf_counter() - start
    collect_gradients(model, targets, batches, moments, "kl", 1, 0, ctx)
    return forward, stats, time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 1,000 training images, 1 epoch, keep 0.25, pca/fisher/svd, a small cost pass")
    args = p.parse_args()
    keeps, methods, samples, subset = KEEPS, METHODS, 2000, []
    if args.quick:
        keeps, methods, samples, subset = (0.25,), [("pca", "kl"), ("fisher", "kl"), ("svd", None)], 500, ["-n", 1000]
        args.epochs = 1
    out = args.out or Path(tempfile.mkdtemp(prefix="rankcut-bench-"))
    out.mkdir(parents=True, exist_ok=True)

    base = out / "base.safetensors"
    rankcut("init", "--arch", "rankcut:mnist-cnn", "--seed", "0", "-o", out / "init.safetensors")
    rankcut("finetune", out / "init.safetensors", "--data", "mnist5k:train", "-o", base, "--epochs", args.epochs,
            "--lr", "2e-3", "--batch-size", "32", "--seed", "0", "--quiet", *subset)
    for loss in sorted({loss for _, loss in methods if loss}):
        rankcut("stats", base, "--data", "mnist5k:train", "--samples", samples, "--grad", loss, "--probes", "2",
                "-o", out / f"stats-{loss}.npz", "--quiet")

    def tune(point: dict, small: Path) -> None:
        tuned = small.with_name(f"{small.stem}-ft.safetensors")
        rankcut("finetune", small, "--data", "mnist5k:train", "-o", tuned, *TUNE, *subset)
        point["tuned"] = accuracy(tuned)["top1"]

    points, original = {}, None
    for loss in dict.fromkeys(loss for _, loss in methods):  # one sweep per statistics file
        names = tuple(m for m, m_loss in methods if m_loss == loss)
        config = SweepConfig(methods=names, budgets=tuple(("keep", k) for k in keeps), eval=EvalConfig(batch_size=500))
        stats = out / f"stats-{loss}.npz" if loss else None
        result = sweep_checkpoint(base, stats, "mnist5k:test", config, after=tune, tag=f"-{loss or 'nostats'}")
        original = result["original"]
        points |= {(p["method"], loss, p["fraction"]): p for p in result["points"]}

    table = Table("method", "keep", "MACs", "acc. projected", "acc. +1 epoch", title=(
        f"rankcut:mnist-cnn on mnist5k (trained {args.epochs} epochs: {100 * original['top1']:.2f}% test, "
        f"{original['macs']:,} MACs)"), title_justify="left")
    headline = {}
    for method, loss in methods:
        name = method if method in ("pca", "svd", "l1", "random") else f"{method} ({loss})"
        headline[name] = None
        for keep in keeps:
            point = points[(method, loss, float(keep))]
            fraction = point["ratios"]["macs"]
            if original["top1"] - point["top1"] <= 0.01:
                headline[name] = min(fraction, headline[name] or 1.0)
            table.add_row(name, str(keep), f"{fraction:.3f}", f"{100 * point['top1']:.2f}%",
                          f"{100 * point['tuned']:.2f}%")
        table.add_section()
    show(table)

    summary = Table("method", "smallest MACs fraction within 1 point before fine-tuning",
                    title="headline", title_justify="left")
    for name, fraction in headline.items():
        summary.add_row(name, "none tried" if fraction is None else f"{fraction:.3f}")
    show(summary)

    images, batch = (16, 8) if args.quick else (256, 32)
    forward, stats, grad = grad_cost(images, batch)
    cost = Table(f"pass over {images} images, batch {batch}", "seconds", "x forward",
                 title="torchvision:resnet18 3x224x224, CPU", title_justify="left")
    for label, seconds in (("plain forward", forward), ("stats", stats), ("stats --grad kl (target <= 4.5x)", grad)):
        cost.add_row(label, f"{seconds:.2f}", f"{seconds / forward:.2f}")
    show(cost)
    print(f"files in {out}; {machine()}")


if __name__ == "__main__":
    main()
