"""The one exception type that means "the user gave us something we cannot use"."""


class RankcutError(Exception):
    """A user-facing error: the CLI prints its message as one line and exits non-zero."""
