"""Option aliases shared by every command, so ``--device``/``--seed``/... mean the same everywhere."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

Device = Annotated[str, typer.Option("--device", help="auto, cpu or cuda (auto: CUDA when available).")]
Seed = Annotated[int, typer.Option("--seed", help="Seed for sampling, shuffling, probes and initialisation.")]
BatchSize = Annotated[int, typer.Option("--batch-size", "-b", help="Images per batch (per process under torchrun).")]
Workers = Annotated[int, typer.Option("--workers", help="DataLoader worker processes (0: load in the main process).")]
Json = Annotated[bool, typer.Option("--json", help="Print the result as one JSON object on stdout.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress or log lines on stderr (warnings still).")]
Output = Annotated[str, typer.Option("--output", "-o", help="File to write (atomically: never half-written).")]
Force = Annotated[bool, typer.Option("--force", help="Allow the output to overwrite one of the inputs.")]
Checkpoint = Annotated[str, typer.Argument(help="A rankcut checkpoint (.safetensors).", show_default=False)]
Data = Annotated[str, typer.Option("--data", "-d", help=(
    "Data: a folder (ImageFolder), FILE.npz / FILE.safetensors (x, y), mnist5k:train|test, synthetic[:N], "
    "or mnist|fashion-mnist|cifar10|cifar100:DIR[:train|test]."))]
Samples = Annotated[Optional[int], typer.Option("--samples", "-n", help="Use a seeded random subset of N samples.")]


def _split_commas(values: Optional[list[str]]) -> Optional[list[str]]:
    """``--layers conv2,fc1`` as ``--layers conv2 --layers fc1`` (layer names hold no commas)."""
    if values is None:
        return None
    return [part.strip() for value in values for part in value.split(",")]


Layers = Annotated[Optional[list[str]], typer.Option("--layers", callback=_split_commas, help=(
    "Globs over layer names to include (comma-separated or repeated)."))]
Exclude = Annotated[Optional[list[str]], typer.Option("--exclude", callback=_split_commas, help=(
    "Globs over layer names to exclude (comma-separated or repeated)."))]
Structure = Annotated[str, typer.Option("--structure", help=(
    "pair: rank-k pairs (the default); channels: remove channels of producer -> consumer chains, refitting the "
    "consumer by least squares (stats --structure channels gathers the statistics it needs); project also takes "
    "auto: each layer whole, a fisher pair or channel-pruned, chosen jointly under --macs/--params (statistics "
    "with --grad kl --structure channels)."))]
LatencySeconds = Annotated[float, typer.Option("--seconds", help=(
    "How long each latency comparison lasts (at least 10 rounds): the neighbours on a shared machine change the "
    "ratio itself over tens of seconds, so a longer comparison is a steadier one."))]
