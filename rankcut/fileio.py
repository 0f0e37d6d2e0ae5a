"""Atomic writes and file digests: an interrupted command never leaves a half-written output."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from .errors import RankcutError


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it over ``path``.

    The rename is atomic on POSIX, so readers see the old file or the new one, never a partial one.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise RankcutError(f"output folder does not exist: {folder}")
    if path.is_dir():
        raise RankcutError(f"output {path} is a folder; give a file name")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=folder)
    except OSError as e:
        raise RankcutError(f"cannot write {path}: {e.strerror or e}") from None
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError):  # disk full, permissions, ...: the user's to fix, not a bug
            raise RankcutError(f"cannot write {path}: {e.strerror or e}") from None
        raise


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, as hex: ties a statistics file to the checkpoint it describes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_output(output: str | os.PathLike, inputs: list[str | os.PathLike], force: bool) -> None:
    """Refuse to overwrite one of the command's own inputs unless ``--force`` was given."""
    if Path(output).is_dir():
        raise RankcutError(f"output {output} is a folder; give a file name")
    out = Path(output).resolve()
    for item in inputs:
        if item is not None and Path(item).resolve() == out and not force:
            raise RankcutError(f"output {output} is also an input; pass --force to overwrite it")


def require_file(path: str | os.PathLike, what: str = "file") -> Path:
    """Return ``path`` as a Path if it is an existing file, else raise a one-line error."""
    p = Path(path)
    if not p.exists():
        raise RankcutError(f"{what} not found: {path}")
    if not p.is_file():
        raise RankcutError(f"{what} is not a file: {path}")
    return p
