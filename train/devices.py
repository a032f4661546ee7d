"""Devices: parse ``--device`` and give each process its own GPU.

``--device`` is one of:

- ``auto``: CUDA when a GPU is visible, else the CPU;
- ``cpu``;
- ``cuda``: this process's GPU: under a launcher the one of its ``LOCAL_RANK`` (rank 0 of a
  node on ``cuda:0``, rank 1 on ``cuda:1``, …), else ``cuda:0``;
- ``cuda:N``: GPU ``N`` (counted among the GPUs ``CUDA_VISIBLE_DEVICES`` leaves visible),
  for one process per node.

Launchers describe the process in the environment: ``torchrun`` (and ``accelerate launch``,
which starts its processes through torchrun) set ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK`` and
``LOCAL_WORLD_SIZE``; without them this is one process of rank 0.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from inkpipe.pipeline.errors import ConfigError, closest

__all__ = ["DEVICES", "DEVICE_HELP", "Launch", "check_device", "read_launch", "select_device"]

DEVICES = ("auto", "cpu", "cuda")  # the named choices; cuda:N besides
DEVICE_HELP = "auto, cpu, cuda (under torchrun: the GPU of each process's LOCAL_RANK) or cuda:N"
_CUDA_INDEX = re.compile(r"cuda:(\d+)")


@dataclass(frozen=True)
class Launch:
    """Where this process sits among those a launcher started (one process by default).

    Attributes:
        rank: global rank, in ``[0, world_size)``.
        local_rank: rank on this node, in ``[0, local_world_size)``; picks the GPU.
        world_size: processes in all; local_world_size: processes on this node.
    """

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1


def read_launch(env: Mapping[str, str] | None = None) -> Launch:
    """Read ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE`` (``os.environ``).

    Missing variables take the one-process values; ``LOCAL_WORLD_SIZE`` defaults to
    ``WORLD_SIZE`` (one node).

    Raises:
        ConfigError: a variable is not an integer, or the ranks do not fit the sizes.
    """
    env = os.environ if env is None else env

    def read(name: str, default: int, minimum: int) -> int:
        text = env.get(name, "").strip()
        if not text:
            return default
        if not re.fullmatch(r"\d+", text) or int(text) < minimum:
            raise ConfigError(
                f"environment variable {name}={text!r}: expected an integer >= {minimum}; "
                "unset it, or let torchrun set it"
            )
        return int(text)

    world = read("WORLD_SIZE", 1, 1)
    launch = Launch(
        rank=read("RANK", 0, 0),
        local_rank=read("LOCAL_RANK", 0, 0),
        world_size=world,
        local_world_size=read("LOCAL_WORLD_SIZE", world, 1),
    )
    if launch.rank >= launch.world_size or launch.local_rank >= launch.local_world_size:
        raise ConfigError(
            f"environment: RANK {launch.rank} of WORLD_SIZE {launch.world_size}, LOCAL_RANK "
            f"{launch.local_rank} of LOCAL_WORLD_SIZE {launch.local_world_size}; expected each "
            "rank below its size; unset them, or let torchrun set them"
        )
    return launch


def check_device(name: str) -> str:
    """Return ``name`` if it is ``auto``, ``cpu``, ``cuda`` or ``cuda:N``, else raise.

    Only the spelling is checked here (configs are checked where no GPU may be visible);
    :func:`select_device` checks that the GPU exists.

    Raises:
        ConfigError: another name, with the closest valid one.
    """
    if name in DEVICES or _CUDA_INDEX.fullmatch(str(name)):
        return name
    raise ConfigError(
        f"unknown device '{name}'{closest(str(name), (*DEVICES, 'cuda:0'))} (choose from "
        f"{DEVICE_HELP})"
    )


def select_device(name: str, env: Mapping[str, str] | None = None) -> torch.device:
    """Return the torch device for ``--device name`` in this process (see the module doc).

    ``cuda`` and ``auto`` with a GPU give ``cuda:LOCAL_RANK``, so every process a launcher
    starts on a node gets its own GPU; ``env`` defaults to ``os.environ``.

    Raises:
        ConfigError: an unknown name; CUDA asked for without a GPU; ``cuda:N`` beyond the
            visible GPUs, or shared by several processes of a node; more processes on the
            node than GPUs.
    """
    check_device(name)
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(
            f"--device {name} was asked for but no CUDA GPU is available; use auto or cpu"
        )
    count = torch.cuda.device_count()
    launch = read_launch(env)
    match = _CUDA_INDEX.fullmatch(name)
    if match:
        index = int(match.group(1))
        if index >= count:
            raise ConfigError(
                f"--device {name}: there is no GPU {index}, {count} CUDA GPU(s) are visible "
                f"(cuda:0 … cuda:{count - 1}); choose one of them, or cuda"
            )
        if launch.local_world_size > 1:
            raise ConfigError(
                f"--device {name} would put all {launch.local_world_size} processes of this "
                "node on one GPU; pass --device cuda (or auto) so each process takes the GPU "
                "of its LOCAL_RANK"
            )
        return torch.device("cuda", index)
    if launch.local_rank >= count:
        raise ConfigError(
            f"LOCAL_RANK {launch.local_rank} has no GPU of its own: {count} CUDA GPU(s) are "
            f"visible; start at most {count} processes per node (torchrun --nproc-per-node "
            f"{count})"
        )
    return torch.device("cuda", launch.local_rank)
