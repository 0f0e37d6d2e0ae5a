"""Turning user errors into one line on stderr and a non-zero exit, in every command."""

from __future__ import annotations

import functools
import os
import sys

import typer

from ..errors import RankcutError


def one_line_errors(fn):
    """Decorate a command so a user error prints one line ``error: ...`` and exits 1 (no traceback).

    User errors are ``RankcutError`` and what the environment raises (``OSError``, running out of host or
    GPU memory); anything else is a bug and keeps its traceback. Set ``RANKCUT_DEBUG=1`` to get the
    traceback for user errors too. Ctrl-C exits 130 with one line.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except RankcutError as e:
            if os.environ.get("RANKCUT_DEBUG"):
                raise
            print(f"error: {one_line(str(e))}", file=sys.stderr)
            raise typer.Exit(1) from None
        except (OSError, MemoryError) as e:
            # The environment, not a bug: a file that vanished, a full disk, too little memory.
            if os.environ.get("RANKCUT_DEBUG"):
                raise
            print(f"error: {one_line(f'{type(e).__name__}: {e}')}", file=sys.stderr)
            raise typer.Exit(1) from None
        except RuntimeError as e:
            import torch

            if not isinstance(e, torch.cuda.OutOfMemoryError) or os.environ.get("RANKCUT_DEBUG"):
                raise
            print(f"error: out of GPU memory: {one_line(str(e))}", file=sys.stderr)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            print("error: interrupted; no output was written", file=sys.stderr)
            raise typer.Exit(130) from None

    return wrapper


def one_line(message: str) -> str:
    """``message`` as one line: its first non-empty line (torch errors append pages of C++ frames)."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    return lines[0] if lines else "unknown error"
