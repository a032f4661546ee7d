"""Distributed training helpers: which rank this is, and the collective calls the loop needs.

Under torchrun (or ``accelerate launch``) each process trains on its own device, chosen by
:func:`inkpipe.train.devices.select_device` from its ``LOCAL_RANK``. Rank 0 alone validates,
logs and saves at the end of an epoch while the other ranks wait in a barrier; validation runs
no collective call (it predicts with the unwrapped model), so the others cannot deadlock, and
the process group's timeout is long enough for a whole-fragment validation.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .devices import read_launch

# How long a rank waits in a collective call, e.g. for rank 0's validation and checkpoints
# at the end of an epoch. torch's defaults (10 min for NCCL, 30 for gloo) can be shorter than
# a whole-fragment validation; a rank that dies still ends the run at once (torchrun stops the
# others).
TIMEOUT = timedelta(hours=2)


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
    """Join the torchrun process group if WORLD_SIZE > 1 (gloo on CPU, nccl on CUDA).

    On CUDA, ``device`` (this process's GPU, ``cuda:LOCAL_RANK``) becomes the current device
    first, so NCCL and every tensor made on ``"cuda"`` use it rather than GPU 0.
    """
    if device.type == "cuda":
        torch.cuda.set_device(device)
    world = read_launch().world_size
    if world <= 1:
        yield Dist()
        return
    if device.type == "cuda":
        dist.init_process_group("nccl", timeout=TIMEOUT, device_id=device)
    else:
        dist.init_process_group("gloo", timeout=TIMEOUT)
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
