"""Turning user errors into one line on stderr and a non-zero exit, in every command."""

from __future__ import annotations

import functools
import os
import sys

import typer

from ..errors import RankcutError


def one_line_errors(fn):
    """Decorate a command so a ``RankcutError`` prints ``error: ...`` and exits 1 (no traceback).

    Set ``RANKCUT_DEBUG=1`` to get the traceback instead. Ctrl-C exits 130 with one line.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except RankcutError as e:
            if os.environ.get("RANKCUT_DEBUG"):
                raise
            print(f"error: {e}", file=sys.stderr)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            print("error: interrupted; no output was written", file=sys.stderr)
            raise typer.Exit(130) from None

    return wrapper
