"""Write a probability map for other tools: a tiled TIFF, and an OME-Zarr image with a pyramid.

Both hold the probability as uint8, ``round(probability x 255)`` (what
``<id>_probability.png`` holds), axes (y, x):

- ``<id>_probability.tif``: one page, 256 x 256 px tiles, zlib (deflate) compressed, BigTIFF
  above :data:`BIGTIFF_ABOVE_BYTES` of pixels (classic TIFF offsets stop at 4 GiB); tifffile,
  GDAL, QuPath, Fiji and the villa tools read it;
- ``<id>_probability.ome.zarr``: a Zarr v3 group with OME-Zarr (NGFF 0.5) ``multiscales``
  metadata and levels ``0``, ``1``, … each the 2 x 2 mean of the one above, until the long
  side is below :data:`PYRAMID_MIN_PX` (napari-ome-zarr, neuroglancer and vesuvius' viewers
  open it at any zoom).

Each is written under a temporary name in the output folder and renamed into place whole.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
import zarr
from numpy.typing import NDArray
from zarr.codecs import BloscCodec

from inkpipe.pipeline import __version__
from inkpipe.pipeline.files import atomic_target
from inkpipe.pipeline.ome import multiscales_attrs

__all__ = [
    "BIGTIFF_ABOVE_BYTES",
    "OME_CHUNK_PX",
    "PYRAMID_MIN_PX",
    "TIFF_TILE_PX",
    "downsample_mean",
    "ome_zarr_bytes_bound",
    "pyramid",
    "tiff_bytes_bound",
    "write_probability_ome_zarr",
    "write_probability_tiff",
]

TIFF_TILE_PX = 256
BIGTIFF_ABOVE_BYTES = 2**31  # well below classic TIFF's 4 GiB, whatever zlib does
PYRAMID_MIN_PX = 1024  # levels are added while the long side is at least this
OME_CHUNK_PX = 512
_ROWS = 1024  # rows per block when downsampling, to bound the temporaries
CONTENT = "ink probability, round(p * 255), uint8"


def write_probability_tiff(path: Path, prob: NDArray[np.uint8], fragment_id: str) -> Path:
    """Write a (H, W) uint8 probability map as a tiled, zlib-compressed (Big)TIFF.

    Args:
        path: the file to write (replaced whole when done).
        prob: (H, W) uint8, probability x 255.
        fragment_id: recorded in the TIFF's description with what the values mean.

    Returns:
        ``path``.
    """
    path = Path(path)
    with atomic_target(path) as tmp:
        tifffile.imwrite(
            tmp,
            np.ascontiguousarray(prob),
            tile=(TIFF_TILE_PX, TIFF_TILE_PX),
            compression="zlib",
            photometric="minisblack",
            bigtiff=prob.nbytes > BIGTIFF_ABOVE_BYTES,
            metadata={"fragment": fragment_id, "content": CONTENT, "inkpipe": __version__},
        )
    return path


def downsample_mean(image: NDArray[np.uint8]) -> NDArray[np.uint8]:
    """Halve a (H, W) uint8 image by the rounded mean of 2 x 2 blocks.

    An odd last row or column is dropped; an axis of length 1 is kept as is.

    Returns:
        (H // 2, W // 2) uint8 (an axis of length 1 stays 1).
    """
    fy = 2 if image.shape[0] >= 2 else 1
    fx = 2 if image.shape[1] >= 2 else 1
    h, w = image.shape[0] // fy, image.shape[1] // fx
    out = np.empty((h, w), dtype=np.uint8)
    for lo in range(0, h, _ROWS):
        hi = min(lo + _ROWS, h)
        block = image[lo * fy : hi * fy, : w * fx].astype(np.uint16)
        summed = block.reshape(hi - lo, fy, w, fx).sum(axis=(1, 3), dtype=np.uint16)
        n = fy * fx
        out[lo:hi] = (summed + n // 2) // n
    return out


def pyramid(
    image: NDArray[np.uint8], min_px: int = PYRAMID_MIN_PX
) -> Iterator[tuple[NDArray[np.uint8], tuple[float, float]]]:
    """Yield the levels of a pyramid and their (y, x) scale relative to ``image``.

    ``image`` first (scale 1, 1), then 2 x 2 means while the long side of the last level is
    at least ``min_px`` (and it can be halved). One level is held besides ``image``.
    """
    level, scale = image, (1.0, 1.0)
    yield level, scale
    while max(level.shape) >= min_px and max(level.shape) > 1:
        fy = 2.0 if level.shape[0] >= 2 else 1.0
        fx = 2.0 if level.shape[1] >= 2 else 1.0
        level, scale = downsample_mean(level), (scale[0] * fy, scale[1] * fx)
        yield level, scale


def write_probability_ome_zarr(
    path: Path,
    prob: NDArray[np.uint8],
    fragment_id: str,
    min_px: int = PYRAMID_MIN_PX,
    chunk_px: int = OME_CHUNK_PX,
) -> Path:
    """Write a (H, W) uint8 probability map as an OME-Zarr (NGFF 0.5) image with a pyramid.

    Args:
        path: the ``.ome.zarr`` folder to write (replaced whole when done).
        prob: (H, W) uint8, probability x 255.
        fragment_id: the image's name.
        min_px: levels are added while the long side is at least this.
        chunk_px: chunk side of every level.

    Returns:
        ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        group = zarr.open_group(tmp, mode="w-", zarr_format=3)
        paths: list[str] = []
        scales: list[list[float]] = []
        for i, (level, scale) in enumerate(pyramid(prob, min_px)):
            array = group.create_array(
                str(i),
                shape=level.shape,
                dtype="uint8",
                chunks=(min(chunk_px, level.shape[0]), min(chunk_px, level.shape[1])),
                compressors=BloscCodec(cname="zstd", clevel=5, shuffle="bitshuffle"),
                fill_value=0,
                dimension_names=("y", "x"),
            )
            array[...] = level
            paths.append(str(i))
            scales.append(list(scale))
        attrs: dict[str, Any] = multiscales_attrs(
            fragment_id,
            ("y", "x"),
            paths,
            scales,
            downscaling="mean",
            method={
                "description": "each level is the rounded mean of 2 x 2 pixels of the one "
                "above; an odd last row or column is dropped",
                "method": "inkpipe.infer.outputs.downsample_mean",
                "version": __version__,
            },
        )
        attrs["inkpipe"] = {"fragment": fragment_id, "content": CONTENT, "version": __version__}
        group.attrs.update(attrs)
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def tiff_bytes_bound(height: int, width: int) -> int:
    """Bound the TIFF's bytes: every tile stored whole, zlib's worst case, tags and offsets."""
    tiles = -(-height // TIFF_TILE_PX) * -(-width // TIFF_TILE_PX)
    per_tile = int(TIFF_TILE_PX**2 * 1.001) + 64
    return tiles * (per_tile + 16) + 64 * 1024


def ome_zarr_bytes_bound(height: int, width: int, block_bytes: int = 4096) -> int:
    """Bound the OME-Zarr image's bytes: every level's chunks stored whole, in file blocks."""
    total = 0
    h, w = height, width
    while True:
        cy, cx = min(OME_CHUNK_PX, h), min(OME_CHUNK_PX, w)
        chunks = -(-h // cy) * -(-w // cx)
        per_chunk = cy * cx + 64  # Blosc keeps an incompressible chunk as is, plus its header
        total += chunks * (-(-per_chunk // block_bytes) * block_bytes) + block_bytes
        if max(h, w) < PYRAMID_MIN_PX or max(h, w) <= 1:
            break
        h, w = max(h // 2, 1), max(w // 2, 1)
    return total + 16 * 1024
