"""torch.distributed set-up shared by the multi-process commands: the backend follows the device.

NCCL for a process that works on a CUDA device, gloo on the CPU. Under ``torchrun`` each process
takes the CUDA device of its ``LOCAL_RANK`` (modulo the devices present).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["init_process_group", "process_device"]


def process_device(local_rank: int, cpu: bool = False) -> torch.device:
    """This process's device: CUDA device ``local_rank`` (modulo the count) when CUDA is there and not ``cpu``."""
    if not cpu and torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def init_process_group(device: torch.device, init_method: str | None = None, rank: int = -1,
                       world_size: int = -1) -> str:
    """Join the process group: NCCL for a CUDA ``device`` (made current), else gloo; the backend's name.

    By default ``torchrun``'s (its environment variables); else ``rank`` of ``world_size`` meeting at
    ``init_method`` (e.g. ``file:///tmp/x/store``).
    """
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend, init_method=init_method, rank=rank, world_size=world_size)
    return backend
