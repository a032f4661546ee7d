"""The random streams of a run, saved in ``last.pt`` so that ``--resume`` continues them.

A run draws from: Python's ``random``, NumPy's global generator, torch's CPU generator (and
each CUDA device's), the DataLoader's generator (it draws the workers' base seed whenever the
loader starts its workers) and the augmentation's own generators (the depth shift, and the
pair albumentations' transforms share). :func:`capture_rng` records them all at the end of an
epoch and :func:`restore_rng` sets them back in place, so the epochs after a resume draw what
they would have drawn without the interruption. The sampler needs nothing here: its draws
are seeded by ``(seed, epoch)``, and the hard-negative pool is mined again from the weights.

With DataLoader workers (``--workers N > 0``) the augmentation runs in the workers, whose
generators live in their processes and are not captured; the README says what then differs.

Everything is stored as tensors, ints, strings, lists and dicts, which
``torch.load(weights_only=True)`` reads.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

from .augment import Augment

__all__ = ["capture_rng", "restore_rng"]


def _numpy_global() -> dict[str, Any]:
    name, key, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    return {
        "name": name,
        "key": torch.from_numpy(np.asarray(key, dtype=np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "gauss": float(gauss),
    }


def _set_numpy_global(state: dict[str, Any]) -> None:
    key = np.asarray(state["key"].numpy(), dtype=np.uint32)
    np.random.set_state((state["name"], key, state["pos"], state["has_gauss"], state["gauss"]))


def _python(rng: random.Random | None = None) -> list[Any]:
    version, internal, gauss = (rng or random).getstate()
    return [version, list(internal), gauss]


def _set_python(state: list[Any], rng: random.Random | None = None) -> None:
    version, internal, gauss = state
    (rng or random).setstate((version, tuple(internal), gauss))


def _augment(augment: Augment | None) -> dict[str, Any]:
    if augment is None:
        return {}
    out: dict[str, Any] = {"depth": augment._depth_rng.bit_generator.state}
    if augment.compose is not None:
        out["numpy"] = augment.compose.random_generator.bit_generator.state
        out["python"] = _python(augment.compose.py_random)
    return out


def _set_augment(state: dict[str, Any], augment: Augment | None) -> None:
    if augment is None or not state:
        return
    augment._depth_rng.bit_generator.state = state["depth"]
    if augment.compose is not None and "numpy" in state:
        # In place: the transforms share these two generator objects.
        augment.compose.random_generator.bit_generator.state = state["numpy"]
        _set_python(state["python"], augment.compose.py_random)


def capture_rng(augment: Augment | None, loader_generator: torch.Generator | None) -> dict:
    """Return the state of every random stream of a run (see the module docstring).

    Args:
        augment: the in-process augmentation (the dataset's), or None.
        loader_generator: the DataLoader's ``generator``, or None.
    """
    return {
        "python": _python(),
        "numpy": _numpy_global(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "loader": None if loader_generator is None else loader_generator.get_state(),
        "augment": _augment(augment),
    }


def restore_rng(
    state: dict, augment: Augment | None, loader_generator: torch.Generator | None
) -> None:
    """Set every random stream back to ``state`` from :func:`capture_rng`, in place."""
    _set_python(state["python"])
    _set_numpy_global(state["numpy"])
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available():
        for device, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, device)
    if loader_generator is not None and state["loader"] is not None:
        loader_generator.set_state(state["loader"])
    _set_augment(state["augment"], augment)
