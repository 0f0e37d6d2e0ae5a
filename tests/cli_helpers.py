"""Running the CLI in-process from tests, checking its conventions (DESIGN §6) on the way."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import torch
from typer.testing import CliRunner

from rankcut.cli import app


def run(args, *, fails: bool = False, env: dict | None = None):
    """Run ``rankcut ARGS`` in-process and check the CLI conventions (DESIGN §6) on the way.

    Success: exit 0 and, with ``--json``, stdout is exactly one JSON object (parsed into ``result.data``).
    ``fails=True``: a non-zero exit, nothing on stdout, exactly one ``error: ...`` line on stderr and no
    traceback. An exception escaping the command is a bug in rankcut and is re-raised with its traceback.
    Typer's typer.testing.CliRunner always keeps stdout and stderr apart (``result.stdout``/``.stderr``).
    """
    args = [str(a) for a in args]
    result = invoke(*args, env=env)
    shown = f"rankcut {' '.join(args)}\n--- stdout:\n{result.stdout}\n--- stderr:\n{result.stderr}"
    assert "Traceback" not in result.stdout + result.stderr, shown
    if fails:
        assert result.exit_code != 0, shown
        assert result.stdout == "", shown
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), shown
        result.message = lines[0]
        return result
    assert result.exit_code == 0, shown
    if "--json" in args:
        assert result.stdout.count("\n") == 1, shown
        result.data = json.loads(result.stdout)
        assert isinstance(result.data, dict), shown
    return result


def invoke(*args, env: dict | None = None):
    """``rankcut ARGS`` in-process with no convention checks (for tests that check exit codes themselves).

    An exception escaping the command is a bug in rankcut and is re-raised with its traceback.
    """
    result = CliRunner().invoke(app, [str(a) for a in args], env=env)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def rankcut(*args, fails: bool = False):
    """``rankcut ARGS``: the parsed ``--json`` result (else the Result), or with ``fails`` the error line."""
    result = run(args, fails=fails)
    if fails:
        return result.message
    return result.data if "--json" in map(str, args) else result


def launch(*args, nproc: int = 1, env: dict | None = None) -> subprocess.CompletedProcess:
    """The real CLI in a fresh process, or under ``torchrun --standalone --nproc_per_node=nproc`` (gloo on CPU)."""
    launcher = [sys.executable, "-m", "rankcut.cli"] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "rankcut.cli"]
    return subprocess.run([*launcher, *map(str, args)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def random_digits_setup(folder) -> tuple:
    """A random ``rankcut:mnist-cnn`` (seed 0), 37 seeded random digits (uneven shards and batches of 5 under
    torchrun) and their statistics, made by the CLI in ``folder``: ``(checkpoint, statistics, data options)``."""
    base, stats = folder / "base.safetensors", folder / "s.npz"
    assert launch("init", "--arch", "rankcut:mnist-cnn", "--seed", "0", "-o", base).returncode == 0
    np.savez(folder / "data.npz", x=torch.rand(37, 1, 28, 28, generator=torch.Generator().manual_seed(0)).numpy())
    data = ["--data", folder / "data.npz", "--device", "cpu", "-b", "5"]
    r = launch("stats", base, *data, "-o", stats)
    assert r.returncode == 0, r.stderr
    return base, stats, data
