"""A sweep's JSON file as its own cache: a rerun reuses the points computed from the same inputs.

``api.sweep`` reads the file before any work and rewrites it (atomically) after every new point, so an
interrupted sweep keeps what it computed. A point is reused only when the whole fingerprint matches: what the
caller says the inputs are (``file_inputs``: the digests of the checkpoint, statistics, profile and data files,
the data as named) plus every option a point's figures depend on (``SweepConfig.fingerprint``) and the device.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from rankcut.errors import RankcutError, RankcutWarning
from rankcut.files.checkpoint import CheckpointMeta, save
from rankcut.files.fileio import atomic_write, file_digest
from rankcut.run.frontier import label


def _data_inputs(name: str, data: str | None) -> dict:
    """A data spec as named, and the digest of its file when it is one (a tensor file can change under its name)."""
    if data is None:
        return {}
    return {name: data, f"{name}_sha256": file_digest(data) if Path(data).is_file() else None}


def file_inputs(checkpoint: str | os.PathLike, stats: str | os.PathLike | None, data: str, samples: int | None, *,
                profile: str | os.PathLike | None = None, train_data: str | None = None) -> dict:
    """What a sweep of files depends on besides its options: the files' digests, the data as named.

    ``profile`` and ``train_data`` appear only when given, so a cache written without them stays valid.
    """
    return {"checkpoint": file_digest(checkpoint), "stats": None if stats is None else file_digest(stats),
            **_data_inputs("data", data), "samples": samples,
            **({} if profile is None else {"profile": file_digest(profile)}), **_data_inputs("train_data", train_data)}


def kept_name(point: dict) -> str:
    """The file a point's checkpoint is kept in, e.g. ``pair-fisher-macs0.5.safetensors``."""
    layer = f"-{point['layer']}" if point.get("layer") else ""
    return f"{label(point).replace('/', '-')}{layer}-{point['kind']}{point['fraction']:g}.safetensors"


def check_keep_dir(keep_dir: str | os.PathLike | None) -> None:
    """Refuse a ``--keep-dir`` that cannot be made or is a file."""
    if keep_dir is None:
        return
    if Path(keep_dir).exists() and not Path(keep_dir).is_dir():
        raise RankcutError(f"--keep-dir {keep_dir} is not a folder")
    if not Path(keep_dir).parent.is_dir():
        raise RankcutError(f"--keep-dir: folder does not exist: {Path(keep_dir).parent}")


@dataclass
class SweepCache:
    """Where a sweep's result lives (``path``), what it was computed from (``inputs``), and optionally a folder
    that keeps every point's checkpoint (``keep_dir``; needs the swept checkpoint's ``meta`` to write them).

    ``head`` is written at the top of the JSON (the CLI: the paths as typed). A point whose checkpoint is not in
    ``keep_dir`` is computed again, so that it is kept.
    """

    path: str | os.PathLike
    inputs: dict
    keep_dir: str | os.PathLike | None = None
    meta: CheckpointMeta | None = None
    head: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.keep_dir is not None:
            if self.meta is None:
                raise RankcutError("keeping the points' checkpoints needs the swept checkpoint's metadata")
            check_keep_dir(self.keep_dir)

    def read(self, fingerprint: dict) -> dict | None:
        """The points and original figures of an earlier sweep written here from the same ``fingerprint``."""
        path = Path(self.path)
        if not path.is_file():
            return None
        try:
            old = json.loads(path.read_text())
            same = old.get("inputs") == fingerprint
            points, original = old["points"], old["original"]
        except (ValueError, KeyError, TypeError, AttributeError):
            warnings.warn(f"{self.path} is not a sweep result; it is recomputed and replaced", RankcutWarning)
            return None
        if not same:
            changed = [k for k in {**old.get("inputs", {}), **fingerprint}
                       if old.get("inputs", {}).get(k) != fingerprint.get(k)]
            warnings.warn(f"{self.path} was made from other inputs ({', '.join(changed)} differ); its points are "
                          "not reused", RankcutWarning)
            return None
        if self.keep_dir is not None:
            points = [p for p in points if (Path(self.keep_dir) / kept_name(p)).is_file()]
        return {"points": points, "original": original}

    def write(self, fingerprint: dict, result: dict) -> None:
        """Replace the file with ``result`` (atomically); the points' ``checkpoint`` is set only with ``keep_dir``."""
        for p in result["points"]:
            if self.keep_dir is None:
                p.pop("checkpoint", None)  # a path kept by an earlier run is not this run's output
            else:
                p["checkpoint"] = str(Path(self.keep_dir) / kept_name(p))
        text = json.dumps({**self.head, "inputs": fingerprint, **result}, indent=1)
        atomic_write(self.path, lambda tmp: Path(tmp).write_text(text + "\n"))

    def keep(self, point: dict, model: nn.Module, edits: list, history: list[tuple[str, dict]]) -> None:
        """Save a new point's model in ``keep_dir`` with its ``edits`` and ``history`` (command, details) entries."""
        if self.keep_dir is None:
            return
        Path(self.keep_dir).mkdir(exist_ok=True)
        meta = self.meta.with_edits(*edits)
        for command, details in history:
            meta = meta.with_history(command, **details)
        save(model.cpu(), meta, Path(self.keep_dir) / kept_name(point))
