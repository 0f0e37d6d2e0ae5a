"""``rankcut export``: a checkpoint as a plain ONNX graph, checked with ONNX Runtime before it is written."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from rankcut.cli.console import Reporter
from rankcut.cli.options import Checkpoint, Force, Json, Output, Quiet
from rankcut.files.checkpoint import load_with_meta
from rankcut.files.fileio import check_output, file_digest
from rankcut.run.export import export as export_onnx
from rankcut.run.export import require_onnx


def export(
    checkpoint: Checkpoint,
    output: Output,
    opset: Annotated[int, typer.Option("--opset", help="ONNX opset version (13..20).")] = 17,
    dynamic_batch: Annotated[bool, typer.Option("--dynamic-batch", help="Let the batch dimension vary (else fixed at --batch-size).")] = False,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Batch size traced (and checked).")] = 1,
    tolerance: Annotated[float, typer.Option("--tolerance", help="Largest accepted max |ORT - torch| / max |torch|.")] = 1e-4,
    force: Force = False,
    json_out: Json = False,
    quiet: Quiet = False,
) -> None:
    """Export a checkpoint to ONNX; ONNX Runtime must match PyTorch on random inputs, else nothing is written.

    The graph takes the normalised input, (image - mean) / std; the input contract (shape, mean, std), the
    architecture, edits and history are in the model's metadata_props (keys rankcut.*).
    """
    report = Reporter(quiet, json_out)
    require_onnx()
    check_output(output, [checkpoint], force)
    model, meta = load_with_meta(checkpoint)
    result = export_onnx(model, meta, file_digest(checkpoint), output, opset=opset, dynamic_batch=dynamic_batch,
                         batch_size=batch_size, tolerance=tolerance)
    table = Table("", output, title=f"ONNX export of {checkpoint}", title_justify="left")
    table.add_row("opset", str(opset))
    table.add_row("batch", "dynamic" if dynamic_batch else str(batch_size))
    table.add_row("max abs error vs torch", f"{result['max_abs']:.3g}")
    table.add_row("max relative error", f"{result['max_rel']:.3g} (tolerance {tolerance:g})")
    table.add_row("bytes", f"{result['bytes']:,}")
    report.result({"checkpoint": checkpoint, **result}, table)
