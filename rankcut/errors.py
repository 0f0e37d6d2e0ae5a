"""The one exception type that means "the user gave us something we cannot use"."""


class RankcutError(Exception):
    """A user-facing error: the CLI prints its message as one line and exits non-zero."""


class RankcutWarning(UserWarning):
    """Something the user should know that does not stop the work (data fitted to the model, an odd choice).

    Library code raises it with ``warnings.warn``; the CLI prints each as one ``warning: ...`` line on stderr.
    """
