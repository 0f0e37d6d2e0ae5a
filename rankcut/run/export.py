"""ONNX export, checked with ONNX Runtime against PyTorch before anything is written.

The exporter is torch's TorchScript-based one (``dynamo=False``): for rankcut's models (convolutions,
linears, pairs of them, BatchNorm, pooling, residual adds) it needs no ``onnxscript``, runs offline in a
tenth of a second where the ``torch.export``-based exporter takes seconds (``profile --runtime
onnxruntime`` exports every layer at every rank), and prints nothing on stdout, which the new exporter
does. Torch marks it deprecated; the graphs are checked numerically either way, so a change that broke
them would be an error here, not a silent difference.
"""

from __future__ import annotations

import io
import json
import os
import warnings
from dataclasses import dataclass
from types import ModuleType

import numpy as np
import torch
from torch import nn

from rankcut.errors import RankcutError, one_line
from rankcut.files.fileio import atomic_write
from rankcut.model.forward import eval_mode

INSTALL = "ONNX export and the onnxruntime runtime need the onnx extra: pip install 'rankcut[onnx]'"
OPSETS = range(13, 21)  # what the legacy exporter writes and current ONNX Runtime runs
INPUT, OUTPUT = "input", "output"


def require_onnx() -> tuple[ModuleType, ModuleType]:
    """``(onnx, onnxruntime)``, or a one-line error saying how to install them."""
    try:
        import onnx
        import onnxruntime
    except ImportError:
        raise RankcutError(INSTALL) from None
    return onnx, onnxruntime


def onnx_bytes(model: nn.Module, x: torch.Tensor, *, opset: int = 17, dynamic_batch: bool = False) -> bytes:
    """``model`` (in eval mode, on the CPU) as a serialised ONNX graph traced at input ``x``."""
    if opset not in OPSETS:
        raise RankcutError(f"--opset must be {OPSETS.start}..{OPSETS.stop - 1}, got {opset}")
    buffer = io.BytesIO()
    axes = {INPUT: {0: "batch"}, OUTPUT: {0: "batch"}} if dynamic_batch else None
    try:
        with eval_mode(model), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (x,), buffer, dynamo=False, opset_version=opset, input_names=[INPUT],
                              output_names=[OUTPUT], dynamic_axes=axes, do_constant_folding=True)
    except Exception as e:  # the exporter raises many types for an unsupported operator
        raise RankcutError(f"cannot export to ONNX: {one_line(str(e))[:200]}") from None
    return buffer.getvalue()


def session(data: bytes, threads: int | None = None):
    """An ONNX Runtime CPU session for a serialised graph; ``threads`` pins its intra-op thread count."""
    _, ort = require_onnx()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.inter_op_num_threads = 1
    if threads is not None:
        options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime's own exception types (InvalidGraph, Fail, ...)
        raise RankcutError(f"ONNX Runtime cannot load the graph: {str(e).strip().splitlines()[0][:200]}") from None


def ort_runner(sess, x: torch.Tensor):
    """A latency runner (see ``latency.compare``): one ONNX Runtime pass on a fixed input."""
    feed = {sess.get_inputs()[0].name: x.detach().cpu().numpy()}
    return lambda: sess.run(None, feed)


@dataclass(frozen=True)
class Agreement:
    """How far ONNX Runtime's outputs are from PyTorch's on the same inputs."""

    max_abs: float
    max_rel: float  # max |ort - torch| / max |torch|: relative to the output's scale, not element by element
    batches: tuple[int, ...]

    def to_dict(self) -> dict:
        return {"max_abs": self.max_abs, "max_rel": self.max_rel, "batches": list(self.batches)}


def agreement(model: nn.Module, sess, shape: tuple[int, ...], batches: tuple[int, ...], seed: int = 0) -> Agreement:
    """Run PyTorch and ONNX Runtime on the same seeded random inputs (one per batch size) and compare."""
    g = torch.Generator().manual_seed(seed)
    worst_abs, worst_rel = 0.0, 0.0
    model.eval()
    for b in batches:
        x = torch.randn(b, *shape, generator=g)
        with torch.inference_mode():
            want = model(x).double().numpy()
        got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0].astype(np.float64)
        if got.shape != want.shape or not np.isfinite(got).all() or not np.isfinite(want).all():
            return Agreement(float("inf"), float("inf"), batches)
        diff = float(np.abs(got - want).max())
        worst_abs = max(worst_abs, diff)
        worst_rel = max(worst_rel, diff / max(float(np.abs(want).max()), 1e-30))
    return Agreement(worst_abs, worst_rel, batches)


def with_metadata(data: bytes, props: dict[str, str]) -> bytes:
    """The graph with ``props`` added to its ``metadata_props`` (what a deployer reads with any ONNX tool)."""
    onnx, _ = require_onnx()
    proto = onnx.load_from_string(data)
    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.producer_name = "rankcut (torch.onnx)"
    return proto.SerializeToString()


def contract_props(meta, digest: str) -> dict[str, str]:
    """The input contract and provenance of a checkpoint as ONNX metadata props (strings)."""
    c = meta.input
    return {
        "rankcut.input": json.dumps(c.to_dict()),
        "rankcut.input_note": (f"float32 NCHW, {INPUT}[n] = (image in [0, 1] - mean) / std per channel, "
                               f"one image {'x'.join(map(str, c.shape))}"),
        "rankcut.arch": meta.arch,
        "rankcut.edits": json.dumps([e.kind for e in meta.edits]),
        "rankcut.history": json.dumps(list(meta.history)),
        "rankcut.checkpoint_sha256": digest,
    }


def export(model: nn.Module, meta, digest: str, path: str | os.PathLike, *, opset: int = 17,
           dynamic_batch: bool = False, batch_size: int = 1, tolerance: float = 1e-4) -> dict:
    """Write ``model`` as ONNX to ``path`` after ONNX Runtime agrees with PyTorch within ``tolerance`` (relative).

    The graph is built and checked in memory, then written atomically: a mismatch writes nothing.
    """
    require_onnx()
    if batch_size < 1:
        raise RankcutError(f"--batch-size must be at least 1, got {batch_size}")
    model = model.cpu().eval()
    x = torch.randn(batch_size, *meta.input.shape, generator=torch.Generator().manual_seed(0))
    data = with_metadata(onnx_bytes(model, x, opset=opset, dynamic_batch=dynamic_batch), contract_props(meta, digest))
    batches = (batch_size, batch_size + 2) if dynamic_batch else (batch_size,)
    check = agreement(model, session(data), meta.input.shape, batches)
    if not np.isfinite(check.max_rel):
        raise RankcutError("PyTorch or ONNX Runtime gave NaN, Inf or misshaped outputs on random inputs "
                           "(non-finite weights?); nothing written")
    if not check.max_rel <= tolerance:
        raise RankcutError(f"ONNX Runtime disagrees with PyTorch: max abs error {check.max_abs:.3g}, relative "
                           f"{check.max_rel:.3g} > tolerance {tolerance:g}; nothing written")

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    atomic_write(path, write)
    return {"output": str(path), "opset": opset, "dynamic_batch": dynamic_batch, "batch_size": batch_size,
            "bytes": len(data), "tolerance": tolerance, **check.to_dict()}
