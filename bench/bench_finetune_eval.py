"""What halving every target's rank buys: MACs, parameters, CPU latency, and fine-tuning throughput.

For ``torchvision:resnet18`` (3x224x224) and ``rankcut:mnist-cnn`` (1x28x28), random weights: the original
against a copy where every default target (all convs/linears but the output layer) is projected to half
its rank with the data-free ``svd`` method. Layers where half the rank would not save MACs (e.g. ResNet's
1x1 downsampling convs, which widen) stay whole, as ``rankcut project`` leaves them. The basis does not
change cost, so an SVD stands in for the data-driven methods here; accuracy is not measured.

    python bench/bench_finetune_eval.py [--threads N] [--archs rankcut:mnist-cnn] [--rounds 7]
"""

from __future__ import annotations

import argparse
import time

import torch
from rich.console import Console
from rich.table import Table

from common import show
from rankcut.model import archs
from rankcut.files.checkpoint import CheckpointMeta
from rankcut.run.data import open_data
from rankcut.dist import Context
from rankcut.run.evaluate import output_classes
from rankcut.run.latency import compare_models
from rankcut.model.layers import current_rank
from rankcut.model.cost import count_macs, count_params
from rankcut.compress.project import project_model
from rankcut.model.targets import select
from rankcut.run.train import TrainConfig, fit

CASES = {  # arch: (fine-tuning batch size, synthetic images per fine-tuning epoch)
    "torchvision:resnet18": (16, 64),
    "rankcut:mnist-cnn": (64, 2048),
}


def halved(model: torch.nn.Module, meta: CheckpointMeta) -> torch.nn.Module:
    """``model`` with every default target projected to half its rank (SVD basis)."""
    targets = select(model, meta.input)
    ranks = {t.name: max(1, round(0.5 * current_rank(model.get_submodule(t.name)))) for t in targets}
    project_model(model, targets, {}, "svd", ranks)
    return model


def paired_latency(a: torch.nn.Module, b: torch.nn.Module, meta: CheckpointMeta, batch: int,
                   rounds: int = 7) -> tuple[float, float, float]:
    """Median latency of ``a`` and ``b`` and the median of their pairwise ratios (``run.latency.compare_models``:
    the two take turns in short rounds, so load from other processes hits both alike), over at least ``rounds``."""
    fa, fb = compare_models([a, b], meta.input, batch, torch.device("cpu"), min_rounds=rounds)
    return fa["batch_ms"], fb["batch_ms"], fb["ratio"]


def train_throughput(model: torch.nn.Module, meta: CheckpointMeta, batch: int, images: int) -> float:
    """Images per second of the second of two fine-tuning epochs on synthetic data (the first warms up)."""
    classes = output_classes(model, meta.input)
    data = open_data(f"synthetic:{images}", meta.input, train=True, num_classes=classes)
    summaries = fit(model, data, TrainConfig(epochs=2, batch_size=batch), Context(0, 1, torch.device("cpu")),
                    classes=classes)
    return summaries[-1].images_per_s


def measure(arch: str, rounds: int = 7) -> list[tuple[str, float, float, float]]:
    """(figure, original, compressed) rows for one architecture."""
    meta = CheckpointMeta(arch, {}, archs.default_input(arch, {}))
    torch.manual_seed(0)
    original = archs.build(arch).eval()
    compressed = halved(archs.build(arch).eval(), meta)
    rows = []
    for label, fn in [("MACs", lambda m: count_macs(m, meta.input)[0]), ("params", count_params)]:
        a, b = fn(original), fn(compressed)
        rows.append((label, a, b, b / a))
    for batch in (1, 32):
        rows.append((f"latency ms, batch {batch}", *paired_latency(original, compressed, meta, batch, rounds)))
    batch, images = CASES[arch]
    a, b = (train_throughput(m, meta, batch, images) for m in (original, compressed))
    rows.append((f"fine-tune img/s, batch {batch}", a, b, b / a))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    parser.add_argument("--archs", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--rounds", type=int, default=7, help="least alternating latency rounds (ratios: median of pairwise ratios)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    table = Table("model", "figure", "original", "rank x0.5 (svd)", "ratio",
                  title=f"Rank 0.5 of every target; CPU, {args.threads} threads, torch {torch.__version__}")
    for arch in args.archs:
        start = time.perf_counter()
        for label, a, b, ratio in measure(arch, args.rounds):
            fmt = "{:,.0f}" if label in ("MACs", "params") else "{:,.2f}"
            table.add_row(arch.partition(":")[2], label, fmt.format(a), fmt.format(b), f"{ratio:.3f}")
        table.add_section()
        Console(stderr=True).print(f"{arch}: {time.perf_counter() - start:.0f} s")
    show(table)


if __name__ == "__main__":
    main()
