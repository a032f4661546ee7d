"""Read normalised crops of a layer range from a stored volume, through a bounded cache.

Shared by training (crops at sampled windows) and inference/validation (crops on a grid):
:class:`BlockCache` keeps decoded (k, B, B) blocks (B = the volume's chunk size) in an LRU of
bounded size and reads batches of crops with a read-ahead thread, :class:`Normalizer` maps
uint16 CT values to float32 with the statistics stored at ingest (:func:`normalizer_for`
chooses them: the whole fragment's, or each layer's), and
:class:`VolumeView` presents a fragment's layer range as a lazily read, normalised (k, H, W)
array.

The parts live beside this module: the chunk-file format and :class:`ChunkReader` in
:mod:`~inkpipe.pipeline.chunks`, the block LRU in :mod:`~inkpipe.pipeline.blocks`, the
two-thread scheduler in :mod:`~inkpipe.pipeline.readahead`; :class:`BlockCache` puts them
together behind one interface.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from enum import StrEnum
from functools import cached_property
from typing import Any

import numpy as np
from numpy.typing import NDArray

from .blocks import BlockKey, BlockStore
from .chunks import ChunkReader, VolumeArray, mapped_empty
from .errors import InvalidInputError
from .layers import LayerRange
from .readahead import ReadAhead

__all__ = [
    "BlockCache",
    "BlockKey",
    "ChunkReader",
    "NormMode",
    "Normalizer",
    "RegionView",
    "VolumeArray",
    "VolumeView",
    "mapped_empty",
    "normalizer_for",
    "pooled_stats",
]


class NormMode(StrEnum):
    """How CT values are normalised (``--normalize``).

    ``fragment``: one mean, standard deviation and clipping range for the whole fragment, pooled
    over all its layers, so the depth profile (air above the surface, papyrus below it, ink in
    between) keeps its shape whatever the surface depth. ``layer``: each layer by its own
    statistics (checkpoints without this setting): a fragment whose surface lies deeper
    stretches other layers than one whose surface lies shallower, so the same ink looks
    different in each.
    """

    FRAGMENT = "fragment"
    LAYER = "layer"


def pooled_stats(stats: NDArray[np.float64]) -> NDArray[np.float64]:
    """Pool per-layer statistics into one row for the whole fragment.

    Args:
        stats: (z, 4) float64 (mean, std, p01, p99) per layer; rows with NaN (layers whose
            statistics were not computed) are left out.

    Returns:
        (4,) float64: the mean and standard deviation of all the layers' pixels together (each
        layer weighs the same, as each holds the same pixels), the lowest p01 and the highest
        p99 (so no layer is clipped more than by its own statistics).

    Raises:
        InvalidInputError: no row is finite.
    """
    rows = stats[np.isfinite(stats).all(axis=1)]
    if not len(rows):
        raise InvalidInputError("no layer statistics to pool (every row is NaN)")
    mean = float(rows[:, 0].mean())
    var = float((rows[:, 1] ** 2 + rows[:, 0] ** 2).mean()) - mean**2
    return np.array([mean, np.sqrt(max(var, 0.0)), rows[:, 2].min(), rows[:, 3].max()])


def normalizer_for(
    stats: NDArray[np.float64], layers: LayerRange, mode: NormMode | str = NormMode.FRAGMENT
) -> Normalizer:
    """Return the :class:`Normalizer` of ``layers`` of a fragment with per-layer ``stats``.

    Args:
        stats: the fragment's (z, 4) float64 per-layer statistics (NaN rows: not computed).
        layers: the layers the crops hold.
        mode: :class:`NormMode` (or its value).
    """
    if NormMode(mode) is NormMode.LAYER:
        return Normalizer(stats[layers.as_slice()])
    return Normalizer(np.tile(pooled_stats(stats), (layers.k, 1)))


@dataclass(frozen=True)
class Normalizer:
    """Per-layer intensity normalisation from the statistics stored at ingest.

    ``x -> (clip(x, p01, p99) - mean) / std`` per layer, in float32.

    Attributes:
        stats: (k, 4) float64 (mean, std, p01, p99) of the selected layers.
    """

    stats: NDArray[np.float64]

    @cached_property
    def _affine(self) -> tuple[NDArray[np.float32], ...]:
        """(scale, offset, low, high), each (k, 1, 1) float32: ``clip(x * scale + offset)``."""
        mean, std, p01, p99 = (self.stats[:, i, None, None] for i in range(4))
        scale = 1 / np.maximum(std, 1)
        offset = -mean * scale
        # scale > 0, so clipping after the affine map equals clipping before it
        parts = (scale, offset, p01 * scale + offset, p99 * scale + offset)
        return tuple(np.ascontiguousarray(v, dtype=np.float32) for v in parts)

    def __call__(
        self, crop: NDArray[np.uint16], out: NDArray[np.float32] | None = None
    ) -> NDArray[np.float32]:
        """Normalise a (k, h, w) uint16 crop to (k, h, w) float32 (into ``out`` if given)."""
        scale, offset, low, high = self._affine
        x = np.multiply(crop, scale, dtype=np.float32, out=out)  # one array, then in place
        x += offset
        np.clip(x, low, high, out=x)
        return x

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-able form for checkpoints."""
        return {"stats": self.stats.tolist()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Normalizer:
        """Inverse of :meth:`to_dict`."""
        return cls(np.asarray(d["stats"], dtype=np.float64))


class BlockCache:
    """A bounded cache of decoded (k, B, B) blocks of volumes, (B, B) = chunk (y, x), to read crops.

    Blocks are keyed by (fragment, block row, block column) for one fixed layer range. A crop
    is assembled from the (at most 2 x 2) blocks it touches; a missing block is decoded once by
    a :class:`ChunkReader` and then serves every crop that touches it while it stays cached.
    The blocks live in a :class:`~inkpipe.pipeline.blocks.BlockStore` (LRU, pins, kept spare
    memory: a warm cache allocates and faults in nothing); :meth:`read_batch` reads a list of
    crops on two threads through a :class:`~inkpipe.pipeline.readahead.ReadAhead` (the
    caller's and a helper that decodes ahead), so decoding and cutting use two cores.
    Blocks that coming crops need are pinned (not evicted), so the budget may be exceeded by
    up to a quarter. ``misses`` counts blocks decoded, ``hits`` block uses that found their
    block cached or in flight.

    Args:
        volumes: (z, H, W) uint16 Zarr arrays (or :class:`VolumeArray`), indexed by fragment.
        layers: the layer range to read.
        budget_mb: maximum decoded bytes held (at least the blocks of one crop are kept).
    """

    def __init__(
        self, volumes: Sequence[VolumeArray], layers: LayerRange, budget_mb: float = 512
    ) -> None:
        self.volumes = list(volumes)
        self.readers = [ChunkReader(v) for v in self.volumes]
        self.layers = layers
        self.block = [(int(v.chunks[1]), int(v.chunks[2])) for v in self.volumes]
        self.store = BlockStore(self.readers, layers, int(budget_mb * 2**20))
        self.scheduler = ReadAhead(self.store)

    @property
    def budget(self) -> int:
        """Decoded bytes the cache holds at most, read-ahead aside."""
        return self.store.budget

    @property
    def blocks(self) -> OrderedDict[BlockKey, NDArray[np.uint16]]:
        """The cached (k, B, B) uint16 blocks, least recently used first."""
        return self.store.blocks

    @property
    def nbytes(self) -> int:
        """Bytes of the cached blocks."""
        return self.store.nbytes

    @property
    def hits(self) -> int:
        """Block uses that found their block cached or in flight."""
        return self.store.hits

    @property
    def misses(self) -> int:
        """Blocks decoded."""
        return self.store.misses

    def keys_of(self, f: int, y0: int, x0: int, tile_px: int) -> list[BlockKey]:
        """Return the keys of the blocks the (tile x tile) crop at (y0, x0) touches."""
        return self.store.keys_of(f, y0, x0, tile_px)

    def read(self, f: int, y0: int, x0: int, tile_px: int) -> NDArray[np.uint16]:
        """Return the (k, tile, tile) uint16 crop at (y0, x0); zeros outside the volume."""
        return self.store.read_crop(f, y0, x0, tile_px)

    def read_batch(
        self,
        crops: Sequence[tuple[int, int, int]],
        tile_px: int,
        read_ahead: Sequence[tuple[int, int, int]] = (),
        transform: Callable[[int, NDArray[np.uint16]], Any] | None = None,
    ) -> Iterator[Any]:
        """Yield the (k, tile, tile) uint16 crops at ``crops`` (fragment, y0, x0), in order.

        Two threads decode, cut and (with ``transform``) transform the crops; afterwards the
        blocks of the crops ``read_ahead`` (those a later call will read) are decoded ahead.
        See :meth:`ReadAhead.read_batch` for how the work is shared and what ``transform``
        must respect.
        """
        return self.scheduler.read_batch(crops, tile_px, read_ahead, transform)

    def read_many(
        self,
        crops: Sequence[tuple[int, int, int]],
        tile_px: int,
        then: Sequence[tuple[int, int, int]] = (),
        transform: Callable[[int, NDArray[np.uint16]], Any] | None = None,
    ) -> Iterator[Any]:
        """Yield the crops at ``crops``, then read ``then`` ahead: :meth:`read_batch`."""
        return self.scheduler.read_batch(crops, tile_px, then, transform)


def plane_slices(key: Any, shape: tuple[int, ...], what: str) -> tuple[int, int, int, int]:
    """Check a ``[:, y0:y1, x0:x1]`` key of a (k, H, W) view; return (y0, y1, x0, x1) clipped."""
    if not (isinstance(key, tuple) and len(key) == 3 and key[0] == slice(None)):
        raise InvalidInputError(f"{what} supports view[:, y0:y1, x0:x1], got {key!r}")
    ys, xs = key[1], key[2]
    y0, y1 = ys.start or 0, min(ys.stop, shape[1])
    x0, x1 = xs.start or 0, min(xs.stop, shape[2])
    return y0, y1, x0, x1


class VolumeView:
    """A fragment's layer range as a lazily read, normalised (k, H, W) float32 array.

    Supports ``view[:, y0:y1, x0:x1]`` and :meth:`read_windows` (batches of windows, read
    ahead, what tiled prediction uses); reads go through a :class:`BlockCache`, so
    neighbouring windows share decoded chunks.

    Args:
        volume: (z, H, W) uint16 Zarr array (or any :class:`VolumeArray`).
        layers: the layer range to present.
        normalizer: statistics of those layers.
        cache_mb: decoded-block cache budget.
    """

    def __init__(
        self,
        volume: VolumeArray,
        layers: LayerRange,
        normalizer: Normalizer,
        cache_mb: float = 256,
    ) -> None:
        self.layers = layers
        self.normalizer = normalizer
        self.cache = BlockCache([volume], layers, cache_mb)
        self.shape = (layers.k, int(volume.shape[1]), int(volume.shape[2]))
        self.ndim = 3
        self.dtype = np.dtype(np.float32)

    def __getitem__(self, key: Any) -> NDArray[np.float32]:
        """Return ``view[:, ys, xs]`` for unit-step slices, zero-padded past the edges."""
        y0, y1, x0, x1 = plane_slices(key, self.shape, "VolumeView")
        size = max(y1 - y0, x1 - x0)
        raw = self.cache.read(0, y0, x0, size)[:, : y1 - y0, : x1 - x0]
        return self.normalizer(raw)

    def read_windows(
        self, origins: NDArray[np.int64], tile_px: int, read_ahead: NDArray[np.int64] | None = None
    ) -> NDArray[np.float32]:
        """Return the normalised windows at ``origins`` through the batched read path.

        Args:
            origins: (n, 2) int (y0, x0), each window inside the view.
            tile_px: window side.
            read_ahead: optional (m, 2) origins of the next call, whose blocks are decoded in
                the background meanwhile.

        Returns:
            (n, k, tile_px, tile_px) float32: a helper thread decodes the blocks, this one
            cuts the crops and normalises each straight into its place in the batch (no
            float temporary, no copy: on one core 10-20 % less CPU than normalising on
            both threads and copying; tiled prediction calls this from its own thread).
        """
        crops = [(0, int(y), int(x)) for y, x in np.asarray(origins).tolist()]
        ahead = [] if read_ahead is None else [(0, int(y), int(x)) for y, x in read_ahead]
        out = np.empty((len(crops), self.shape[0], tile_px, tile_px), dtype=np.float32)
        for i, crop in enumerate(self.cache.read_batch(crops, tile_px, ahead)):
            self.normalizer(crop, out=out[i])
        return out

    def __array__(self, dtype: Any = None, copy: Any = None) -> NDArray[np.float32]:
        """Read the whole view (only for small fragments)."""
        out = self[:, 0 : self.shape[1], 0 : self.shape[2]]
        return out if dtype is None else out.astype(dtype)


class RegionView:
    """A rectangle of a :class:`VolumeView`: (k, h, w), read through the same cache.

    Tiled prediction of a part of a fragment (e.g. a held-out validation block) without
    reading or allocating the whole fragment.

    Args:
        view: the fragment's view.
        y0, x0: the rectangle's origin in the fragment; h, w: its size (inside the view).
    """

    def __init__(self, view: VolumeView, y0: int, x0: int, h: int, w: int) -> None:
        if min(y0, x0) < 0 or y0 + h > view.shape[1] or x0 + w > view.shape[2]:
            raise InvalidInputError(
                f"region {h}x{w} at ({y0}, {x0}) is outside the view of shape {view.shape}"
            )
        self.view, self.y0, self.x0 = view, int(y0), int(x0)
        self.shape = (view.shape[0], int(h), int(w))
        self.ndim = 3
        self.dtype = view.dtype

    def __getitem__(self, key: Any) -> NDArray[np.float32]:
        """Return ``region[:, ys, xs]`` for unit-step slices, clipped to the region."""
        y0, y1, x0, x1 = plane_slices(key, self.shape, "RegionView")
        oy, ox = self.y0, self.x0
        return self.view[:, oy + y0 : oy + y1, ox + x0 : ox + x1]

    def read_windows(
        self, origins: NDArray[np.int64], tile_px: int, read_ahead: NDArray[np.int64] | None = None
    ) -> NDArray[np.float32]:
        """:meth:`VolumeView.read_windows` with origins relative to the region."""
        shift = np.array([self.y0, self.x0], dtype=np.int64)
        ahead = None if read_ahead is None else np.asarray(read_ahead) + shift
        return self.view.read_windows(np.asarray(origins) + shift, tile_px, ahead)
