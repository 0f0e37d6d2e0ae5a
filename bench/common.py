"""What the benchmark scripts share: running rankcut commands in-process and printing dated tables."""

from __future__ import annotations

import json
import os
import platform
import time

import torch
from rich.console import Console
from rich.table import Table
from typer.testing import CliRunner

from rankcut.cli import app


def rankcut(*args) -> dict:
    """Run ``rankcut ARGS --json`` in this process and return its JSON result (raise on failure)."""
    args = [str(a) for a in args] + ["--json"]
    result = CliRunner().invoke(app, args)
    if result.exit_code != 0:
        raise RuntimeError(f"rankcut {' '.join(args)} failed: {result.stderr.strip() or result.exception}")
    return json.loads(result.stdout)


def machine() -> str:
    """One line naming the machine and the date, printed under every table."""
    cpu = platform.processor() or platform.machine()
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores {cpu}{gpu}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads")


def show(table: Table) -> None:
    """Print a table, then the machine line, wide enough not to wrap."""
    console = Console(width=160)
    console.print(table)
    console.print(f"[dim]{machine()}[/dim]")
