"""torchrun / DistributedDataParallel helpers (NCCL on CUDA, gloo on the CPU)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init_distributed(device_kind: str) -> tuple[int, int, int]:
    """Join the process group when launched by torchrun. Returns (rank, world_size, local_rank)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_kind == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few scalars over all processes (identity when not distributed)."""
    if not is_distributed():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm statistics) to every process. Training updates them per process
    between DDP's own broadcasts, so do this before validating or averaging."""
    if is_distributed():
        for buf in module.buffers():
            dist.broadcast(buf, src=0)


def cleanup() -> None:
    """Leave the process group."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
