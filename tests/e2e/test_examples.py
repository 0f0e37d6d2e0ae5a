"""The shell examples run end to end (tiny settings), so the README's first command cannot rot."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cli_helpers import run

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

pytestmark = pytest.mark.timeout(900)  # an example script runs for minutes (limited to 600 s), then its checks


def example(name: str, out: Path, **settings) -> subprocess.CompletedProcess:
    """``bash examples/NAME`` with ``settings`` as environment variables and this Python's rankcut first on PATH."""
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
           "OUT": str(out), "DEVICE": "cpu", **{k: str(v) for k, v in settings.items()}}
    proc = subprocess.run(["bash", str(EXAMPLES / name)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, f"{name} failed:\n--- stdout:\n{proc.stdout}\n--- stderr:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


@pytest.mark.slow
def test_mnist_example_prints_one_comparison_table(tmp_path):
    out = tmp_path / "run"
    proc = example("mnist.sh", out, TRAIN_SAMPLES=256, SAMPLES=200, TEST_SAMPLES=100, LATENCY=0)
    lines = proc.stdout.splitlines()
    assert sum(line.startswith("mnist5k:test: 100 samples") for line in lines) == 1, "one table on stdout"
    names = ["trained.safetensors (ref)", "pca.safetensors", "pca-tuned.safetensors", "fisher.safetensors",
             "fisher-tuned.safetensors"]
    for name in names:
        assert sum(f" {name} " in line for line in lines) == 1, f"one row for {name}:\n{proc.stdout}"
    assert "top-1 agreement" in proc.stdout and "ms / batch" not in proc.stdout  # LATENCY=0 (timed in test_cli_eval)
    # The research note's ranks: conv2 64 -> 32, fc1 128 -> 64, conv1 not selected.
    for method in ("pca", "fisher"):
        projected = json.loads((out / f"{method}.json").read_text())
        assert {r["layer"]: (r["old_rank"], r["new_rank"]) for r in projected["layers"]} == {
            "conv2": (64, 32), "fc1": (128, 64)}
        assert (out / f"{method}-tuned.safetensors").is_file()
    ratios = re.findall(r"7,282,048 \((0\.\d+)x\)", proc.stdout)
    assert len(ratios) == 4, proc.stdout  # the four compressed rows: MACs x0.607 of the trained model


@pytest.mark.slow
def test_iterative_example_stops_at_the_target(tmp_path):
    base = tmp_path / "base.safetensors"
    run(["init", "--arch", "rankcut:mnist-cnn", "--seed", "0", "-o", base])
    out = tmp_path / "run"
    proc = example("iterative.sh", out, BASE=base, TARGET=0.65, STEP=0.8, SAMPLES=64, TUNE_SAMPLES=64,
                   TEST_SAMPLES=50, METHOD="fisher")
    rows = [line.split() for line in proc.stdout.splitlines() if re.match(r"^\s+\d+\s+\d\.\d{3}\s", line)]
    steps, fractions = [int(r[0]) for r in rows], [float(r[1]) for r in rows]
    assert steps == list(range(len(rows))) and len(rows) >= 2, proc.stdout
    assert all(a > b for a, b in zip(fractions, fractions[1:])), fractions
    assert fractions[-1] <= 0.65 + 1e-3 and fractions[-2] > 0.65 and len(rows) == 3, fractions
    last = out / f"step{steps[-1]}.safetensors"
    info = run(["info", last, "--json"]).data
    assert info["macs"] <= 0.65 * 11_992_448 and [h["command"] for h in info["history"]][-2:] == ["project", "finetune"]
