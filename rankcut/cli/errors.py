"""Every command's user errors as one line on stderr and a non-zero exit, its warnings as one line each."""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import warnings

import typer

from rankcut.cli.signals import Terminated, interrupted_line, unwinding
from rankcut.errors import RankcutError, RankcutWarning, one_line
from rankcut.files.fileio import written


def _user_error(e: BaseException) -> str | None:
    """The one-line message for an error the user (or the environment) caused; None for a bug."""
    if isinstance(e, RankcutError):
        return one_line(str(e))
    if isinstance(e, (OSError, MemoryError)):  # a file that vanished, a full disk, too little memory
        return one_line(f"{type(e).__name__}: {e}")
    if isinstance(e, RuntimeError) and type(e).__name__ == "OutOfMemoryError":  # torch.cuda.OutOfMemoryError
        return f"out of GPU memory: {one_line(str(e))}"
    return None


def one_line_errors(fn):
    """Decorate a command so a user error prints one line ``error: ...`` and exits 1 (no traceback).

    User errors are ``RankcutError`` and what the environment raises (``OSError``, running out of host or
    GPU memory); anything else is a bug and keeps its traceback. Set ``RANKCUT_DEBUG=1`` to get the
    traceback for user errors too. Ctrl-C exits 130 with one line, SIGTERM 143 (see ``cli.signals``). Under torchrun every process stops
    together on the same error, so only rank 0 prints it.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        before = len(written())  # in-process callers (tests, notebooks) run many commands
        try:
            with unwinding(), _warnings_as_lines():
                return fn(*args, **kwargs)
        except KeyboardInterrupt as e:
            what, code = ("terminated", 143) if isinstance(e, Terminated) else ("interrupted", 130)
            _say(interrupted_line(what, written()[before:]))
            raise typer.Exit(code) from None
        except Exception as e:
            message = _user_error(e)
            if message is None or os.environ.get("RANKCUT_DEBUG"):
                raise
            _say(f"error: {message}")
            raise typer.Exit(1) from None

    return wrapper


@contextlib.contextmanager
def _warnings_as_lines():
    """Show every ``RankcutWarning`` raised while a command runs as one ``warning: ...`` line (rank 0 only)."""
    with warnings.catch_warnings():
        warnings.simplefilter("always", RankcutWarning)
        shown = warnings.showwarning

        def show(message, category, *rest, **kwargs):
            if issubclass(category, RankcutWarning):
                _say(f"warning: {one_line(str(message))}")
            else:
                shown(message, category, *rest, **kwargs)

        warnings.showwarning = show
        yield


def _say(line: str) -> None:
    if os.environ.get("RANK", "0") == "0":
        print(line, file=sys.stderr)
