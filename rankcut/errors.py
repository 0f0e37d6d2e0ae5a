"""The one exception type that means "the user gave us something we cannot use", and how errors read as one line."""

from __future__ import annotations

import re


class RankcutError(Exception):
    """A user-facing error: the CLI prints its message as one line and exits non-zero."""


def one_line(message: str) -> str:
    """``message`` as one line: its first non-empty line (torch errors append pages of C++ frames).

    An error re-raised from a DataLoader worker starts with "Caught X in DataLoader worker process N."
    and ends with the worker's own "module.X: message" line: that last line is the useful one.
    """
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    if len(lines) > 1 and _WORKER.match(lines[0]):
        return _QUALIFIED.sub("", lines[-1])
    return lines[0] if lines else "unknown error"


_WORKER = re.compile(r"^Caught \w+ in DataLoader worker process \d+\.$")
_QUALIFIED = re.compile(r"^[\w.]+(Error|Exception): ")


class RankcutWarning(UserWarning):
    """Something the user should know that does not stop the work (data fitted to the model, an odd choice).

    Library code raises it with ``warnings.warn``; the CLI prints each as one ``warning: ...`` line on stderr.
    """
