"""Distributed training helpers: which rank this is, and the collective calls the loop needs."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    """Rank and world size (1 process unless launched by torchrun)."""

    rank: int = 0
    world_size: int = 1

    @property
    def main(self) -> bool:
        """True on the process that validates, logs and saves."""
        return self.rank == 0


@contextmanager
def distributed(device: torch.device) -> Iterator[Dist]:
    """Join the torchrun process group if WORLD_SIZE > 1 (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        yield Dist()
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend)
    try:
        yield Dist(dist.get_rank(), dist.get_world_size())
    finally:
        dist.destroy_process_group()


def agree(flag: bool, d: Dist, device: torch.device) -> bool:
    """Return rank 0's ``flag`` on every rank (so all ranks stop together)."""
    if d.world_size == 1:
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.broadcast(t, src=0)
    return bool(t.item())


def barrier(d: Dist) -> None:
    """Wait for every rank (no-op in one process)."""
    if d.world_size > 1:
        dist.barrier()
