"""``rankcut eval``: not implemented yet."""

from ..errors import RankcutError


def evaluate() -> None:
    """Not implemented yet."""
    raise RankcutError("rankcut eval is not implemented yet")
