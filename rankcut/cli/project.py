"""``rankcut project``: not implemented yet."""

from ..errors import RankcutError


def project() -> None:
    """Not implemented yet."""
    raise RankcutError("rankcut project is not implemented yet")
