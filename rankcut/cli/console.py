"""Where output goes: results to stdout (tables or one JSON object), progress and warnings to stderr."""

from __future__ import annotations

import json
import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class Reporter:
    """One object per command run; only the primary process of a torchrun job prints anything."""

    def __init__(self, quiet: bool = False, as_json: bool = False, primary: bool = True):
        self.out = Console(file=sys.stdout)
        if not self.out.is_terminal:
            self.out.width = 160  # scripts and logs: wide tables, no wrapping in the middle of numbers
        self.err = Console(file=sys.stderr, stderr=True)
        self.primary = primary
        self.as_json = as_json
        self.chatty = primary and not quiet and self.err.is_terminal

    def warn(self, message: str) -> None:
        """A warning always reaches stderr (also in scripts), as one line."""
        if self.primary:
            print(f"warning: {message}", file=sys.stderr)

    def log(self, message: str) -> None:
        if self.chatty:
            self.err.print(message, highlight=False)

    def progress(self) -> Progress:
        return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                        console=self.err, disable=not self.chatty, transient=True)

    def result(self, data: dict, *renderables) -> None:
        """Print the command's result: ``data`` as JSON with --json, else the rich renderables."""
        if not self.primary:
            return
        if self.as_json:
            print(json.dumps(data, indent=None, default=_plain))
        else:
            for r in renderables:
                self.out.print(r)


def _plain(value):
    try:
        return value.item()
    except AttributeError:
        return str(value)
