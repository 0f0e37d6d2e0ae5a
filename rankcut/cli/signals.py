"""Ctrl-C and SIGTERM: exit at once while the CLI is starting, unwind (removing temporary files) once it runs."""

from __future__ import annotations

import os
import signal

_WORDS = {signal.SIGINT: ("interrupted", 130), signal.SIGTERM: ("terminated", 143)}


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is, so it unwinds like Ctrl-C: temporary files are removed."""


def exit_while_starting() -> None:
    """Before torch and numpy are imported: a signal exits 130/143 with one line and nothing else.

    An import interrupted half-way leaves an extension module half-loaded, and Python then reports it as an
    ``ImportError`` traceback; nothing has been written yet, so leaving at once is both safe and quiet.
    """

    def leave(signum, frame):
        word, code = _WORDS[signum]
        if os.environ.get("RANK", "0") == "0":
            os.write(2, f"error: {word}; no output was written\n".encode())
        os._exit(code)

    for sig in _WORDS:
        if signal.getsignal(sig) is not signal.SIG_IGN:  # a launcher that ignores a signal keeps it ignored
            signal.signal(sig, leave)


def unwind_on_signals() -> None:
    """Once running: Ctrl-C raises ``KeyboardInterrupt`` and SIGTERM ``Terminated``, so writers clean up."""

    def raise_terminated(signum, frame):
        raise Terminated()

    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_IGN:
        signal.signal(signal.SIGTERM, raise_terminated)
