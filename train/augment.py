"""Training augmentation of k-layer CT crops and their ink masks (albumentations 2).

Spatial transforms move the image and the mask together; the mask is always resampled with
nearest neighbour, so its values stay exactly the input values. Images are normalised
float32 (about zero mean, unit std), not 0..1, which rules out albumentations'
``RandomBrightnessContrast``: for float images it clips the result to [0, 1]. Brightness
and contrast are instead :class:`BrightnessContrastStd`, ``img * contrast + brightness`` in
std units, with no clipping.

Levels:

- ``none``: identity (only the dtype conversion to float32).
- ``light``: horizontal flip, vertical flip, ``RandomRotate90``: the eight dihedral poses.
- ``full``: ``light``, then :class:`BrightnessContrastStd`, ``Affine`` (scale 0.9-1.1,
  translate +-6.25 %, rotate +-15 degrees, reflected border) and ``CoarseDropout`` (one or two
  holes of 10-30 % of ``tile_px`` a side, image filled with 0 = the mean, mask with 0).

Seeding: albumentations' own ``Compose(seed=s)`` gives every transform its own generator
seeded with the same ``s``, so their draws are identical: with two p=0.5 flips, the vertical
flip happens exactly when the horizontal one does. So :class:`Augment` instead gives all its
transforms one shared generator (``Compose.set_random_state``), seeded from ``seed``.

DataLoader workers: each worker holds a copy of the augment with the same generator state,
which would repeat the same augmentations in every worker. :class:`Augment` notices when it
runs in a new worker (``torch.utils.data.get_worker_info()``) and reseeds itself from
``(seed, worker_info.seed)``. ``worker_info.seed`` is PyTorch's per-worker seed
(base seed + worker id, the base seed drawn from the DataLoader's generator each epoch), so
workers differ, epochs differ, and a run is reproducible when the DataLoader's generator (or
``torch.manual_seed``) is seeded. No ``worker_init_fn`` is needed; :func:`reseed` sets a
seed by hand.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from enum import StrEnum
from typing import Any

import albumentations as A
import cv2
import numpy as np
from numpy.typing import NDArray
from torch.utils.data import get_worker_info

from inkpipe.pipeline.checks import check_int
from inkpipe.pipeline.errors import check_choice

__all__ = [
    "AugLevel",
    "Augment",
    "AugmentFn",
    "BrightnessContrastStd",
    "build_augment",
    "reseed",
]


class AugLevel(StrEnum):
    """How much training crops are augmented (``--aug``; see the module docstring)."""

    NONE = "none"
    LIGHT = "light"
    FULL = "full"


AugmentFn = Callable[[NDArray[Any], NDArray[Any]], tuple[NDArray[np.float32], NDArray[np.float32]]]
"""``augment(image (k, H, W), mask (H, W)) -> (image, mask)``; see :func:`build_augment`."""


class BrightnessContrastStd(A.ImageOnlyTransform):
    """Random brightness and contrast for normalised float images, without clipping.

    ``img * (1 + c) + b`` with ``c`` uniform in ``contrast_limit`` and ``b`` uniform in
    ``brightness_limit``, both in units of the image's std (the image is about zero mean, so
    contrast scales around the mean). One draw for all channels.
    """

    def __init__(
        self,
        brightness_limit: tuple[float, float] = (-0.2, 0.2),
        contrast_limit: tuple[float, float] = (-0.2, 0.2),
        p: float = 0.5,
    ) -> None:
        super().__init__(p=p)
        self.brightness_limit = tuple(brightness_limit)
        self.contrast_limit = tuple(contrast_limit)

    def get_params(self) -> dict[str, float]:
        """Draw the contrast factor and the brightness shift."""
        return {
            "contrast": 1.0 + self.py_random.uniform(*self.contrast_limit),
            "brightness": self.py_random.uniform(*self.brightness_limit),
        }

    def apply(
        self, img: NDArray[np.float32], contrast: float = 1.0, brightness: float = 0.0, **_: Any
    ) -> NDArray[np.float32]:
        """Return ``img * contrast + brightness`` as float32."""
        return (img * np.float32(contrast) + np.float32(brightness)).astype(np.float32, copy=False)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        """Name the init arguments, for ``repr`` and serialisation."""
        return ("brightness_limit", "contrast_limit")


class Augment:
    """A picklable ``(image (k, H, W), mask (H, W)) -> (image, mask)`` augmentation.

    Built by :func:`build_augment`. Holds an ``A.Compose`` (or nothing, for level ``none``)
    whose transforms share one random generator; see the module docstring for seeding.
    """

    def __init__(self, level: str, compose: A.Compose | None, seed: int | None) -> None:
        self.level = level
        self.compose = compose
        self.seed = seed
        self._worker_seed: int | None = None
        self._depth_rng = np.random.default_rng(seed)
        reseed(self, seed)

    def __call__(
        self, image: NDArray[Any], mask: NDArray[Any], depth: int | None = None
    ) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
        """Augment one crop.

        Args:
            image: (k', H, W) float32 (any real dtype is converted), normalised CT layers.
            mask: (H, W) uint8 or float32 ink labels (any values; they are only moved).
            depth: keep this many consecutive layers of ``image``, starting at a uniformly
                drawn offset in ``[0, k' - depth]`` (the depth shift); None keeps all.

        Returns:
            ``(image, mask)``: (depth or k', H, W) float32 and (H, W) float32, new arrays.
        """
        if image.ndim != 3 or mask.ndim != 2 or image.shape[1:] != mask.shape:
            raise ValueError(
                f"expected image (k, H, W) and mask (H, W) of the same H, W, got "
                f"{image.shape} and {mask.shape}"
            )
        if depth is not None and image.shape[0] != depth:
            if not 1 <= depth <= image.shape[0]:
                raise ValueError(f"cannot keep {depth} of {image.shape[0]} layers")
            self._reseed_if_new_worker()
            z0 = int(self._depth_rng.integers(0, image.shape[0] - depth + 1))
            image = image[z0 : z0 + depth]
        if self.compose is None:
            return image.astype(np.float32, copy=True), mask.astype(np.float32, copy=True)
        self._reseed_if_new_worker()
        hwc = np.ascontiguousarray(image.transpose(1, 2, 0), dtype=np.float32)
        out = self.compose(image=hwc, mask=np.ascontiguousarray(mask))
        img = out["image"]
        if img.ndim == 2:  # some cv2 paths drop a single channel
            img = img[:, :, None]
        return (
            np.ascontiguousarray(img.transpose(2, 0, 1), dtype=np.float32),
            np.ascontiguousarray(out["mask"], dtype=np.float32),
        )

    def _reseed_if_new_worker(self) -> None:
        info = get_worker_info()
        if info is not None and info.seed != self._worker_seed:
            _seed_compose(self, np.random.SeedSequence([_entropy(self.seed), info.seed]))
            self._worker_seed = info.seed

    def __repr__(self) -> str:
        return f"Augment(level={str(self.level)!r}, seed={self.seed!r})"


def _entropy(seed: int | None) -> int:
    # Seeded augments mix their seed into a worker's; unseeded ones use the worker seed alone
    # (any fixed value works: it is the same in every worker).
    return 0 if seed is None else seed


def _seed_compose(augment: Augment, seq: np.random.SeedSequence) -> None:
    state = seq.generate_state(3)
    augment._depth_rng = np.random.default_rng(int(state[2]))
    if augment.compose is None:
        return
    # One generator pair for all transforms: their draws come from one stream, in order.
    augment.compose.set_random_state(
        np.random.default_rng(int(state[0])), random.Random(int(state[1]))
    )


def reseed(augment: Augment, seed: int | None) -> None:
    """Restart ``augment``'s random stream from ``seed`` (``None``: fresh OS entropy).

    Two augments of the same level reseeded with the same seed give the same sequence of
    results for the same inputs. Inside a DataLoader worker the augment still reseeds itself
    per worker (see the module docstring) unless ``reseed`` was called in that worker.
    """
    augment.seed = seed
    _seed_compose(augment, np.random.SeedSequence(seed))
    info = get_worker_info()
    augment._worker_seed = None if info is None else info.seed


def build_augment(level: AugLevel | str, tile_px: int = 224, seed: int | None = None) -> Augment:
    """Build the augmentation for ``level``.

    Args:
        level: an :class:`AugLevel` or its value (``none``, ``light``, ``full``).
        tile_px: side of the crops, in pixels; sizes the ``CoarseDropout`` holes.
        seed: seed of the random stream (see :func:`reseed`); ``None`` draws one from the OS.

    Returns:
        An :class:`Augment`: ``augment(image, mask) -> (image, mask)``, image (k, H, W) float32
        for any k (1 to 65 tested), mask (H, W) uint8/float32 in and float32 out.

    Raises:
        ConfigError: unknown ``level`` (with the closest valid one) or ``tile_px < 1``.
    """
    level = check_choice("augmentation level", level, AugLevel)
    tile_px = check_int("tile_px", tile_px, 1)
    if level is AugLevel.NONE:
        return Augment(level, None, seed)
    transforms: list[A.BasicTransform] = [
        A.HorizontalFlip(p=0.5),
        A.VerticalFlip(p=0.5),
        A.RandomRotate90(p=0.5),
    ]
    if level is AugLevel.FULL:
        hole_px = (max(1, tile_px // 10), max(1, int(tile_px * 0.3)))
        transforms += [
            BrightnessContrastStd(brightness_limit=(-0.2, 0.2), contrast_limit=(-0.2, 0.2), p=0.5),
            A.Affine(
                scale=(0.9, 1.1),
                translate_percent=(-0.0625, 0.0625),
                rotate=(-15, 15),
                interpolation=cv2.INTER_LINEAR,
                mask_interpolation=cv2.INTER_NEAREST,
                # Reflection continues papyrus texture and labels alike; a constant border
                # would add blank corners the network never sees at inference.
                border_mode=cv2.BORDER_REFLECT_101,
                p=0.5,
            ),
            # Last, so holes hold exactly the fill value. Masked to 0: no ink can be seen there.
            A.CoarseDropout(
                num_holes_range=(1, 2),
                hole_height_range=hole_px,
                hole_width_range=hole_px,
                fill=0.0,
                fill_mask=0.0,
                p=0.5,
            ),
        ]
    compose = A.Compose(transforms, mask_interpolation=cv2.INTER_NEAREST, strict=True)
    return Augment(level, compose, seed)
