"""torchrun detection and the few collective operations rankcut needs."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as td

from rankcut.errors import RankcutError


@dataclass(frozen=True)
class Context:
    """Where this process stands: its rank among ``world`` processes and its device."""

    rank: int
    world: int
    device: torch.device

    @property
    def primary(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` picks CUDA when present; ``cuda`` without a GPU is a user error."""
    if name not in ("auto", "cpu", "cuda"):
        raise RankcutError(f"--device must be auto, cpu or cuda, got {name!r}")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RankcutError("--device cuda was asked for but no CUDA GPU is available")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def setup(device: str) -> Context:
    """Join the process group when started by torchrun (gloo on CPU, NCCL on GPU); else a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    dev = resolve_device(device, int(os.environ.get("LOCAL_RANK", "0")))
    if world > 1 and not td.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        td.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Context(rank, world, dev)


def teardown(ctx: Context) -> None:
    if ctx.distributed and td.is_initialized():
        td.destroy_process_group()


def all_reduce_sum_(tensors: list[torch.Tensor], ctx: Context) -> None:
    """Sum each tensor over all processes, in place (a no-op for one process)."""
    if not ctx.distributed:
        return
    for t in tensors:
        on_device = t.to(ctx.device)  # NCCL reduces GPU tensors only; gloo takes either
        td.all_reduce(on_device, op=td.ReduceOp.SUM)
        t.copy_(on_device)


def barrier(ctx: Context) -> None:
    if ctx.distributed:
        td.barrier()


def all_gather_rows(t: torch.Tensor, ctx: Context) -> torch.Tensor:
    """The rows of ``t`` from every process, concatenated in rank order (each may have a different number)."""
    if not ctx.distributed:
        return t
    counts = torch.zeros(ctx.world, dtype=torch.int64, device=ctx.device)
    counts[ctx.rank] = len(t)
    all_reduce_sum_([counts], ctx)
    most = int(counts.max().item())
    padded = torch.zeros(most, *t.shape[1:], dtype=t.dtype, device=ctx.device)
    padded[:len(t)] = t
    parts = [torch.empty_like(padded) for _ in range(ctx.world)]
    td.all_gather(parts, padded)
    return torch.cat([part[:int(n)] for part, n in zip(parts, counts.tolist())]).to(t.device)
