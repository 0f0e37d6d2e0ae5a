"""``rankcut init``: make a checkpoint from an architecture and (optionally) existing weights."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Annotated, Optional

import torch
import typer
from rich.table import Table

from rankcut.model import archs
from rankcut.model.contract import InputContract
from rankcut.files.checkpoint import CheckpointMeta, save
from rankcut.cli.console import Reporter
from rankcut.errors import RankcutError, RankcutWarning
from rankcut.files.fileio import check_output, require_file
from rankcut.model.attention import self_attention_layers
from rankcut.model.cost import count_macs, count_params
from rankcut.model.edits import SplitMultiheadAttention
from rankcut.files.weights import load_weights
from rankcut.run.evaluate import output_classes
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


def _names(text: str | None) -> tuple[str, ...] | None:
    """``--classes a,b,c`` as a tuple of distinct, non-empty names."""
    if text is None:
        return None
    names = tuple(n.strip() for n in text.split(","))
    if not all(names) or len(set(names)) != len(names):
        raise RankcutError(f"--classes must be distinct, non-empty names separated by commas, got {text!r}")
    return names


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


def _contract(arch: str, kwargs: dict, dims: tuple[int, ...] | None, mean: str | None,
              std: str | None) -> tuple[InputContract, str | None]:
    """The input contract from --input/--mean/--std and the architecture's defaults, and a note if guessed.

    A user architecture needs --input; mean/std the architecture is not known to use are announced,
    since weights trained with other statistics would suffer.
    """
    if dims is None and not arch.startswith(("torchvision:", "timm:", "rankcut:")):
        raise RankcutError(f"give --input C,H,W (and --mean, --std) for {arch}: rankcut cannot tell what input "
                           "your architecture takes")
    dims = archs.default_input(arch, kwargs).shape if dims is None else dims
    own = archs.own_normalisation(arch, dims[0])
    fallback = own or archs.generic_normalisation(dims[0])
    note = None
    if own is None and not (mean and std):
        note = (f"{arch} has no known normalisation for {dims[0]} channel(s): images will be normalised with "
                f"mean {fallback[0]} and std {fallback[1]}; pass --mean and --std if the model is (or will be) "
                "trained with other statistics")
    contract = InputContract(dims, _floats(mean, "--mean") if mean else fallback[0],
                             _floats(std, "--std") if std else fallback[1])
    return contract, note


def init(
    arch: Annotated[str, typer.Option("--arch", "-a", help="torchvision:NAME, timm:NAME, rankcut:NAME, or package.module:function.")],
    output: Output,
    num_classes: Annotated[Optional[int], typer.Option("--num-classes", help="Classifier outputs.")] = None,
    kwargs: Annotated[str, typer.Option("--kwargs", help="More builder keyword arguments as a JSON object.")] = "{}",
    weights: Annotated[Optional[str], typer.Option("--weights", "-w", help="Weights: .pth/.pt (read with weights_only=True) or .safetensors.")] = None,
    input_shape: Annotated[Optional[str], typer.Option("--input", help="Input shape C,H,W (default: the architecture's; needed for your own). A built-in's in_channels follows it.")] = None,
    mean: Annotated[Optional[str], typer.Option("--mean", help="Per-channel normalisation mean, comma-separated.")] = None,
    std: Annotated[Optional[str], typer.Option("--std", help="Per-channel normalisation std, comma-separated.")] = None,
    classes: Annotated[Optional[str], typer.Option("--classes", help=(
        "Class names in output order, comma-separated: recorded, so labelled folders are read by name."))] = None,
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
    names = _names(classes)
    dims = None if input_shape is None else _ints(input_shape, "--input")
    if dims is not None and len(dims) != 3:
        raise RankcutError(f"--input must be C,H,W, got {input_shape!r}")
    if dims is not None:  # a built-in that takes in_channels follows --input
        extra = archs.with_input_channels(arch, extra, dims[0])
    check_output(output, [weights], force)
    if weights is not None:
        require_file(weights, "weights file")
    _check_size(arch, extra)
    torch.manual_seed(seed)
    model = archs.build(arch, extra, trusted=True).eval()
    contract, note = _contract(arch, extra, dims, mean, std)
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
    if names is not None:
        scored = output_classes(model, contract)
        if len(names) != scored:
            raise RankcutError(f"--classes names {len(names)} classes but {arch} scores {scored}"
                               f"{'' if num_classes else f'; add --num-classes {len(names)}'}")
        meta = meta.with_classes(names)
    if note:
        warnings.warn(note, RankcutWarning)
    save(model, meta, output)
    data = {"output": output, "arch": arch, "arch_kwargs": extra, "input": contract.to_dict(),
            "weights": source, "params": count_params(model), "macs": macs, "classes": names}
    table = Table(show_header=False, box=None)
    for key in ("output", "arch", "weights", "params", "macs"):
        table.add_row(key, f"{data[key]:,}" if isinstance(data[key], int) else str(data[key]))
    table.add_row("input", f"{'x'.join(map(str, contract.shape))}  mean {contract.mean}  std {contract.std}")
    report.result(data, table)
