"""Atomic writes and file digests: an interrupted command never leaves a half-written output."""

from __future__ import annotations

import hashlib
import os
import re
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path

from rankcut.errors import RankcutError

# Outputs this process has finished writing (completed renames), so that an interrupted command can
# say truthfully whether it wrote anything.
_written: list[str] = []


def written() -> list[str]:
    """The outputs this process has written completely so far."""
    return list(_written)


def _temp_prefix(path: Path) -> str:
    # Host and process id in the name: a later run can tell a temporary file left by a killed process
    # (same host, process gone) from one another process is writing right now.
    host = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "host"
    return f".{path.name}.{host}-{os.getpid()}."


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, owned by someone else
        return True
    return True


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Delete temporary files beside ``path`` left by killed rankcut processes on this host; return them.

    Only files named like ours (``.NAME.HOST-PID.XXXX.part``) whose process is gone are removed, so a
    concurrent writer of the same output on this or another host is never disturbed.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    host = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "host"
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.{re.escape(host)}-(\d+)\.[^./]+\.part$")
    removed = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = pattern.match(entry.name)
        if match and int(match.group(1)) != os.getpid() and not _alive(int(match.group(1))):
            try:
                entry.unlink()
                removed.append(entry)
            except OSError:
                pass
    return removed


def _new_file_mode(path: Path) -> int:
    """The mode a plain ``open(path, "w")`` would give: the old file's, else 0666 minus the umask."""
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        umask = os.umask(0o022)
        os.umask(umask)
        return 0o666 & ~umask


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it over ``path``.

    The rename is atomic on POSIX, so readers see the old file or the new one, never a partial one.
    The temporary file is removed on any error or Ctrl-C; one left by a killed process (SIGKILL) is
    named ``.NAME.HOST-PID.XXXX.part`` and removed by the next write of the same output.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise RankcutError(f"output folder does not exist: {folder}")
    if path.is_dir():
        raise RankcutError(f"output {path} is a folder; give a file name")
    remove_stale_temporaries(path)
    mode = _new_file_mode(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".part", dir=folder)
        os.close(fd)
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, mode)  # mkstemp makes 0600 files; outputs get the permissions of any other new file
        os.replace(tmp, path)
        _written.append(str(path))
        _sync_folder(folder)
    except BaseException as e:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError):  # disk full, permissions, ...: the user's to fix, not a bug
            raise RankcutError(f"cannot write {path}: {e.strerror or e}") from None
        raise


def _sync_folder(folder: Path) -> None:
    """Make the rename itself durable (best effort: not every file system lets a folder be synced)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, as hex: ties a statistics file to the checkpoint it describes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _same_file(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)  # hard links, bind mounts
    except OSError:
        return False


def check_output(output: str | os.PathLike, inputs: list[str | os.PathLike | None], force: bool) -> None:
    """Refuse, before any work, an output that cannot be written or would overwrite an input without --force."""
    if Path(output).is_dir():
        raise RankcutError(f"output {output} is a folder; give a file name")
    folder = Path(output).parent
    if not folder.is_dir():
        raise RankcutError(f"output folder does not exist: {folder}")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise RankcutError(f"output folder is not writable: {folder}")
    for item in inputs:
        if item is not None and not force and _same_file(Path(item), Path(output)):
            raise RankcutError(f"output {output} is also an input; pass --force to overwrite it")


def require_file(path: str | os.PathLike, what: str = "file") -> Path:
    """Return ``path`` as a Path if it is an existing file, else raise a one-line error."""
    p = Path(path)
    if not p.exists():
        raise RankcutError(f"{what} not found: {path}")
    if not p.is_file():
        raise RankcutError(f"{what} is not a file: {path}")
    return p
