"""What the benchmark scripts share: running rankcut commands in-process and printing dated tables.

Every table a script prints through ``show`` is also recorded (``TABLES``) and, when the environment
variable ``RANKCUT_BENCH_MARKDOWN`` names a file, appended to it as markdown: that is how
``bench/run_all.py`` collects the README's tables from scripts it runs in their own processes.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from rich.text import Text
from typer.testing import CliRunner

from rankcut.api import SweepConfig, sweep
from rankcut.cli import app
from rankcut.files.checkpoint import load_with_meta, save
from rankcut.files.statsfile import load_stats
from rankcut.run.data import open_data
from rankcut.run.evaluate import output_classes


def rankcut(*args) -> dict:
    """Run ``rankcut ARGS --json`` in this process and return its JSON result (raise on failure)."""
    args = [str(a) for a in args] + ["--json"]
    result = CliRunner().invoke(app, args)
    if result.exit_code != 0:
        raise RuntimeError(f"rankcut {' '.join(args)} failed: {result.stderr.strip() or result.exception}")
    return json.loads(result.stdout)


def sweep_checkpoint(checkpoint, stats, data: str, config: SweepConfig, after=None, tag: str = "") -> dict:
    """``api.sweep`` of a checkpoint file on ``data`` (as ``rankcut sweep`` loads them, on the CPU).

    ``after(point, path)`` is called for each point with the point's checkpoint, saved as ``rankcut project``
    would save it next to ``checkpoint`` (``<stem><tag>-<method or structure>-<kind><fraction>.safetensors``);
    what it adds to ``point`` is in the result.
    """
    model, meta = load_with_meta(str(checkpoint))
    classes = output_classes(model, meta.input)
    dataset = open_data(data, meta.input, train=False, num_classes=classes, seed=0, classes=meta.classes)

    def keep(point, projected, result, original) -> None:
        name = f"{point['method'] or point['structure']}-{point['kind']}{point['fraction']:g}"
        path = Path(checkpoint).with_name(f"{Path(checkpoint).stem}{tag}-{name}.safetensors")
        save(projected.cpu(), meta.with_edits(*result.edits).with_history("project", **result.history()), path)
        point["ranks"] = {r["layer"]: r["new_rank"] for r in result.to_dict().get("layers", [])}
        if after is not None:
            after(point, path)

    return sweep(model, meta.input, None if stats is None else load_stats(str(stats)), dataset, classes, config,
                 on_point=keep)


def machine() -> str:
    """One line naming the machine and the date, printed under every table."""
    cpu = platform.processor() or platform.machine()
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores {cpu}{gpu}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads by default (a table that fixes its threads says so)")


TABLES: list[tuple[Table, str]] = []  # (table, machine line) for every table shown in this process
MARKDOWN_ENV = "RANKCUT_BENCH_MARKDOWN"


def show(table: Table) -> None:
    """Print a table, then the machine line, wide enough not to wrap; record both (see the module docstring)."""
    line = machine()
    console = Console(width=160)
    console.print(table)
    console.print(f"[dim]{line}[/dim]")
    TABLES.append((table, line))
    target = os.environ.get(MARKDOWN_ENV)
    if target:
        with open(target, "a", encoding="utf-8") as f:
            f.write(markdown(table, line) + "\n")


def plain(cell) -> str:
    """A rich renderable (markup string or Text) as plain text."""
    if isinstance(cell, Text):
        return cell.plain
    if isinstance(cell, str):
        return Text.from_markup(cell).plain
    return str(cell)


def _md_cell(cell) -> str:
    return plain(cell).replace("|", "\\|").replace("\n", "<br>").strip()


def markdown(table: Table, footer: str | None = None) -> str:
    """A rich Table as a GitHub markdown table: bold title, header, right-aligned numbers, caption, footer."""
    out = []
    if table.title:
        out += [f"**{_md_cell(table.title)}**", ""]
    align = {"right": "---:", "center": ":---:"}
    out.append("| " + " | ".join(_md_cell(c.header) or " " for c in table.columns) + " |")
    out.append("|" + "|".join(align.get(c.justify, "---") for c in table.columns) + "|")
    for cells in zip(*(list(c.cells) for c in table.columns)):
        out.append("| " + " | ".join(_md_cell(c) for c in cells) + " |")
    if table.caption:
        out += ["", _md_cell(table.caption)]
    if footer:
        out += ["", f"*{footer}*"]
    return "\n".join(out) + "\n"
