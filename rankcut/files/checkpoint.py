"""The checkpoint contract: one safetensors file holding a state dict plus everything needed to rebuild it.

String metadata (flat ``str -> str``, structured values JSON-encoded):

- ``rankcut.format``: ``rankcut/1``
- ``rankcut.arch`` and ``rankcut.arch_kwargs``: the base architecture and its keyword arguments
- ``rankcut.input``: the input contract (shape, mean, std)
- ``rankcut.edits``: ordered structural edits since the base (see ``edits.py``)
- ``rankcut.history``: the commands that produced the file
- ``rankcut.classes`` (optional): the class names the outputs score, in output order (absent: unknown)

Loading builds the architecture on the meta device, replays the edits, checks every tensor's name and
shape against the file's header, and only then builds it for real and loads strictly. An architecture
whose builder computes with tensor values (torchvision's RegNets) cannot be built on the meta device: it
is built for real once, checked, and that model is the one loaded. Nothing in the file is executed.
"""

from __future__ import annotations

import datetime
import json
import os
from dataclasses import dataclass, field, replace

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from rankcut.model import archs
from rankcut.model.contract import InputContract
from rankcut.model.edits import Edit, edit_from_dict, edit_to_dict
from rankcut.errors import RankcutError, one_line
from rankcut.files.fileio import atomic_write, require_file
from rankcut.files.weights import is_torch_save_file, mismatches, versioned

FORMAT = "rankcut/1"
_MAX_HEADER_TEXT = 16 << 20


@dataclass(frozen=True)
class CheckpointMeta:
    """Everything in a checkpoint except its tensors."""

    arch: str
    arch_kwargs: dict
    input: InputContract
    edits: tuple[Edit, ...] = ()
    history: tuple[dict, ...] = field(default_factory=tuple)
    classes: tuple[str, ...] | None = None  # class names in output order; None: not recorded

    def with_classes(self, classes: tuple[str, ...]) -> "CheckpointMeta":
        return replace(self, classes=tuple(classes))

    def with_edits(self, *edits: Edit) -> "CheckpointMeta":
        return replace(self, edits=self.edits + tuple(edits))

    def with_history(self, command: str, **details) -> "CheckpointMeta":
        entry = {"command": command, "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                 **details}
        return replace(self, history=self.history + (entry,))

    def to_metadata(self) -> dict[str, str]:
        md = {
            "rankcut.format": FORMAT,
            "rankcut.arch": self.arch,
            "rankcut.arch_kwargs": json.dumps(self.arch_kwargs, sort_keys=True),
            "rankcut.input": json.dumps(self.input.to_dict()),
            "rankcut.edits": json.dumps([edit_to_dict(e) for e in self.edits]),
            "rankcut.history": json.dumps(list(self.history)),
        }
        if self.classes is not None:
            md["rankcut.classes"] = json.dumps(list(self.classes))
        return md

    @classmethod
    def from_metadata(cls, md: dict[str, str] | None, path: str) -> "CheckpointMeta":
        if not md or md.get("rankcut.format") is None:
            raise RankcutError(
                f"{path} is not a rankcut checkpoint (no rankcut metadata); "
                "make one with: rankcut init --arch ARCH --weights FILE -o OUT.safetensors"
            )
        if md["rankcut.format"] != FORMAT:
            raise RankcutError(f"{path} has checkpoint format {md['rankcut.format']!r}; this rankcut reads {FORMAT}")
        try:
            kwargs = json.loads(md["rankcut.arch_kwargs"])
            contract = InputContract.from_dict(json.loads(md["rankcut.input"]))
            edits = tuple(edit_from_dict(e) for e in _json_list(md["rankcut.edits"]))
            history = tuple(_json_list(md.get("rankcut.history", "[]")))
            classes = None if "rankcut.classes" not in md else tuple(_json_list(md["rankcut.classes"]))
            arch = md["rankcut.arch"]
        except (KeyError, ValueError, TypeError, RecursionError) as e:
            # RecursionError: a hostile header can nest JSON arrays millions deep.
            first = (str(e).splitlines() or [""])[0][:200]
            raise RankcutError(f"{path} has damaged rankcut metadata ({type(e).__name__}: {first})") from None
        if not isinstance(kwargs, dict):
            raise RankcutError(f"{path} has damaged rankcut metadata (arch_kwargs is not an object)")
        if not all(isinstance(h, dict) for h in history):
            raise RankcutError(f"{path} has damaged rankcut metadata (history entries must be objects)")
        if classes is not None and not all(isinstance(c, str) for c in classes):
            raise RankcutError(f"{path} has damaged rankcut metadata (class names must be strings)")
        return cls(arch, kwargs, contract, edits, history, classes)


def _json_list(text: str) -> list:
    value = json.loads(text)
    if not isinstance(value, list):
        raise ValueError("expected a JSON list")
    return value


def build_model(meta: CheckpointMeta, trusted: bool = False) -> nn.Module:
    """The module tree the checkpoint describes (base architecture plus edits), with placeholder weights."""
    model = archs.build(meta.arch, meta.arch_kwargs, trusted=trusted)
    for edit in meta.edits:
        edit.apply(model)
    return model


def original_widths(meta: CheckpointMeta, trusted: bool = False) -> dict[str, int]:
    """Each conv/linear layer's output width in the base architecture, before any edit (on the meta device
    where the builder allows): what a pruned producer had before its channels were removed, and the width a
    pair's rank is measured against."""
    try:
        with torch.device("meta"):
            base = archs.build(meta.arch, meta.arch_kwargs, trusted=trusted)
    except archs.NeedsRealTensors:
        base = archs.build(meta.arch, meta.arch_kwargs, trusted=trusted)
    return {name: m.weight.shape[0] for name, m in base.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


def _header(path: str) -> tuple[dict[str, str] | None, dict[str, tuple[int, ...]], dict[str, str]]:
    require_file(path, "checkpoint")
    try:
        with safe_open(path, framework="pt") as f:
            md = f.metadata()
            shapes, dtypes = {}, {}
            for key in f.keys():
                sl = f.get_slice(key)
                shapes[key] = tuple(sl.get_shape())
                dtypes[key] = sl.get_dtype()
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        if is_torch_save_file(path):
            raise RankcutError(f"{path} is a PyTorch torch.save file, not a rankcut checkpoint; make one from its "
                               f"weights with: rankcut init --arch ARCH --weights {path} -o OUT.safetensors") from None
        raise RankcutError(f"{path} is not a readable safetensors file ({one_line(str(e))[:200]})") from None
    if md is not None and sum(len(v) for v in md.values()) > _MAX_HEADER_TEXT:
        raise RankcutError(f"{path} has implausibly large metadata")
    return md, shapes, dtypes


def read_meta(path: str | os.PathLike) -> CheckpointMeta:
    """The metadata of a rankcut checkpoint, without loading its tensors."""
    md, _, _ = _header(str(path))
    return CheckpointMeta.from_metadata(md, str(path))


def _check_structure(meta: CheckpointMeta, shapes: dict[str, tuple[int, ...]], path: str,
                     trusted: bool) -> nn.Module | None:
    """Compare the described module tree with the file's tensors, without allocating memory where possible.

    Returns the model when it had to be built for real (its builder needs tensor data), else None.
    """
    real = None
    try:
        with torch.device("meta"):
            skeleton = build_model(meta, trusted)
    except archs.NeedsRealTensors:
        skeleton = real = build_model(meta, trusted)
    problem = mismatches({k: tuple(v.shape) for k, v in skeleton.state_dict().items()}, shapes)
    if problem:
        raise RankcutError(f"{path} does not match its own description: {problem}")
    return real


def load_with_meta(path: str | os.PathLike, device: str | torch.device = "cpu",
                   trusted: bool = False) -> tuple[nn.Module, CheckpointMeta]:
    """Load a rankcut checkpoint: the model (in eval mode) and its metadata."""
    path = str(path)
    md, shapes, _ = _header(path)
    meta = CheckpointMeta.from_metadata(md, path)
    model = _check_structure(meta, shapes, path, trusted)
    if model is None:
        model = build_model(meta, trusted)
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise RankcutError(f"{path}: cannot read tensors ({one_line(str(e))[:200]})") from None
    bad = next((k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad is not None:  # NaN weights only give NaN outputs: a silent wrong answer in eval, a crash in svd
        raise RankcutError(f"{path}: tensor {bad} holds NaN or Inf values; the checkpoint is damaged or its "
                           "training diverged")
    try:
        model.load_state_dict(versioned(model, state), strict=True)
    except RuntimeError as e:  # names and shapes were checked above; this is a dtype the model cannot take
        raise RankcutError(f"{path}: tensors do not load into the model ({str(e).strip().splitlines()[-1][:200]})") from None
    return model.to(device).eval(), meta


def load(path: str | os.PathLike, device: str | torch.device = "cpu", trusted: bool = False) -> nn.Module:
    """Load a rankcut checkpoint as an ``nn.Module`` in eval mode (see ``load_with_meta`` for metadata)."""
    return load_with_meta(path, device, trusted)[0]


def state_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict as standalone, contiguous CPU tensors (safetensors refuses shared storage)."""
    model = getattr(model, "module", model)
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}


def save(model: nn.Module, meta: CheckpointMeta, path: str | os.PathLike) -> None:
    """Write ``model`` with ``meta`` to ``path`` atomically (a temporary file, then a rename)."""
    tensors = state_tensors(model)
    metadata = meta.to_metadata()
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
