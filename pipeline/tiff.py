"""Read CT slices (single-page uint16 TIFFs) row band by row band, with bounded memory.

Real surface-volume slices are uncompressed, stripped TIFFs of up to 14830 x 9506 px: their
pixel data is one contiguous run of bytes, so a band of rows is one ``os.pread`` at a known
offset — no memory map (whose pages would count in RSS) and no whole-slice decode. Compressed
or tiled TIFFs fall back to decoding only the strips that cover the band (tiled files are
decoded whole, one slice at a time).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import tifffile
from numpy.typing import NDArray

from .direct import read_direct
from .errors import InputNotFoundError, InvalidInputError


@dataclass(frozen=True)
class SliceInfo:
    """What a slice file holds and where its pixels are.

    Attributes:
        path: the TIFF file.
        shape: (H, W).
        dtype: NumPy dtype string, e.g. ``"uint16"``.
        offset: byte offset of the contiguous pixel data, or -1 if not contiguous.
        byteorder: ``"<"`` or ``">"``.
    """

    path: Path
    shape: tuple[int, int]
    dtype: str
    offset: int
    byteorder: Literal["<", ">"]


def inspect_slice(path: Path) -> SliceInfo:
    """Read a slice's header and check that its pixel data is all there.

    Raises:
        InputNotFoundError: the file is missing.
        InvalidInputError: not a TIFF, several pages or channels, or truncated.
    """
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"slice not found: {path}")
    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages.first
            shape = tuple(int(s) for s in page.shape)
            if len(shape) != 2:
                raise InvalidInputError(
                    f"slice {path} has shape {shape}, expected one gray (H, W) image; "
                    "export each CT layer as a single-channel TIFF"
                )
            dtype = str(page.dtype)
            end = max(int(o) + int(c) for o, c in zip(page.dataoffsets, page.databytecounts))
            contiguous = bool(page.is_contiguous) and page.compression == 1
            offset = int(page.dataoffsets[0]) if contiguous else -1
            byteorder: Literal["<", ">"] = ">" if tif.byteorder == ">" else "<"
    except InvalidInputError:
        raise
    except Exception as exc:  # tifffile raises many types for corrupt files
        raise InvalidInputError(
            f"cannot read slice {path}: {exc}; the file is not a valid TIFF, re-export or "
            "re-download it"
        ) from None
    size = path.stat().st_size
    if end > size:
        raise InvalidInputError(
            f"slice {path} is truncated: {size} bytes on disk, its header needs {end}; "
            "re-download or re-export it"
        )
    return SliceInfo(path, (shape[0], shape[1]), dtype, offset, byteorder)


def read_rows(info: SliceInfo, y0: int, y1: int) -> NDArray:
    """Read rows ``[y0, y1)`` of a slice.

    Args:
        info: from :func:`inspect_slice`.
        y0, y1: row range, ``0 <= y0 < y1 <= H``.

    Returns:
        (y1 - y0, W) array of the slice's dtype, native byte order.
    """
    height, width = info.shape
    dtype = np.dtype(info.dtype).newbyteorder(info.byteorder)
    if info.offset >= 0:
        nbytes = (y1 - y0) * width * dtype.itemsize
        fd = os.open(info.path, os.O_RDONLY)
        try:
            buf = os.pread(fd, nbytes, info.offset + y0 * width * dtype.itemsize)
        finally:
            os.close(fd)
        if len(buf) != nbytes:
            raise InvalidInputError(
                f"slice {info.path} is truncated near row {y0}; re-download or re-export it"
            )
        rows = np.frombuffer(buf, dtype=dtype).reshape(y1 - y0, width)
        return rows.astype(dtype.newbyteorder("="), copy=not dtype.isnative)
    return _read_rows_decoded(info, y0, y1)


def read_rows_into(info: SliceInfo, y0: int, y1: int, out: NDArray, direct: bool = False) -> None:
    """Read rows ``[y0, y1)`` of a slice into ``out``, a C-contiguous (y1 - y0, W) array.

    A contiguous little-endian slice is read straight into ``out`` (one ``preadv``, no copy),
    or with ``direct`` past the page cache (:func:`~inkpipe.pipeline.direct.read_direct`, one
    copy from its aligned buffer; the ordinary read where the file system refuses it); any
    other is read by :func:`read_rows` and copied in (converted to ``out``'s dtype).
    """
    height, width = info.shape
    dtype = np.dtype(info.dtype).newbyteorder(info.byteorder)
    if info.offset >= 0 and dtype.isnative and np.dtype(out.dtype) == dtype:
        view = out.data.cast("B")
        start = info.offset + y0 * width * dtype.itemsize
        got = read_direct(info.path, start, view) if direct else None
        if got is None:
            fd = os.open(info.path, os.O_RDONLY)
            try:
                got = os.preadv(fd, [view], start)
            finally:
                os.close(fd)
        if got != len(view):
            raise InvalidInputError(
                f"slice {info.path} is truncated near row {y0}; re-download or re-export it"
            )
        return
    out[...] = read_rows(info, y0, y1)


def _read_rows_decoded(info: SliceInfo, y0: int, y1: int) -> NDArray:
    """Decode only the strips covering rows ``[y0, y1)`` (fallback for compressed slices)."""
    try:
        with tifffile.TiffFile(info.path) as tif:
            page = tif.pages.first
            if page.is_tiled:
                return np.asarray(page.asarray()[y0:y1])
            rps = int(page.rowsperstrip) or info.shape[0]
            out = np.empty((y1 - y0, info.shape[1]), dtype=info.dtype)
            fh = tif.filehandle
            for strip in range(y0 // rps, (y1 - 1) // rps + 1):
                fh.seek(page.dataoffsets[strip])
                data = fh.read(page.databytecounts[strip])
                seg, _, _ = page.decode(data, strip)
                seg = np.asarray(seg).reshape(-1, info.shape[1])
                s0 = strip * rps
                lo, hi = max(y0, s0), min(y1, s0 + seg.shape[0])
                out[lo - y0 : hi - y0] = seg[lo - s0 : hi - s0]
            return out
    except Exception as exc:
        raise InvalidInputError(f"cannot decode slice {info.path}: {exc}") from None
