"""Test-time augmentation and ensembles as predictor wrappers.

A predictor maps a batch of image tiles ``(B, C, H, W)`` to one map per tile ``(B, H, W)``
(a ``(B, 1, H, W)`` output works too: only the last two axes are transformed). Predictors may
take and return ``torch.Tensor`` or ``numpy.ndarray``; the wrappers keep whatever type they
get. Wrappers average what the predictor returns, so wrap a predictor that returns
probabilities (after the sigmoid) to average probabilities, which is what blending expects.

``with_tta`` flips the input, runs the predictor, un-flips the output and averages; blending
never knows about TTA. ``ensemble`` averages several predictors the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from enum import StrEnum
from typing import TypeVar

import numpy as np
import torch

from inkpipe.pipeline.errors import ConfigError, check_choice

Array = TypeVar("Array", torch.Tensor, np.ndarray)
Predictor = Callable[[Array], Array]
"""(B, C, H, W) -> (B, H, W), torch tensors or NumPy arrays."""


class TtaMode(StrEnum):
    """Which symmetries test-time augmentation averages over (``--tta``; see :func:`with_tta`)."""

    NONE = "none"
    FLIPS = "flips"
    FLIPS_ROT90 = "flips+rot90"


# A dihedral transform of the last two axes: rotate by k*90 degrees after an optional
# horizontal flip. Its inverse is rotate by -k*90 degrees, then the same flip.
_Transform = tuple[int, bool]
_FLIPS: tuple[_Transform, ...] = (
    (0, False),  # identity
    (0, True),  # horizontal flip (x reversed)
    (2, True),  # vertical flip (y reversed) = rot180 of the horizontal flip
    (2, False),  # both flips = rot180
)
_ROT90S: tuple[_Transform, ...] = (
    (1, False),  # rot90
    (3, False),  # rot270
    (1, True),  # rot90 of hflip = transpose-like
    (3, True),  # rot270 of hflip
)
_TRANSFORMS: dict[TtaMode, tuple[_Transform, ...]] = {
    TtaMode.NONE: ((0, False),),
    TtaMode.FLIPS: _FLIPS,
    TtaMode.FLIPS_ROT90: _FLIPS + _ROT90S,
}


def _flip(x: Array, dims: tuple[int, ...]) -> Array:
    if not dims:
        return x
    if isinstance(x, torch.Tensor):
        return torch.flip(x, dims=dims)
    return np.flip(x, axis=dims)


def _rot90(x: Array, k: int) -> Array:
    if k % 4 == 0:
        return x
    if isinstance(x, torch.Tensor):
        return torch.rot90(x, k, dims=(-2, -1))
    return np.rot90(x, k, axes=(-2, -1))


def _flip_dims(transform: _Transform) -> tuple[int, ...] | None:
    """Return the axes one flip reverses to do ``transform`` (its own inverse), or None.

    None for the odd rotations. rot180 reverses both axes and the horizontal flip x, so
    rot180 of the flip reverses y only: one copy instead of two.
    """
    k, flip = transform
    if k % 2:
        return None
    dims = {-1} if flip else set()
    if k % 4 == 2:
        dims ^= {-2, -1}
    return tuple(sorted(dims))


def _forward(x: Array, transform: _Transform) -> Array:
    k, flip = transform
    dims = _flip_dims(transform)
    y = _flip(x, dims) if dims is not None else _rot90(_flip(x, (-1,)) if flip else x, k)
    # NumPy flips/rotations are views; predictors usually want contiguous memory.
    return np.ascontiguousarray(y) if isinstance(y, np.ndarray) else y


def _inverse(y: Array, transform: _Transform) -> Array:
    k, flip = transform
    dims = _flip_dims(transform)
    if dims is not None:
        return _flip(y, dims)
    z = _rot90(y, -k)
    return _flip(z, (-1,)) if flip else z


def with_tta(predictor: Predictor, mode: TtaMode | str = TtaMode.FLIPS) -> Predictor:
    """Wrap a predictor with test-time augmentation.

    Args:
        predictor: ``(B, C, H, W) -> (B, H, W)`` callable on tensors or arrays.
        mode: a :class:`TtaMode` or its value. ``"none"`` returns ``predictor`` itself;
            ``"flips"`` averages identity, horizontal, vertical and both flips (4 calls);
            ``"flips+rot90"`` adds the four 90-degree rotations and transposes, i.e. all 8
            symmetries of the square (8 calls). Rotations swap H and W, which is harmless for
            square tiles.

    Returns:
        A predictor with the same signature returning the average of the un-transformed
        outputs.

    Raises:
        ConfigError: unknown ``mode`` (the message suggests the closest one).
    """
    chosen = check_choice("TTA mode", mode, TtaMode)
    if chosen is TtaMode.NONE:
        return predictor
    transforms = _TRANSFORMS[chosen]

    def tta_predictor(batch: Array) -> Array:
        total: Array | None = None
        for transform in transforms:
            out = _inverse(predictor(_forward(batch, transform)), transform)
            total = out if total is None else total + out
        assert total is not None  # transforms is never empty
        return total / len(transforms)

    tta_predictor.__doc__ = f"{getattr(predictor, '__name__', 'predictor')} with TTA '{chosen}'."
    return tta_predictor


def ensemble(predictors: Sequence[Predictor]) -> Predictor:
    """Average several predictors.

    Args:
        predictors: one or more ``(B, C, H, W) -> (B, H, W)`` callables returning maps of the
            same shape (e.g. models of different folds, each possibly wrapped by
            :func:`with_tta`).

    Returns:
        A predictor returning the mean of their outputs.

    Raises:
        ConfigError: ``predictors`` is empty.
    """
    members = tuple(predictors)
    if not members:
        raise ConfigError("ensemble needs at least one predictor, got none; pass a list of models")
    if len(members) == 1:
        return members[0]

    def ensemble_predictor(batch: Array) -> Array:
        total: Array | None = None
        for member in members:
            out = member(batch)
            total = out if total is None else total + out
        assert total is not None
        return total / len(members)

    return ensemble_predictor
