"""Start-up cost of rankcut commands against a bare ``import torch``, each in a fresh Python process.

A ``stats -> project -> finetune`` loop starts a process per step, so what a command spends before its
work matters. Every command below runs in a new interpreter; the commands are alternated in rounds
(so load from other jobs hits all of them alike) and each figure is the median over the rounds of the
wall time and of the CPU time (user + system) the process used; CPU time is the steadier figure on a
shared machine. ``rankcut info`` reads a random ``rankcut:mnist-cnn`` checkpoint made once beforehand.
With ``--before DIR`` (a checkout of an older rankcut) every rankcut command also runs from DIR, in the
same rounds, so before and after are measured alike.

    python bench/bench_startup.py                          # 5 rounds
    git archive d1cd9c7 | tar -x -C /tmp/before && python bench/bench_startup.py --before /tmp/before
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent))
from common import show  # noqa: E402

RANKCUT = [sys.executable, "-m", "rankcut.cli"]


def commands(checkpoint: str, trees: dict[str, str]) -> dict[str, tuple[list[str], dict]]:
    """Name -> (argv, environment); each rankcut command once per source tree."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = {"python -c 'import torch'": ([sys.executable, "-c", "import torch"], env),
            "python -c 'import torch, torchvision'": ([sys.executable, "-c", "import torch, torchvision"], env)}
    for label, tree in trees.items():
        tree_env = {**env, "PYTHONPATH": tree}
        for name, args in (("rankcut --help", ["--help"]), ("rankcut project --help", ["project", "--help"]),
                           ("rankcut info CKPT", ["info", checkpoint])):
            runs[f"{name}{label}"] = (RANKCUT + args, tree_env)
    return runs


def timed(argv: list[str], env: dict) -> tuple[float, float]:
    """Wall seconds and CPU seconds (user + system) of one run in a fresh process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--before", help="Also run every rankcut command from this older source tree.")
    args = parser.parse_args()
    here = str(Path(__file__).resolve().parent.parent)
    trees = {"": here} if args.before is None else {" (before)": args.before, " (after)": here}
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = str(Path(tmp) / "mnist.safetensors")
        subprocess.run(RANKCUT + ["init", "--arch", "rankcut:mnist-cnn", "-o", checkpoint], check=True,
                       env={**os.environ, "PYTHONPATH": here}, stdout=subprocess.DEVNULL)
        runs = commands(checkpoint, trees)
        for argv, env in runs.values():  # warm the file cache once, untimed
            timed(argv, env)
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
        for _ in range(args.rounds):
            for name, (argv, env) in runs.items():
                times[name].append(timed(argv, env))
    floor = [statistics.median(t[i] for t in times["python -c 'import torch'"]) for i in (0, 1)]
    table = Table("command", "wall s", "CPU s", "wall - import torch", "CPU - import torch",
                  title=f"start-up in a fresh process, median of {args.rounds} alternated rounds")
    for name, values in times.items():
        wall, cpu = (statistics.median(v[i] for v in values) for i in (0, 1))
        table.add_row(name, f"{wall:.2f}", f"{cpu:.2f}", f"{wall - floor[0]:+.2f}", f"{cpu - floor[1]:+.2f}")
    show(table)


if __name__ == "__main__":
    main()
