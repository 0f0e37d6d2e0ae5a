"""``rankcut stats``: not implemented yet."""

from ..errors import RankcutError


def stats() -> None:
    """Not implemented yet."""
    raise RankcutError("rankcut stats is not implemented yet")
