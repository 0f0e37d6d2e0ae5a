"""Ctrl-C and SIGTERM: exit at once outside a command (starting, parsing, finishing), unwind inside one.

Outside a command nothing is half-written, so leaving at once is safe; inside one, the signal is raised where
the process is so that writers remove their temporary files. Either way the process says, in one line, what
it had already written.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading

from rankcut.files.fileio import written

_WORDS = {signal.SIGINT: ("interrupted", 130), signal.SIGTERM: ("terminated", 143)}


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is, so it unwinds like Ctrl-C: temporary files are removed."""


def interrupted_line(word: str, done: list[str]) -> str:
    """The one line an interrupted process prints."""
    return f"error: {word}; {', '.join(done) + ' had already been written' if done else 'no output was written'}"


def exit_at_once() -> None:
    """Outside a command: a signal exits 130/143 with one line and nothing else.

    Set before torch and numpy are imported: an import interrupted half-way leaves an extension module
    half-loaded, which Python reports as an ``ImportError`` traceback. Typer would turn a Ctrl-C while it parses
    or after the command returned into a silent exit 130; this handler says what was written instead.
    """

    def leave(signum, frame):
        word, code = _WORDS[signum]
        if os.environ.get("RANK", "0") == "0":
            os.write(2, (interrupted_line(word, written()) + "\n").encode())
        os._exit(code)

    for sig in _WORDS:
        if signal.getsignal(sig) is not signal.SIG_IGN:  # a launcher that ignores a signal keeps it ignored
            signal.signal(sig, leave)


@contextlib.contextmanager
def unwinding():
    """While a command runs: Ctrl-C raises ``KeyboardInterrupt`` and SIGTERM ``Terminated``, so writers clean up.

    The handlers before are restored after, so in-process callers (tests, notebooks) keep theirs. Only the main
    thread can set handlers; elsewhere this changes nothing.
    """

    def raise_terminated(signum, frame):
        raise Terminated()

    wanted = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: raise_terminated}
    before = {}
    if threading.current_thread() is threading.main_thread():
        before = {sig: signal.getsignal(sig) for sig in wanted}
        for sig, handler in wanted.items():
            if before[sig] is not signal.SIG_IGN:
                signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, handler in before.items():
            if handler is not None:  # None: set outside Python; cannot be restored from here
                signal.signal(sig, handler)
