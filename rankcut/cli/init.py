"""``rankcut init``: make a checkpoint from an architecture and (optionally) existing weights."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Optional

import torch
import typer
from rich.table import Table

from rankcut.model import archs
from rankcut.model.archs import InputContract
from rankcut.files.checkpoint import CheckpointMeta, save
from rankcut.cli.console import Reporter
from rankcut.errors import RankcutError
from rankcut.files.fileio import check_output, require_file
from rankcut.model.attention import self_attention_layers
from rankcut.model.cost import count_macs, count_params
from rankcut.model.edits import SplitMultiheadAttention
from rankcut.files.weights import load_weights
from rankcut.cli.options import Force, Json, Output, Quiet, Seed


def _floats(text: str, what: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise RankcutError(f"{what} must be comma-separated numbers, got {text!r}") from None


def _ints(text: str, what: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise RankcutError(f"{what} must be comma-separated whole numbers, got {text!r}") from None


def _memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def _check_size(arch: str, kwargs: dict) -> None:
    """Refuse, before allocating anything, a built-in architecture whose arguments make it absurdly large."""
    if not arch.startswith(("torchvision:", "timm:", "rankcut:")):
        return  # user code may not build on the meta device; the user wrote it and typed its name
    try:
        with torch.device("meta"):
            skeleton = archs.build(arch, kwargs)
    except archs.NeedsRealTensors:
        return  # its builder computes with tensor values: only a real build can tell its size
    need = sum(t.numel() * t.element_size() for t in skeleton.state_dict().values())
    have = _memory_bytes()
    if have is not None and need > have:
        raise RankcutError(f"{arch} with {json.dumps(kwargs, sort_keys=True)} needs {need / 2**30:,.1f} GiB "
                           f"for its weights; this machine has {have / 2**30:,.1f} GiB")


def _contract(arch: str, kwargs: dict, shape: str | None, mean: str | None, std: str | None) -> InputContract:
    default = archs.default_input(arch, kwargs)
    dims = default.shape if shape is None else _ints(shape, "--input")
    channels = dims[0] if dims else 0
    fallback_mean = default.mean if channels == default.shape[0] else default.mean[:1] * channels
    fallback_std = default.std if channels == default.shape[0] else default.std[:1] * channels
    return InputContract(dims, _floats(mean, "--mean") if mean else fallback_mean,
                         _floats(std, "--std") if std else fallback_std)


def init(
    arch: Annotated[str, typer.Option("--arch", "-a", help="torchvision:NAME, timm:NAME, rankcut:NAME, or package.module:function.")],
    output: Output,
    num_classes: Annotated[Optional[int], typer.Option("--num-classes", help="Classifier outputs.")] = None,
    kwargs: Annotated[str, typer.Option("--kwargs", help="More builder keyword arguments as a JSON object.")] = "{}",
    weights: Annotated[Optional[str], typer.Option("--weights", "-w", help="Weights: .pth/.pt (read with weights_only=True) or .safetensors.")] = None,
    input_shape: Annotated[Optional[str], typer.Option("--input", help="Input shape C,H,W (default: the architecture's).")] = None,
    mean: Annotated[Optional[str], typer.Option("--mean", help="Per-channel normalisation mean, comma-separated.")] = None,
    std: Annotated[Optional[str], typer.Option("--std", help="Per-channel normalisation std, comma-separated.")] = None,
    seed: Seed = 0,
    force: Force = False,
    json_out: Json = False,
    quiet: Quiet = False,
) -> None:
    """Make a rankcut checkpoint from an architecture and optional weights."""
    report = Reporter(quiet, json_out)
    try:
        extra = json.loads(kwargs)
    except json.JSONDecodeError as e:
        raise RankcutError(f"--kwargs is not valid JSON: {e}") from None
    if not isinstance(extra, dict):
        raise RankcutError("--kwargs must be a JSON object, e.g. '{\"width\": 32}'")
    if num_classes is not None:
        if num_classes < 1:
            raise RankcutError(f"--num-classes must be at least 1, got {num_classes}")
        extra["num_classes"] = num_classes
    check_output(output, [weights], force)
    if weights is not None:
        require_file(weights, "weights file")
    contract = _contract(arch, extra, input_shape, mean, std)
    _check_size(arch, extra)
    torch.manual_seed(seed)
    model = archs.build(arch, extra, trusted=True).eval()
    source = "random (seed %d)" % seed
    if weights is not None:
        load_weights(model, weights)
        source = Path(weights).name
    try:
        # Self-attention layers are split into plain linears (qkv, out_proj) so they can be targets.
        splits = [SplitMultiheadAttention(n) for n in self_attention_layers(model, lambda: count_macs(model, contract))]
        for edit in splits:
            edit.apply(model)
        macs, _ = count_macs(model, contract)
    except RuntimeError as e:
        raise RankcutError(f"{arch} cannot run on input {contract.shape}: {str(e).splitlines()[0][:160]}") from None
    meta = CheckpointMeta(arch, extra, contract).with_edits(*splits).with_history("init", weights=source)
    save(model, meta, output)
    data = {"output": output, "arch": arch, "arch_kwargs": extra, "input": contract.to_dict(),
            "weights": source, "params": count_params(model), "macs": macs}
    table = Table(show_header=False, box=None)
    for key in ("output", "arch", "weights", "params", "macs"):
        table.add_row(key, f"{data[key]:,}" if isinstance(data[key], int) else str(data[key]))
    report.result(data, table)
