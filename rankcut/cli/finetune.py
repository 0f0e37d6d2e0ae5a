"""``rankcut finetune``: not implemented yet."""

from ..errors import RankcutError


def finetune() -> None:
    """Not implemented yet."""
    raise RankcutError("rankcut finetune is not implemented yet")
