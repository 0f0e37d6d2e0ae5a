"""Where output goes: results to stdout (tables or one JSON object), progress and warnings to stderr.

Every string rankcut prints holds user text (paths, layer names, data specs, error messages), so the
consoles never read rich markup, emoji codes or highlighting: ``model[keep50].safetensors`` and
``synthetic:100`` print as typed. Code that wants styling must pass a ``rich.text.Text``.
"""

from __future__ import annotations

import json
import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from rankcut.cli.progress import LineProgress

# The shape of every --json object; bumped when a key changes meaning or moves, so scripts can tell.
JSON_VERSION = 1


def plain_console(**kwargs) -> Console:
    """A console that prints strings as they are: no markup, no emoji codes, no highlighting."""
    return Console(markup=False, emoji=False, highlight=False, **kwargs)


class Reporter:
    """One object per command run; only the primary process of a torchrun job prints anything."""

    def __init__(self, quiet: bool = False, as_json: bool = False, primary: bool = True):
        self.out = plain_console(file=sys.stdout)
        if not self.out.is_terminal:
            self.out.width = 160  # scripts and logs: wide tables, no wrapping in the middle of numbers
        self.err = plain_console(file=sys.stderr, stderr=True)
        self.primary = primary
        self.as_json = as_json
        self.chatty = primary and not quiet and self.err.is_terminal
        self.logging = primary and not quiet and not self.err.is_terminal  # stderr is a log file or a pipe

    def warn(self, message: str) -> None:
        """A warning always reaches stderr (also in scripts), as one line."""
        if self.primary:
            print(f"warning: {message}", file=sys.stderr)

    def log(self, message: str) -> None:
        if self.chatty:
            self.err.print(message)

    def progress(self) -> Progress | LineProgress:
        """A live bar on a terminal; plain periodic lines when stderr is a log; nothing with --quiet."""
        if self.logging:
            return LineProgress()
        return Progress(TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[info]}", markup=False), TimeElapsedColumn(), TimeRemainingColumn(),
                        console=self.err, disable=not self.chatty, transient=True)

    def result(self, data: dict, *renderables) -> None:
        """Print the command's result: ``data`` as JSON (with the shape's version) with --json, else the renderables."""
        if not self.primary:
            return
        if self.as_json:
            print(json.dumps({"version": JSON_VERSION, **data}, indent=None, default=_plain))
        else:
            for r in renderables:
                self.out.print(r)


def _plain(value):
    try:
        return value.item()
    except AttributeError:
        return str(value)
