"""Regenerate every table the README shows: run each benchmark script, print its tables, and write them
as markdown into README.md between the ``<!-- bench:start -->`` and ``<!-- bench:end -->`` markers.

    python bench/run_all.py                      # everything, full size (long: run it on a quiet machine)
    python bench/run_all.py --only bench_memory.py bench_budget.py   # rerun some; keep the others' tables
    python bench/run_all.py --quick              # smoke run of every script; prints, leaves README.md alone
    python bench/run_all.py --quick --readme /tmp/README.md          # ... and writes that file

Each script runs in its own process (so one's memory and thread settings cannot colour another's figures)
with ``RANKCUT_BENCH_MARKDOWN`` set: ``common.show`` appends every table it prints there, with the machine
and date line. A script that prints tables without ``common.show`` still gets its output into the README,
as a preformatted block, with the machine line added here.
"""

from __future__ import annotations

import argparse
import ast
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
README = HERE.parent / "README.md"
START, END = "<!-- bench:start -->", "<!-- bench:end -->"


@dataclass(frozen=True)
class Bench:
    script: str
    quick: tuple[str, ...]  # flags for a smoke run (the full run uses each script's defaults)
    out_flag: str | None = None  # the script's option for its working folder (run_all gives it a temporary one)


BENCHES = [
    Bench("bench_stats_project.py", ("--arch", "rankcut:mnist-cnn", "--images", "64", "--repeats", "1")),
    Bench("bench_methods.py", ("--quick",), out_flag="--out"),
    Bench("bench_finetune_eval.py", ("--archs", "rankcut:mnist-cnn", "--rounds", "2")),
    Bench("bench_budget.py", ("--archs", "rankcut:mnist-cnn", "--fractions", "0.5", "--methods", "pca",
                              "--samples", "200", "--base-epochs", "1")),
    Bench("bench_memory.py", ("-n", "50", "--no-grad")),
    Bench("bench_startup.py", ("--rounds", "1")),
    Bench("bench_latency.py", ("--archs", "mnist", "--batches", "1", "--runtimes", "torch"), out_flag="--out"),
    Bench("bench_archs.py", ("--only", "torchvision:mobilenet_v3_small", "timm:convnext_atto", "--samples", "8")),
]


def summary(script: Path) -> str:
    """The first line of a script's docstring (read without importing it)."""
    doc = ast.get_docstring(ast.parse(script.read_text())) or script.name
    return re.sub(r"\s*\(issue \d+\)$", "", doc.splitlines()[0].rstrip("."))


def run(bench: Bench, quick: bool) -> tuple[str, bool, float]:
    """Run one script, echoing its output; return its README subsection (markdown), success, and seconds."""
    script = HERE / bench.script
    args = list(bench.quick) if quick else []
    command = " ".join(["python", f"bench/{bench.script}", *args])
    note = " (run_all --quick: a smoke run with small settings, not figures to quote)" if quick else ""
    head = f"### {summary(script)}\n\n`{command}`{note}\n"
    print(f"\n=== {command}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        md = Path(tmp) / "tables.md"
        work = [bench.out_flag, str(Path(tmp) / "work")] if bench.out_flag else []
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, str(script), *args, *work], stdout=subprocess.PIPE, text=True,
                                env={**os.environ, "RANKCUT_BENCH_MARKDOWN": str(md)}, cwd=HERE.parent)
        lines = []
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            lines.append(line)
        code = proc.wait()
        seconds = time.perf_counter() - start
        tables = md.read_text() if md.exists() else ""
    if code != 0:
        return (f"{head}\n{bench.script} failed (exit {code}) on {time.strftime('%Y-%m-%d')}; rerun with "
                f"`python bench/run_all.py --only {bench.script}`.\n"), False, seconds
    if not tables.strip():  # printed without common.show: keep its text as it is
        sys.path.insert(0, str(HERE))
        from common import machine

        text = "".join(lines).rstrip()
        tables = f"```text\n{text}\n```\n\n*{machine()}*\n"
    return f"{head}\n{tables.strip()}\n", True, seconds


def sections(text: str) -> dict[str, str]:
    """The per-script subsections currently between the README's bench markers."""
    found = re.findall(r"<!-- bench:(\S+?\.py) -->\n(.*?)<!-- bench:\1:end -->", text, flags=re.S)
    return {name: body.strip() + "\n" for name, body in found}


def render(parts: dict[str, str]) -> str:
    out = [START, "", "Regenerate with `python bench/run_all.py`; each table names the machine and the date it "
           "ran on.", ""]
    for bench in BENCHES:
        if bench.script in parts:
            out += [f"<!-- bench:{bench.script} -->", parts[bench.script], f"<!-- bench:{bench.script}:end -->", ""]
    return "\n".join(out) + END


def write_readme(path: Path, parts: dict[str, str]) -> None:
    """Replace the text between the markers (keeping the subsections of scripts not rerun), atomically."""
    text = path.read_text()
    if text.count(START) != 1 or text.count(END) != 1 or text.index(START) > text.index(END):
        raise SystemExit(f"{path} needs exactly one {START} ... {END} pair")
    before, rest = text.split(START)
    inside, after = rest.split(END)
    kept = {**sections(inside), **parts}
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(before + render(kept) + after)
    os.replace(tmp, path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small settings for every script (a smoke run)")
    p.add_argument("--only", nargs="+", metavar="SCRIPT", choices=[b.script for b in BENCHES],
                   help="run only these scripts; the README keeps the other scripts' tables")
    p.add_argument("--readme", type=Path, help=f"file to update (default: {README.name}, but not with --quick)")
    p.add_argument("--no-readme", action="store_true", help="only print")
    args = p.parse_args()
    readme = None if args.no_readme else args.readme or (None if args.quick else README)

    started, parts, report = time.perf_counter(), {}, []
    missing = []
    for bench in BENCHES:
        if args.only and bench.script not in args.only:
            continue
        if not (HERE / bench.script).exists():
            missing.append(bench.script)
            continue
        parts[bench.script], ok, seconds = run(bench, args.quick)
        report.append((bench.script, ok, seconds))

    print(f"\n=== run_all{' --quick' if args.quick else ''}: {time.perf_counter() - started:.0f} s")
    for script, ok, seconds in report:
        print(f"{script:28s} {'ok' if ok else 'FAILED':7s} {seconds:6.0f} s")
    for script in missing:
        print(f"{script:28s} missing (skipped)")
    if readme is not None:
        write_readme(readme, parts)
        print(f"wrote the tables into {readme}")
    if not all(ok for _, ok, _ in report):
        sys.exit(1)


if __name__ == "__main__":
    main()
