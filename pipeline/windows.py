"""Window geometry: where the (tile x tile) windows of a fragment start.

Pure NumPy functions, shared by ingest (the window index), training (sampling) and inference
(sliding windows). Edge policy (as in MONAI): windows start at 0, stride, 2*stride, … and one
last window is added so that it ends exactly at the image edge; a window never overhangs. An
image shorter than the tile gets a single window at 0, which the caller must pad.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from .checks import check_int, check_number
from .errors import ConfigError

# Columns of a fragment's window index (one int32 row per window): ``windows[:, INK_PX]``.
WINDOW_COLUMNS = ("y0", "x0", "mask_px", "ink_px")
Y0, X0, MASK_PX, INK_PX = range(len(WINDOW_COLUMNS))


def check_tile(tile_px: int, stride_px: int) -> None:
    """Raise :class:`ConfigError` unless ``tile_px >= 1`` and ``1 <= stride_px <= tile_px``."""
    check_int("tile_px", tile_px, 1, "use the model's tile size, e.g. 224")
    check_int("stride_px", stride_px, 1, "e.g. tile_px // 2")
    if stride_px > tile_px:
        raise ConfigError(
            f"stride_px {stride_px} is larger than tile_px {tile_px}, which would leave pixels "
            "uncovered; use a stride <= tile, e.g. tile_px // 2"
        )


def tile_starts(length: int, tile_px: int, stride_px: int) -> NDArray[np.int64]:
    """Return the start offsets of windows along one axis.

    Starts are ``0, stride, 2*stride, ...`` and the last window ends exactly at the edge
    (start ``length - tile_px``), never overhanging; it may overlap its neighbour more than
    the others do. The count is ``1`` if ``length <= tile_px``, else
    ``ceil((length - tile_px) / stride_px) + 1``. When ``length < tile_px`` the single window
    starts at 0 and overhangs: the caller pads (see :func:`sliding_window_predict`).

    Args:
        length: axis length in pixels (>= 1).
        tile_px: window side in pixels (>= 1).
        stride_px: step between windows, in [1, tile_px] so that windows leave no gap.

    Returns:
        (n,) int64 array of strictly increasing starts.
    """
    length = check_int("length", length, 1, "the image must not be empty")
    check_tile(tile_px, stride_px)
    if length <= tile_px:
        return np.zeros(1, dtype=np.int64)
    n = -(-(length - tile_px) // stride_px) + 1
    starts = np.arange(n, dtype=np.int64) * stride_px
    starts[-1] = length - tile_px
    return starts


def grid_windows(height: int, width: int, tile_px: int, stride_px: int) -> NDArray[np.int64]:
    """Return the top-left corners of a grid of windows covering a (height, width) image.

    Args:
        height: image height in pixels (>= 1).
        width: image width in pixels (>= 1).
        tile_px: window side in pixels.
        stride_px: step between windows, in [1, tile_px].

    Returns:
        (n_y * n_x, 2) int64 array of ``(y0, x0)``, row-major (all windows of the first row
        of windows first), with ``n_y``/``n_x`` as in :func:`tile_starts`.
    """
    ys = tile_starts(height, tile_px, stride_px)
    xs = tile_starts(width, tile_px, stride_px)
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    return np.stack([yy.reshape(-1), xx.reshape(-1)], axis=1)


def window_sums(
    image: NDArray, origins: NDArray[np.int64], tile_px: int, within: NDArray | None = None
) -> NDArray[np.int64]:
    """Sum ``image`` over each (tile x tile) window, without a full-size integral image.

    Windows sharing a start row share one band column-sum, so the cost is about
    ``rows_of_windows * tile_px * W`` additions and memory O(tile_px * W).

    Args:
        image: (H, W) array of small non-negative integers or bools (e.g. uint8 0/1 masks).
        origins: (n, 2) window origins (y0, x0) inside ``image``; a window may overhang the
            bottom/right edge (the overhang adds nothing).
        tile_px: window size.
        within: optional (H, W) 0/1 array of the same dtype: sum ``image & within``, a band at
            a time (no full-size copy of the masked image).

    Returns:
        (n,) int64 sums, in the order of ``origins``.
    """
    sums = np.zeros(len(origins), dtype=np.int64)
    for y0 in np.unique(origins[:, Y0]):
        rows = np.flatnonzero(origins[:, Y0] == y0)
        part = image[y0 : y0 + tile_px]
        if within is not None:
            part = part & within[y0 : y0 + tile_px]
        band = part.sum(axis=0, dtype=np.int64)
        cum = np.concatenate([[0], np.cumsum(band)])
        x0 = origins[rows, X0]
        x1 = np.minimum(x0 + tile_px, image.shape[1])
        sums[rows] = cum[x1] - cum[x0]
    return sums


def holds_valid_pixel(
    valid: NDArray, origins: NDArray[np.int64], tile_px: int
) -> NDArray[np.bool_]:
    """Return which windows hold at least one valid pixel (the windows worth predicting).

    Args:
        valid: (H, W) bool or non-negative integer array, nonzero where valid (the papyrus
            mask).
        origins: (n, 2) window origins (y0, x0), as for :func:`window_sums`.
        tile_px: window size.

    Returns:
        (n,) bool array, in the order of ``origins``.
    """
    return window_sums(valid, origins, tile_px) > 0


def index_windows(
    mask: NDArray[np.uint8],
    labels: NDArray[np.uint8] | None,
    tile_px: int,
    stride_px: int,
    min_coverage: float,
) -> NDArray[np.int32]:
    """Build a fragment's window index: valid windows with their mask and ink pixel counts.

    A window is valid when more than ``min_coverage`` of its ``tile_px**2`` pixels are papyrus.

    Args:
        mask: (H, W) uint8 papyrus mask, 0/1.
        labels: (H, W) uint8 ink labels, 0/1, or None (ink counts are then 0).
        tile_px: window size; stride_px: grid step.
        min_coverage: minimum papyrus fraction in [0, 1).

    Returns:
        (n, 4) int32 array with columns ``WINDOW_COLUMNS`` = (y0, x0, mask_px, ink_px).
    """
    check_number("minimum mask coverage", min_coverage, 0.0, 1.0, high_open=True)
    origins = grid_windows(mask.shape[0], mask.shape[1], tile_px, stride_px)
    mask_px = window_sums(mask, origins, tile_px)
    keep = mask_px > min_coverage * tile_px * tile_px
    origins, mask_px = origins[keep], mask_px[keep]
    if labels is None:
        ink_px = np.zeros_like(mask_px)
    else:
        ink_px = window_sums(labels, origins, tile_px, within=mask)
    return np.column_stack([origins, mask_px, ink_px]).astype(np.int32)
