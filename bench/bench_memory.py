"""Peak memory of ``rankcut stats`` does not grow with the data: N and 10 N samples, each in a fresh process.

Each run is the real CLI (``rankcut.cli.main``) in a new Python process that reports its own peak resident
set size (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) when the command ends; a bare process that
only imports rankcut and torch gives the floor. ``stats`` keeps sums, never activations, so the peak at
10 N should be within a few per cent of the peak at N (the script fails if it is not within 10%).

    python bench/bench_memory.py                      # rankcut:mnist-cnn, N = 1000, with and without --grad kl
    python bench/bench_memory.py --arch rankcut:small-resnet -n 200
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent))
from common import show  # noqa: E402

CHILD = """
import json, resource, sys
out = sys.argv.pop(1)
try:
    if len(sys.argv) > 1:
        from rankcut.cli import main
        sys.argv[0] = "rankcut"
        main()
    else:
        import torch, rankcut.cli  # the floor: what every command pays before doing anything
finally:
    with open(out, "w") as f:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        json.dump({"maxrss_kib": usage.ru_maxrss, "cpu_s": usage.ru_utime + usage.ru_stime}, f)
"""


def peak(args: list[str], folder: Path) -> tuple[float, float, float]:
    """(peak RSS in MiB, wall s, CPU s) of one fresh process running ``rankcut ARGS`` (or only the imports)."""
    report = folder / "rss.json"
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, str(report), *args], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"rankcut {' '.join(args)} failed:\n{proc.stderr}")
    usage = json.loads(report.read_text())
    return usage["maxrss_kib"] / 1024, seconds, usage["cpu_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="rankcut:mnist-cnn")
    parser.add_argument("-n", type=int, default=1000, help="N: the small run's sample count (the large one is 10 N)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--no-grad", action="store_true", help="skip the --grad kl rows")
    opts = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        ckpt = folder / "model.safetensors"
        subprocess.run([sys.executable, "-m", "rankcut.cli", "init", "-a", opts.arch, "-o", str(ckpt), "-q"],
                       check=True, capture_output=True)
        floor, _, _ = peak([], folder)
        table = Table("command", "samples", "batches", "wall s", "CPU s", "peak RSS MiB", "above import MiB", "vs N",
                      title=f"peak memory of rankcut stats, {opts.arch}, synthetic data, batch {opts.batch_size}",
                      title_justify="left", caption=f"import rankcut + torch alone: {floor:,.0f} MiB",
                      caption_justify="left")
        worst = 0.0
        for grad in ([[]] if opts.no_grad else [[], ["--grad", "kl"]]):
            base = None
            for n in (opts.n, 10 * opts.n):
                args = ["stats", str(ckpt), "--data", f"synthetic:{n}", "-b", str(opts.batch_size), "--device", "cpu",
                        "-q", "-o", str(folder / "s.npz"), *grad]
                rss, seconds, cpu = peak(args, folder)
                base = base or rss
                worst = max(worst, abs(rss / base - 1))
                table.add_row("stats" + (" --grad kl" if grad else ""), f"{n:,}", f"{-(-n // opts.batch_size):,}",
                              f"{seconds:.1f}", f"{cpu:.1f}", f"{rss:,.0f}", f"{rss - floor:,.0f}", f"{rss / base:.3f}x")
        show(table)
    if worst > 0.10:
        raise SystemExit(f"peak RSS changed by {100 * worst:.1f}% between N and 10 N samples (limit 10%)")
    print(f"largest change between N and 10 N: {100 * worst:.1f}% (limit 10%)")


if __name__ == "__main__":
    main()
