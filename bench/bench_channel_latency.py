"""Does a channel-pruned model's latency follow its MACs? (issue 12: batch-32 latency ratio within 1.15x of
the MACs ratio.)

    python bench/bench_channel_latency.py [--archs mnist-cnn resnet18] [--budgets 0.5 0.25 0.125 0.0625]

Latency does not depend on the weights, only on the widths, so each architecture is initialised with random
weights and its channel statistics are gathered on synthetic images; ``project --structure channels --macs F``
then picks the widths, with and without ``--round-channels 8`` and 16. Every pruned model is timed against the
original by the project's pairwise comparison (``run.latency.compare_models``: alternating passes, median of
the pairwise ratios, in wall time and in CPU time) at batch 32 and ``--threads`` threads, as it is and with every BatchNorm folded into the
convolution before it in both models (``torch.fx.experimental.optimization.fuse``), to separate the cost of
unfolded BatchNorms from the cost of the convolutions themselves.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from common import rankcut, show
from rich.table import Table
from torch.fx.experimental.optimization import fuse

from rankcut.files.checkpoint import load_with_meta
from rankcut.model.cost import count_macs
from rankcut.run.latency import compare_models

ARCHS = {"mnist-cnn": ["--arch", "rankcut:mnist-cnn"],
         "resnet18": ["--arch", "torchvision:resnet18", "--input", "3,28,28", "--num-classes", "10"]}


def ratio(model, base, contract, batch: int, seconds: float, threads: int) -> tuple[float, float]:
    """The median pairwise (wall, CPU-time) latency ratio of ``model`` to ``base``."""
    got = compare_models([base, model], contract, batch, torch.device("cpu"), threads=threads, max_seconds=seconds)[1]
    return got["ratio"], got["cpu_ratio"]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--archs", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    p.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.25, 0.125, 0.0625])
    p.add_argument("--rounds", type=int, nargs="+", default=[1, 8, 16], help="--round-channels values")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seconds", type=float, default=8.0, help="most seconds per comparison")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = args.out or Path(tempfile.mkdtemp(prefix="rankcut-channel-latency-"))
    out.mkdir(parents=True, exist_ok=True)
    for arch in args.archs:
        started = time.time()
        base_path, stats = out / f"{arch}.safetensors", out / f"{arch}.stats.npz"
        rankcut("init", *ARCHS[arch], "--seed", "0", "-o", base_path)
        rankcut("stats", base_path, "--data", "synthetic:256", "--structure", "channels", "-o", stats, "--quiet")
        base, meta = load_with_meta(base_path)
        base.eval()
        fused_base = fuse(base)
        total = count_macs(base, meta.input)[0]
        table = Table("MACs budget", "--round-channels", "widths (pruned chains)", "MACs", f"latency b{args.batch}",
                      "latency / MACs", "CPU time / MACs", "BN folded: latency / MACs",
                      title=f"{arch} at {'x'.join(map(str, meta.input.shape))}: channel-pruned model against the "
                            f"original, pairwise latency ratio, {args.threads} thread(s)", title_justify="left")
        for fraction in args.budgets:
            for step in args.rounds:
                path = out / f"{arch}-{fraction:g}-r{step}.safetensors"
                try:
                    result = rankcut("project", base_path, "--stats", stats, "--structure", "channels", "--macs",
                                     fraction, "--round-channels", step, "-o", path, "--quiet")
                except RuntimeError as e:  # coarse steps: the narrowest widths may not fit the budget
                    table.add_row(f"{100 * fraction:.2f}%", str(step), str(e).rpartition("error: ")[2][:60])
                    continue
                model = load_with_meta(path)[0].eval()
                macs = count_macs(model, meta.input)[0] / total
                plain, cpu = ratio(model, base, meta.input, args.batch, args.seconds, args.threads)
                folded, _ = ratio(fuse(model), fused_base, meta.input, args.batch, args.seconds, args.threads)
                widths = ",".join(str(c["kept"]) for c in result["chains"])
                table.add_row(f"{100 * fraction:.2f}%", str(step), widths, f"x{macs:.3f}", f"x{plain:.3f}",
                              f"{plain / macs:.2f}", f"{cpu / macs:.2f}", f"{folded / macs:.2f}")
            table.add_section()
        table.caption = f"{time.time() - started:.0f} s"
        show(table)


if __name__ == "__main__":
    main()
