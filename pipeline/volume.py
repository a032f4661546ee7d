"""Read normalised crops of a layer range from a stored volume, through a bounded cache.

Shared by training (crops at sampled windows) and inference/validation (crops on a grid):
:class:`BlockCache` keeps decoded (k, B, B) blocks (B = the volume's chunk size) in an LRU of
bounded size, :class:`Normalizer` maps uint16 CT values to float32 with the per-layer
statistics stored at ingest, and :class:`VolumeView` presents a fragment's layer range as a
lazily read, normalised (k, H, W) array.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr
from numpy.typing import NDArray

from .errors import InvalidInputError
from .layers import LayerRange


@dataclass(frozen=True)
class Normalizer:
    """Per-layer intensity normalisation from the statistics stored at ingest.

    ``x -> (clip(x, p01, p99) - mean) / std`` per layer, in float32.

    Attributes:
        stats: (k, 4) float64 (mean, std, p01, p99) of the selected layers.
    """

    stats: NDArray[np.float64]

    def __call__(self, crop: NDArray[np.uint16]) -> NDArray[np.float32]:
        """Normalise a (k, h, w) uint16 crop to (k, h, w) float32."""
        s = self.stats.astype(np.float32)
        lo, hi = s[:, 2, None, None], s[:, 3, None, None]
        x = np.clip(crop.astype(np.float32), lo, hi)
        x -= s[:, 0, None, None]
        x /= np.maximum(s[:, 1, None, None], np.float32(1))
        return x

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-able form for checkpoints."""
        return {"stats": self.stats.tolist()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Normalizer:
        """Inverse of :meth:`to_dict`."""
        return cls(np.asarray(d["stats"], dtype=np.float64))


class BlockCache:
    """A bounded LRU cache of decoded (k, B, B) blocks of volumes, B = the chunk size.

    Blocks are keyed by (fragment, block row, block column) for one fixed layer range. A crop
    is assembled from the (at most 2 x 2) blocks it touches; missing blocks are read with one
    Zarr call over their bounding box, so Zarr decodes those chunks concurrently.

    Args:
        volumes: (z, H, W) uint16 Zarr arrays, indexed by fragment.
        layers: the layer range to read.
        budget_mb: maximum decoded bytes held.
    """

    def __init__(
        self, volumes: Sequence[zarr.Array], layers: LayerRange, budget_mb: float = 512
    ) -> None:
        self.volumes = list(volumes)
        self.layers = layers
        self.block = [int(v.chunks[1]) for v in self.volumes]
        self.budget = int(budget_mb * 2**20)
        self.blocks: OrderedDict[tuple[int, int, int], NDArray[np.uint16]] = OrderedDict()
        self.nbytes = 0
        self.hits = self.misses = 0

    def _load(self, f: int, keys: list[tuple[int, int, int]]) -> None:
        b = self.block[f]
        vol = self.volumes[f]
        h, w = vol.shape[1:]
        by0, by1 = min(k[1] for k in keys), max(k[1] for k in keys) + 1
        bx0, bx1 = min(k[2] for k in keys), max(k[2] for k in keys) + 1
        data = np.asarray(
            vol[self.layers.as_slice(), by0 * b : min(by1 * b, h), bx0 * b : min(bx1 * b, w)]
        )
        for key in keys:
            _, by, bx = key
            y, x = (by - by0) * b, (bx - bx0) * b
            block = np.ascontiguousarray(data[:, y : y + b, x : x + b])
            self.blocks[key] = block
            self.nbytes += block.nbytes
        while self.nbytes > self.budget and len(self.blocks) > len(keys):
            _, old = self.blocks.popitem(last=False)
            self.nbytes -= old.nbytes

    def read(self, f: int, y0: int, x0: int, tile_px: int) -> NDArray[np.uint16]:
        """Return the (k, tile, tile) uint16 crop at (y0, x0); zeros outside the volume."""
        f, y0, x0 = int(f), int(y0), int(x0)
        b = self.block[f]
        h, w = self.volumes[f].shape[1:]
        y1, x1 = min(y0 + tile_px, h), min(x0 + tile_px, w)
        keys = [
            (f, by, bx)
            for by in range(y0 // b, (y1 - 1) // b + 1)
            for bx in range(x0 // b, (x1 - 1) // b + 1)
        ]
        missing = [k for k in keys if k not in self.blocks]
        for key in keys:  # mark the cached ones as used, so eviction spares them
            if key not in missing:
                self.blocks.move_to_end(key)
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        if missing:
            self._load(f, missing)
        out = np.zeros((self.layers.k, tile_px, tile_px), dtype=np.uint16)
        for key in keys:
            block = self.blocks[key]
            by, bx = key[1] * b, key[2] * b
            ys, ye = max(y0, by), min(y1, by + block.shape[1])
            xs, xe = max(x0, bx), min(x1, bx + block.shape[2])
            out[:, ys - y0 : ye - y0, xs - x0 : xe - x0] = block[
                :, ys - by : ye - by, xs - bx : xe - bx
            ]
        return out


class VolumeView:
    """A fragment's layer range as a lazily read, normalised (k, H, W) float32 array.

    Supports ``view[:, y0:y1, x0:x1]`` (what tiled prediction needs); reads go through a
    :class:`BlockCache`, so neighbouring windows share decoded chunks.

    Args:
        volume: (z, H, W) uint16 Zarr array.
        layers: the layer range to present.
        normalizer: statistics of those layers.
        cache_mb: decoded-block cache budget.
    """

    def __init__(
        self, volume: zarr.Array, layers: LayerRange, normalizer: Normalizer, cache_mb: float = 256
    ) -> None:
        self.layers = layers
        self.normalizer = normalizer
        self.cache = BlockCache([volume], layers, cache_mb)
        self.shape = (layers.k, int(volume.shape[1]), int(volume.shape[2]))
        self.ndim = 3
        self.dtype = np.dtype(np.float32)

    def __getitem__(self, key: Any) -> NDArray[np.float32]:
        """Return ``view[:, ys, xs]`` for unit-step slices, zero-padded past the edges."""
        if not (isinstance(key, tuple) and len(key) == 3 and key[0] == slice(None)):
            raise InvalidInputError(f"VolumeView supports view[:, y0:y1, x0:x1], got {key!r}")
        ys, xs = key[1], key[2]
        y0, y1 = ys.start or 0, min(ys.stop, self.shape[1])
        x0, x1 = xs.start or 0, min(xs.stop, self.shape[2])
        size = max(y1 - y0, x1 - x0)
        raw = self.cache.read(0, y0, x0, size)[:, : y1 - y0, : x1 - x0]
        return self.normalizer(raw)

    def __array__(self, dtype: Any = None, copy: Any = None) -> NDArray[np.float32]:
        """Read the whole view (only for small fragments)."""
        out = self[:, 0 : self.shape[1], 0 : self.shape[2]]
        return out if dtype is None else out.astype(dtype)
