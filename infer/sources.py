"""Predict from a plain Zarr surface volume, local or behind an fsspec URL, with a mask image.

A villa-style surface volume is a Zarr array of CT layers (z, y, x) or a group holding one
(an OME-Zarr image, whose first ``multiscales`` level is the full-resolution array, or a
group with an array ``0``), at a local path or an fsspec URL (``s3://…``, ``https://…``,
``memory://…``; zarr-python opens them through fsspec; credentials and options come from
fsspec's configuration, e.g. ``FSSPEC_S3='{"anon": true}'``). It is predicted without an
ingest:

- :func:`open_zarr_fragments` opens every such argument and checks it before anything is
  read (exists, 3-D, uint16 or uint8, the mask's shape, the model's layers inside it);
- it then computes the model's layers' statistics inside the mask (mean, std, p01, p99, as
  ingest does: :func:`~inkpipe.pipeline.ingest.summarize_band` and
  :func:`~inkpipe.pipeline.ingest.layer_statistics`) in one pass of row bands of at most
  :data:`STATS_BAND_MB` (:func:`summarize_sources`);
- prediction then reads windows through the usual bounded block cache
  (:class:`~inkpipe.pipeline.volume.VolumeView`), which reads a :class:`SourceVolume` block
  by block: only the model's layers, in blocks of the source's chunks (or shards), gathered
  to at least :data:`MIN_BLOCK_PX` and split to at most :data:`MAX_BLOCK_PX` px a side.

So each chunk holding papyrus is read twice (statistics, then prediction) and nothing is
written but the outputs. uint8 volumes (the high byte of 16-bit CT, as many Vesuvius users
keep it) are accepted and read as ``value << 8``; the statistics are taken on those values,
so the normalised input the model sees does not depend on the scaling.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from numpy.typing import NDArray

from inkpipe.pipeline.errors import (
    ConfigError,
    InputNotFoundError,
    InvalidInputError,
    MissingPackageError,
)
from inkpipe.pipeline.fragments import is_fragment_dir
from inkpipe.pipeline.images import read_binary_image
from inkpipe.pipeline.ingest import HIST_BINS, layer_statistics, summarize_band
from inkpipe.pipeline.layers import LayerRange
from inkpipe.pipeline.ome import multiscale_paths
from inkpipe.pipeline.store import ATTR_KEY

__all__ = [
    "MAX_BLOCK_PX",
    "MIN_BLOCK_PX",
    "STATS_BAND_MB",
    "SourceMeta",
    "SourceVolume",
    "ZarrFragment",
    "block_px",
    "compute_layer_stats",
    "is_url",
    "is_zarr_source",
    "open_zarr_fragment",
    "open_zarr_fragments",
    "source_id",
    "summarize_sources",
]

MIN_BLOCK_PX = 256  # smaller chunks are gathered: fewer, larger reads (~0.5 ms a chunk call)
MAX_BLOCK_PX = 2048  # larger chunks are split: a cached block stays <= k x 2048 x 2048 x 2 B
STATS_BAND_MB = 64  # rows read at once for the statistics pass
ZARR_MARKERS = ("zarr.json", ".zarray", ".zgroup")  # zarr v3, v2 array, v2 group
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_NOT_IN_ID = re.compile(r"[^A-Za-z0-9._-]+")
_FIX_DTYPE = "convert it to a uint16 Zarr array first (values 0-65535, e.g. v.astype('uint16'))"
_WHAT_VOLUME = "a Zarr array (z, y, x) of CT layers, or a group holding one (an OME-Zarr image)"
_PACKAGES = {  # pip names of fsspec's backends, by URL scheme
    "s3": "s3fs",
    "gs": "gcsfs",
    "gcs": "gcsfs",
    "http": "aiohttp requests",
    "https": "aiohttp requests",
}


def is_url(text: str) -> bool:
    """Return True if ``text`` starts with a URL scheme (``s3://``, ``https://``, ``file://``)."""
    return bool(_URL.match(str(text)))


def is_zarr_source(text: str) -> bool:
    """Return True if a FRAGMENT argument names a Zarr volume rather than a fragment folder.

    That is a URL, or a local path that is not a fragment folder and holds Zarr metadata
    (``zarr.json``, ``.zarray`` or ``.zgroup``) or ends in ``.zarr``.
    """
    if is_url(text):
        return True
    path = Path(text)
    if path.is_dir() and is_fragment_dir(path):
        return False
    if path.is_dir() and any((path / marker).is_file() for marker in ZARR_MARKERS):
        return True
    return path.name.endswith(".zarr")


def source_id(given: str) -> str:
    """Return a fragment id for a Zarr volume argument: the name of its ``.zarr`` container.

    That is the last path component ending in ``.zarr``, without it (so a level inside an
    image, ``…/scroll.zarr/0``, is named after the image), else the last component;
    characters that do not belong in file names become ``_``. E.g.
    ``s3://b/20230702.zarr`` -> ``20230702``.
    """
    text = _URL.sub("", str(given)).split("?", 1)[0].rstrip("/")
    parts = [p for p in text.split("/") if p]
    containers = [p[: -len(".zarr")] for p in parts if p.endswith(".zarr")]
    name = containers[-1] if containers else (parts[-1] if parts else "")
    name = _NOT_IN_ID.sub("_", name).strip("_.")
    return name or "volume"


@dataclass(frozen=True)
class SourceMeta:
    """What predict needs of a Zarr volume's metadata: ``shape`` (layers, H, W)."""

    shape: tuple[int, int, int]

    @property
    def layers(self) -> int:
        """Number of CT layers."""
        return self.shape[0]


class SourceVolume:
    """A (z, H, W) Zarr array read as uint16, in blocks of bounded size.

    What :class:`~inkpipe.pipeline.chunks.ChunkReader` (and so the block cache) reads when
    the array is not one of inkpipe's stores: ``shape``, ``chunks`` (the cache's block size;
    the z chunk is the source's) and slicing, which returns uint16 (uint8 sources shifted up
    by 8 bits). A failed read (a chunk missing on a server, a broken connection) is one
    :class:`InvalidInputError` naming the volume.

    Args:
        array: the (z, H, W) uint16 or uint8 Zarr array.
        where: the path or URL it came from (for messages).
    """

    def __init__(self, array: zarr.Array, where: str) -> None:
        self.array = array
        self.where = where
        self.shape = tuple(int(s) for s in array.shape)
        base = array.shards or array.chunks
        self.chunks = (
            int(base[0]),
            min(block_px(int(base[1])), self.shape[1]),
            min(block_px(int(base[2])), self.shape[2]),
        )
        self.fill_value = 0
        self.dtype = np.dtype(np.uint16)
        self.ndim = 3
        self.shift = 8 if np.dtype(array.dtype) == np.uint8 else 0

    def __getitem__(self, key: Any) -> NDArray[np.uint16]:
        """Return ``array[key]`` as uint16."""
        try:
            data = np.asarray(self.array[key])
        except Exception as exc:  # fsspec, aiohttp and codec errors have no common base
            raise InvalidInputError(
                f"reading Zarr volume {self.where} failed ({type(exc).__name__}: {exc}); "
                "check that it is complete and reachable, then run the command again"
            ) from None
        if self.shift:
            return data.astype(np.uint16) << np.uint16(self.shift)
        return data


def block_px(chunk_px: int) -> int:
    """Return the cache's block side for a source chunk side of ``chunk_px`` pixels.

    Chunks below :data:`MIN_BLOCK_PX` are gathered (the smallest multiple at least that);
    chunks above :data:`MAX_BLOCK_PX` are split into equal parts of at most 1024 px (each
    block read then decodes the whole chunk: slower, but the memory stays bounded).
    """
    if chunk_px < MIN_BLOCK_PX:
        return chunk_px * math.ceil(MIN_BLOCK_PX / chunk_px)
    if chunk_px > MAX_BLOCK_PX:
        return math.ceil(chunk_px / math.ceil(chunk_px / 1024))
    return chunk_px


class ZarrFragment:
    """A Zarr surface volume and its mask, read as predict reads a fragment of a store.

    Attributes:
        id: the fragment id (:func:`source_id`); given: the path or URL given; where: the
            array's path or URL (``given`` or the array it holds).
        meta: its :class:`SourceMeta`; volume: the :class:`SourceVolume`.
        layers: the layer range whose statistics are computed.
    """

    def __init__(
        self,
        fragment_id: str,
        given: str,
        where: str,
        volume: SourceVolume,
        mask: NDArray[np.uint8],
        layers: LayerRange,
    ) -> None:
        self.id = fragment_id
        self.given = given
        self.where = where
        self.volume = volume
        self.meta = SourceMeta((volume.shape[0], volume.shape[1], volume.shape[2]))
        self.layers = layers
        self._mask = mask
        self._stats: NDArray[np.float64] | None = None

    def mask(self) -> NDArray[np.uint8]:
        """(H, W) uint8 0/1 papyrus mask (from the mask image)."""
        return self._mask

    def ir(self) -> None:
        """No infrared photo: the overlay is drawn on a CT layer."""
        return None

    def layer_stats(self) -> NDArray[np.float64]:
        """(z, 4) float64 mean, std, p01, p99 inside the mask; NaN outside :attr:`layers`."""
        if self._stats is None:
            self._stats = compute_layer_stats(self.volume, self._mask, self.layers)
        return self._stats


def compute_layer_stats(
    volume: SourceVolume, mask: NDArray[np.uint8], layers: LayerRange
) -> NDArray[np.float64]:
    """Return the (z, 4) per-layer statistics of ``layers`` inside ``mask``, as ingest does.

    Rows of at most :data:`STATS_BAND_MB` of the layers are read at a time, whole blocks
    high; bands without papyrus are not read.

    Args:
        volume: the (z, H, W) volume.
        mask: (H, W) uint8 0/1.
        layers: the layers to summarise; the other rows of the result are NaN.
    """
    _, height, width = volume.shape
    block_rows = volume.chunks[1]
    band_bytes = layers.k * block_rows * width * 2
    rows = block_rows * max(1, int(STATS_BAND_MB * 2**20 // max(band_bytes, 1)))
    sums = np.zeros((layers.k, 3))
    hists = np.zeros((layers.k, HIST_BINS), dtype=np.int64)
    for y0 in range(0, height, rows):
        mask_band = mask[y0 : y0 + rows]
        if not mask_band.any():
            continue
        band = volume[layers.as_slice(), y0 : y0 + rows, :]
        s, h = summarize_band(band, mask_band, y0)
        sums += s
        hists += h
    stats = np.full((volume.shape[0], 4), np.nan)
    stats[layers.as_slice()] = layer_statistics(sums, hists)
    return stats


def _open_node(given: str) -> zarr.Array | zarr.Group:
    """Open the Zarr node at a path or URL for reading, or raise a one-line error."""
    local = not is_url(given)
    try:
        return zarr.open(store=given, mode="r")
    except ImportError as exc:
        scheme = given.split("://", 1)[0].lower()
        package = _PACKAGES.get(scheme)
        fix = (
            f"install it: pip install {package}"
            if package
            else f"install fsspec's backend for {scheme}:// (see fsspec's known implementations)"
        )
        raise MissingPackageError(
            f"reading Zarr volume {given} needs {package or 'an fsspec backend'} ({exc}); {fix}"
        ) from None
    except FileNotFoundError:  # zarr's NodeNotFoundError is one too
        if local and Path(given).exists():
            raise InvalidInputError(
                f"{given} is not a Zarr array or group (no {', '.join(ZARR_MARKERS)}); pass "
                f"{_WHAT_VOLUME}, or a fragment folder holding surface_volume/"
            ) from None
        raise InputNotFoundError(
            f"Zarr volume not found: {given}; check the path or URL (expected {_WHAT_VOLUME})"
        ) from None
    except Exception as exc:  # a server's or codec's error: no common base to catch
        raise InvalidInputError(
            f"cannot open Zarr volume {given} ({type(exc).__name__}: {exc}); check the path "
            f"or URL (expected {_WHAT_VOLUME})"
        ) from None


def _resolve_array(node: zarr.Array | zarr.Group, given: str) -> tuple[zarr.Array, str]:
    """Return the volume array of a node and where it is: the node, or the array it holds."""
    if isinstance(node, zarr.Array):
        return node, given
    attrs = dict(node.attrs)
    info = attrs.get(ATTR_KEY)
    if isinstance(info, dict) and "fragments" in info:
        ids = ", ".join(str(f) for f in info["fragments"]) or "none"
        raise InvalidInputError(
            f"{given} is an inkpipe store, not a volume; predict its fragments with "
            f"--store {given} and fragment ids (it has: {ids})"
        )
    paths = multiscale_paths(attrs)
    candidates = paths[:1] if paths else ["0"]
    for path in candidates:
        try:
            child = node[path]
        except (KeyError, FileNotFoundError):
            continue
        if isinstance(child, zarr.Array):
            return child, f"{given.rstrip('/')}/{path}"
    if paths:
        raise InvalidInputError(
            f"Zarr group {given}: its multiscales metadata names level '{paths[0]}', which is "
            "not an array there; pass the level array itself"
        )
    try:
        arrays = sorted(node.array_keys())
    except Exception:  # stores that cannot list (plain HTTP) end here
        arrays = []
    if len(arrays) == 1:
        return _resolve_array(node[arrays[0]], f"{given.rstrip('/')}/{arrays[0]}")
    held = f"it holds the arrays {', '.join(arrays)}" if arrays else "it holds no array"
    raise InvalidInputError(
        f"Zarr group {given} has no multiscales metadata and no array '0' ({held}); pass "
        f"the volume array itself, e.g. {given.rstrip('/')}/{arrays[0] if arrays else 'NAME'}"
    )


def _check_array(array: zarr.Array, where: str) -> None:
    """Refuse arrays that are not (z, H, W) uint16 or uint8."""
    shape = tuple(int(s) for s in array.shape)
    if len(shape) != 3:
        raise InvalidInputError(
            f"Zarr volume {where} is {len(shape)}-D (shape {shape}), expected a 3-D (z, y, x) "
            "volume of CT layers; pass the array (or group) holding the surface volume's layers"
        )
    dtype = np.dtype(array.dtype)
    if dtype not in (np.uint16, np.uint8):
        raise InvalidInputError(
            f"Zarr volume {where} has dtype {dtype}, expected uint16 (or uint8, read as "
            f"value << 8); {_FIX_DTYPE}"
        )
    if min(shape) < 1:
        raise InvalidInputError(f"Zarr volume {where} is empty (shape {shape})")


def open_zarr_fragment(
    given: str, mask_path: Path, layers: LayerRange, all_layer_stats: bool = False
) -> ZarrFragment:
    """Open and check one Zarr volume and its mask image (no pixel of the volume is read).

    Its statistics will cover ``layers``, or every layer with ``all_layer_stats`` (what
    ``--normalize fragment`` pools, as ingest stores them for a store fragment).

    Raises:
        InputNotFoundError: the volume or the mask is missing.
        MissingPackageError: the URL's fsspec backend is not installed.
        InvalidInputError: not a Zarr volume, not 3-D, a wrong dtype, a mask that is not a
            binary image, empty, or of another shape.
        ConfigError: the model's layers are not all in the volume.
    """
    array, where = _resolve_array(_open_node(given), given)
    _check_array(array, where)
    z, height, width = (int(s) for s in array.shape)
    if layers.stop > z:
        raise ConfigError(
            f"the checkpoint reads layers {layers} but Zarr volume {where} has {z} layers "
            f"(0:{z}); pass a volume holding layers {layers}, or a checkpoint trained with "
            f"--layers inside 0:{z}"
        )
    mask = read_binary_image(Path(mask_path), "mask").pixels
    if mask.shape != (height, width):
        raise InvalidInputError(
            f"mask {mask_path} is {mask.shape[0]} x {mask.shape[1]} px but Zarr volume {where} "
            f"is {height} x {width} px (y, x); pass the mask of this volume"
        )
    if not mask.any():
        raise InvalidInputError(
            f"mask {mask_path} is empty (no papyrus pixel); white (255) or 1 must mark the papyrus"
        )
    volume = SourceVolume(array, where)
    summarised = LayerRange(0, z) if all_layer_stats else layers
    return ZarrFragment(source_id(given), given, where, volume, mask, summarised)


def open_zarr_fragments(
    given: Sequence[str],
    masks: Sequence[Path],
    layers: LayerRange,
    all_layer_stats: bool = False,
) -> list[ZarrFragment]:
    """Open and check Zarr volumes with their masks, in order (no pixel is read yet).

    Args:
        given: the paths or URLs, as given.
        masks: one mask image per volume, in the same order.
        layers: the layers the model reads.
        all_layer_stats: summarise every layer, not only ``layers``.

    Raises:
        ConfigError: not one mask per volume; otherwise see :func:`open_zarr_fragment`.
    """
    if masks and not given:
        raise ConfigError(
            "--mask is for Zarr volumes, but no FRAGMENT is one (a URL, or a path ending in "
            ".zarr or holding zarr.json, .zarray or .zgroup); pass the volume, or drop --mask "
            "(fragment folders bring their own mask.png)"
        )
    if len(masks) != len(given):
        listed = ", ".join(given) if given else "none"
        raise ConfigError(
            f"{len(given)} Zarr volume(s) ({listed}) but {len(masks)} --mask image(s); pass "
            "one --mask per Zarr volume, in the same order (fragment folders and store "
            "fragments bring their own)"
        )
    return [open_zarr_fragment(g, m, layers, all_layer_stats) for g, m in zip(given, masks)]


def summarize_sources(
    fragments: Sequence[ZarrFragment], log: Callable[[str], None] = print
) -> None:
    """Compute each volume's layer statistics inside its mask (one pass each), and say so."""
    for frag in fragments:
        t0 = time.perf_counter()
        frag.layer_stats()
        dtype = np.dtype(frag.volume.array.dtype)
        scaled = " (uint8, read as value << 8)" if frag.volume.shift else ""
        log(
            f"fragment {frag.id}: Zarr volume {frag.where}, {'x'.join(map(str, frag.meta.shape))}"
            f" {dtype}{scaled}, blocks of {frag.volume.chunks[1]}x{frag.volume.chunks[2]} px; "
            f"statistics of layers {frag.layers} inside the mask in "
            f"{time.perf_counter() - t0:.1f} s"
        )
