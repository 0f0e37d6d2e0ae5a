"""Cost of ``stats`` relative to a plain forward pass, and what ``project --keep 0.5`` buys (issue 3).

    python bench/bench_stats_project.py [--images 256] [--batch 32] [--arch torchvision:resnet18]

Prints one table. Times are the best of a few repeats, measured in one run so the ratios are fair on a
noisy machine; peak memory is each mode's own process's maximum resident set size.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time

import torch
from rich.table import Table

from rankcut.model import archs
from rankcut.compress.budget import ranks_from_keep
from rankcut.dist import Context
from rankcut.run.latency import compare_models
from rankcut.model.cost import count_macs
from rankcut.compress.project import project_model
from rankcut.stats.moments import LayerStats
from rankcut.stats.collect import collect_moments
from rankcut.model.targets import select

CPU = Context(0, 1, torch.device("cpu"))


def setup(arch: str, images: int, batch: int):
    torch.manual_seed(0)
    model = archs.build(arch, {}).eval()
    contract = archs.default_input(arch, {})
    x = torch.rand(images, *contract.shape)
    return model, contract, [(x[i:i + batch], None) for i in range(0, images, batch)]


def forward_pass(model, batches):
    with torch.inference_mode():
        for x, _ in batches:
            model(x)


def stats_pass(model, contract, batches):
    return collect_moments(model, select(model, contract), batches, CPU)


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def child(mode: str, arch: str, images: int, batch: int) -> None:
    """Run one mode in a fresh process and print its peak RSS, so the memory figures do not mix."""
    model, contract, batches = setup(arch, images, batch)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    forward_pass(model, batches) if mode == "forward" else stats_pass(model, contract, batches)
    print(json.dumps({"peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "base_mib": base / 1024}))


def peak(mode: str, args) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", mode, "--arch", args.arch, "--images", str(args.images),
                          "--batch", str(args.batch)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--arch", default="torchvision:resnet18")
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--child")
    args = p.parse_args()
    if args.child:
        return child(args.child, args.arch, args.images, args.batch)
    from common import show  # not in the children: their peak memory should be rankcut's alone

    model, contract, batches = setup(args.arch, args.images, args.batch)
    forward_pass(model, batches[:1])  # warm-up
    t_forward = best_time(lambda: forward_pass(model, batches), args.repeats)
    t_stats = best_time(lambda: stats_pass(model, contract, batches), args.repeats)
    mem_forward, mem_stats = peak("forward", args), peak("stats", args)

    targets = select(model, contract)
    moments = stats_pass(model, contract, batches)
    small = setup(args.arch, 1, 1)[0]
    ranks = ranks_from_keep(small, [t.name for t in targets], 0.5)
    with torch.no_grad():
        project_model(small, targets, {t.name: LayerStats(t, moments[t.name]) for t in targets}, "pca", ranks)
    macs0, macs1 = count_macs(model, contract)[0], count_macs(small, contract)[0]
    lat = {b: compare_models([model, small], contract, b, CPU.device) for b in (1, args.batch)}

    shape = "x".join(map(str, contract.shape))
    table = Table("measure", "value", title=f"{args.arch} {shape}, {args.images} synthetic images, batch {args.batch}, "
                  f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
                  f"{time.strftime('%Y-%m-%d')}", title_justify="left")
    table.add_row("plain forward pass (s)", f"{t_forward:.2f}")
    table.add_row("stats, all target layers (s)", f"{t_stats:.2f}")
    table.add_row("stats / forward time", f"{t_stats / t_forward:.2f}  (target <= 1.3)")
    table.add_row("peak RSS forward / stats (MiB)", f"{mem_forward['peak_mib']:.0f} / {mem_stats['peak_mib']:.0f}")
    table.add_row("project --keep 0.5: MACs ratio", f"{macs1 / macs0:.3f}  ({macs1 / 1e9:.3f} / {macs0 / 1e9:.3f} G)")
    for b, (orig, comp) in lat.items():  # the ratio: median of pairwise ratios, the models taking turns
        table.add_row(f"latency ratio, batch {b}", f"{comp['ratio']:.3f}  ({comp['batch_ms']:.1f} / "
                      f"{orig['batch_ms']:.1f} ms)")
    show(table)


if __name__ == "__main__":
    main()
