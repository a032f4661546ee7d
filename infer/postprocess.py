"""Turn a probability map into a binary ink mask: threshold, mask, opening, small-blob removal.

Real fragments are up to 8181 x 6330 (52 Mpx) per label image, so every step works on
bool/uint8 arrays (1 byte per pixel) and never makes a float64 copy. Masks are (H, W) uint8
arrays of 0 and 1; any nonzero input pixel counts as 1.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import ndimage

from inkpipe.pipeline.checks import check_int, check_number
from inkpipe.pipeline.errors import InvalidInputError

# 8-connectivity: ink strokes touching at a corner are one blob.
_CONNECTIVITY = np.ones((3, 3), dtype=bool)


def _as_bool(name: str, mask: ArrayLike) -> NDArray[np.bool_]:
    arr = np.asarray(mask)
    if arr.ndim != 2:
        raise InvalidInputError(f"{name} has shape {arr.shape}, expected a (H, W) mask")
    return arr if arr.dtype == np.bool_ else arr != 0


def _as_uint8(mask: NDArray[np.bool_]) -> NDArray[np.uint8]:
    """View a bool array as uint8 0/1 without copying."""
    return np.ascontiguousarray(mask).view(np.uint8)


def binarize(prob: ArrayLike, threshold: float) -> NDArray[np.uint8]:
    """Threshold a probability map: ink where ``prob >= threshold``.

    The comparison is made in ``prob``'s dtype (a float32 map is compared with the float32
    threshold), exactly as :func:`inkpipe.infer.metrics.search_threshold` counts.

    Args:
        prob: (H, W) floating array of probabilities in [0, 1].
        threshold: in [0, 1].

    Returns:
        (H, W) uint8 array of 0 and 1.
    """
    p = np.asarray(prob)
    if p.ndim != 2 or not np.issubdtype(p.dtype, np.floating):
        raise InvalidInputError(
            f"prob has shape {p.shape} and dtype {p.dtype}, expected a (H, W) float map"
        )
    t = check_number("threshold", threshold, 0, 1, hint="pick one with search_threshold")
    return _as_uint8(p >= p.dtype.type(t))


def disk(radius_px: int) -> NDArray[np.bool_]:
    """Return a (2r+1, 2r+1) bool disk: pixels within ``radius_px`` of the centre."""
    r = check_int("radius_px", radius_px, 0, "e.g. 2")
    y, x = np.ogrid[-r : r + 1, -r : r + 1]
    return (y * y + x * x) <= r * r


def open_mask(mask: ArrayLike, open_px: int) -> NDArray[np.uint8]:
    """Remove specks and thin spurs by a morphological opening with a disk.

    Erosion treats the outside of the image as ink, so ink touching the border is not eaten
    from the border; the result is always a subset of the input.

    Args:
        mask: (H, W) bool or 0/1 array.
        open_px: disk radius in pixels; 0 returns the mask unchanged (as uint8).

    Returns:
        (H, W) uint8 array of 0 and 1.
    """
    m = _as_bool("mask", mask)
    r = check_int("open_px", open_px, 0, "use 0 to disable the opening")
    if r == 0:
        return _as_uint8(m.copy())
    structure = disk(r)
    eroded = ndimage.binary_erosion(m, structure=structure, border_value=1)
    return _as_uint8(ndimage.binary_dilation(eroded, structure=structure) & m)


def remove_small(mask: ArrayLike, min_area: int) -> NDArray[np.uint8]:
    """Drop 8-connected blobs with fewer than ``min_area`` pixels.

    Args:
        mask: (H, W) bool or 0/1 array.
        min_area: smallest blob to keep, in pixels; 0 (or 1) returns the mask unchanged.

    Returns:
        (H, W) uint8 array of 0 and 1.
    """
    m = _as_bool("mask", mask)
    min_area = check_int("min_area", min_area, 0, "use 0 to keep every blob")
    if min_area <= 1:
        return _as_uint8(m.copy())
    labels, _ = ndimage.label(m, structure=_CONNECTIVITY)
    areas = np.bincount(labels.reshape(-1))
    keep = areas >= min_area
    keep[0] = False  # background
    return _as_uint8(keep[labels])


def apply_mask(pred: ArrayLike, papyrus_mask: ArrayLike) -> NDArray[np.uint8]:
    """Zero the prediction outside the papyrus.

    Args:
        pred: (H, W) bool or 0/1 array.
        papyrus_mask: (H, W) bool or 0/1 array, nonzero on papyrus.

    Returns:
        (H, W) uint8 array of 0 and 1.
    """
    p = _as_bool("pred", pred)
    m = _as_bool("papyrus mask", papyrus_mask)
    if m.shape != p.shape:
        raise InvalidInputError(
            f"papyrus mask has shape {m.shape}, expected {p.shape} to match the prediction; "
            "use the mask of the same fragment"
        )
    return _as_uint8(p & m)


def postprocess(
    prob: ArrayLike,
    threshold: float,
    open_px: int = 0,
    min_area: int = 0,
    papyrus_mask: ArrayLike | None = None,
) -> NDArray[np.uint8]:
    """Binarize, mask, open and clean a probability map.

    Order: :func:`binarize`, :func:`apply_mask` (first, so ink outside the papyrus cannot keep
    a blob alive), :func:`open_mask`, :func:`remove_small`.

    Args:
        prob: (H, W) floating array of probabilities in [0, 1].
        threshold: in [0, 1]; ink where ``prob >= threshold``.
        open_px: opening disk radius in pixels (0: none).
        min_area: smallest blob kept, in pixels (0: all).
        papyrus_mask: optional (H, W) bool or 0/1 array, nonzero on papyrus.

    Returns:
        (H, W) uint8 array of 0 and 1.
    """
    mask = binarize(prob, threshold)
    if papyrus_mask is not None:
        mask = apply_mask(mask, papyrus_mask)
    mask = open_mask(mask, open_px)
    return remove_small(mask, min_area)
