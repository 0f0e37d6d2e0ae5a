"""The "not a target" table that ``info`` and ``stats`` print: every layer left out, and why."""

from __future__ import annotations

from rich.table import Table

from rankcut.errors import RankcutError


def not_targets_table(notes: object, source: str) -> list[Table]:
    """A table of layers that are not targets (``targets.untargeted``), or no table when there are none.

    ``notes`` may come from a statistics file's metadata, so its shape is checked.
    """
    if not notes:
        return []
    if not isinstance(notes, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in notes.items()):
        raise RankcutError(f"{source} has damaged metadata (not_targets must map layer names to reasons)")
    table = Table("layer", "why", title="not targets", title_justify="left")
    for name, why in notes.items():
        table.add_row(name, why)
    return [table]
