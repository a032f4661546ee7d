"""Stream training crops from the store: samplers yield coordinates, datasets read pixels.

A crop is ``(fragment index, y0, x0)``: the (k, tile, tile) block of the chosen layer range at
that origin. :class:`WindowSampler`, a batch sampler, draws crops from the window index (a
positive:negative mix, jittered, seeded), orders them in a serpentine sweep over each
fragment, one stream per DataLoader worker, so consecutive crops of a worker share Zarr
chunks, and yields them as batches that name the batch to read ahead. :class:`CropDataset`
cuts crops out of a bounded LRU cache of decoded blocks
(:class:`BlockCache`): each chunk is decoded once and serves every crop that touches it while
it stays cached, and a batch's blocks are decoded by a read-ahead thread while its crops are
cut, normalised and augmented.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from torch.utils.data import Dataset, Sampler

from inkpipe.pipeline.errors import ConfigError, InvalidInputError
from inkpipe.pipeline.layers import LayerRange
from inkpipe.pipeline.store import Fragment
from inkpipe.pipeline.volume import BlockCache, NormMode, normalizer_for
from inkpipe.pipeline.windows import INK_PX, X0, Y0

from .augment import Augment

# Columns of a crop table: fragment index, y0, x0.
CropTable = NDArray[np.int64]


@dataclass(frozen=True)
class WindowSet:
    """The candidate windows of one fragment for one purpose (training or validation).

    Attributes:
        fragment: index of the fragment in the dataset's fragment list.
        shape: (H, W) of the fragment.
        windows: (n, 4) int32 rows (y0, x0, mask_px, ink_px) from the store's window index.
    """

    fragment: int
    shape: tuple[int, int]
    windows: NDArray[np.int32]


def split_positive(windows: NDArray[np.int32], min_ink_px: int = 1) -> NDArray[np.bool_]:
    """Return a (n,) bool array: which windows count as positive (>= ``min_ink_px`` ink)."""
    return windows[:, INK_PX] >= min_ink_px


def sweep(crops: CropTable, region_px: int, rng: np.random.Generator) -> CropTable:
    """Order one fragment's crops in a serpentine sweep over (region_px x region_px) regions.

    Rows of regions run along the fragment's shorter side, alternating direction, from a
    random corner; crops inside a region come in random order. Consecutive crops then share
    chunks, and a block cache holding about three rows of chunks decodes each chunk once per
    sweep (random regions of 1024 px decoded ~1.5x as many on the benchmark fragment).

    Args:
        crops: (n, 3) int64 (fragment, y0, x0) of one fragment.
        region_px: region size in px (the chunk size works best).
        rng: the sampler's generator.

    Returns:
        (n, 3) int64, a permutation of ``crops``.
    """
    if len(crops) == 0:
        return crops
    ry, rx = crops[:, 1] // region_px, crops[:, 2] // region_px
    if rng.random() < 0.5:  # random start corner
        ry = ry.max() - ry
    if rng.random() < 0.5:
        rx = rx.max() - rx
    outer, inner = (ry, rx) if np.ptp(rx) <= np.ptp(ry) else (rx, ry)
    row = np.unique(outer, return_inverse=True)[1]
    inner = np.where(row % 2 == 1, inner.max() - inner, inner)
    return crops[np.lexsort((rng.random(len(crops)), inner, row))]


def merge_by_progress(parts: Sequence[CropTable], rng: np.random.Generator) -> CropTable:
    """Interleave several sequences so that each advances at the same relative pace.

    Used to mix fragments: every part keeps its order, and a batch holds crops of all parts in
    proportion to their sizes. Returns the (sum n_i, 3) concatenation, interleaved.
    """
    parts = [p for p in parts if len(p)]
    if not parts:
        return np.zeros((0, 3), dtype=np.int64)
    progress = np.concatenate([(np.arange(len(p)) + rng.random()) / len(p) for p in parts])
    return np.concatenate(parts)[np.argsort(progress, kind="stable")]


def order_by_region(
    crops: CropTable, region_px: int, streams: int, rng: np.random.Generator
) -> list[CropTable]:
    """Split crops into read streams, each sweeping its own part of every fragment.

    Each fragment's crops are ordered by :func:`sweep` and cut into ``streams`` contiguous
    segments of equal size; stream ``s`` takes segment ``s`` of every fragment, interleaved by
    :func:`merge_by_progress`. One stream per DataLoader worker (and DDP rank) keeps each
    worker's cache on its own neighbourhood.

    Args:
        crops: (n, 3) int64 (fragment, y0, x0).
        region_px: region size in px.
        streams: number of streams (DataLoader workers x DDP ranks), >= 1.
        rng: the sampler's generator.

    Returns:
        ``streams`` arrays of shape (n_i, 3), together a permutation of ``crops``.
    """
    segments: list[list[CropTable]] = [[] for _ in range(streams)]
    for f in np.unique(crops[:, 0]):
        ordered = sweep(crops[crops[:, 0] == f], region_px, rng)
        for s, seg in enumerate(np.array_split(ordered, streams)):
            segments[s].append(seg)
    return [merge_by_progress(seg, rng) for seg in segments]


def interleave_batches(streams: Sequence[CropTable], batch_size: int) -> CropTable:
    """Lay streams out so that batch ``b`` comes from stream ``b % len(streams)``.

    A torch DataLoader hands batch ``b`` to worker ``b % num_workers``, so with one stream per
    worker each worker keeps reading its own neighbourhood. Leftovers are appended in order.
    """
    n_streams = len(streams)
    cursors = [0] * n_streams
    parts = []
    b = 0
    total = sum(len(s) for s in streams)
    taken = 0
    while taken < total:
        s = b % n_streams
        if cursors[s] >= len(streams[s]):  # exhausted: take from the fullest stream instead
            s = int(np.argmax([len(x) - c for x, c in zip(streams, cursors)]))
        chunk = streams[s][cursors[s] : cursors[s] + batch_size]
        cursors[s] += len(chunk)
        taken += len(chunk)
        parts.append(chunk)
        b += 1
    return np.concatenate(parts) if parts else np.zeros((0, 3), dtype=np.int64)


class CropBatch(list[tuple[int, int, int]]):
    """One batch of crops ``(fragment, y0, x0)`` as the batch sampler yields it.

    ``read_ahead`` holds the crops of the batch the same DataLoader worker reads next, so the
    dataset can decode their blocks in the background while this batch is cut. A DataLoader
    deals batches to its workers in turn (batch ``b`` to worker ``b % num_workers``); were it
    to deal them otherwise, the hint would only be wrong, never the data.
    """

    read_ahead: tuple[tuple[int, int, int], ...] = ()

    def __reduce__(self) -> Any:
        """Pickle with ``read_ahead`` (batches travel to DataLoader worker processes)."""
        return (_rebuild_batch, (list(self), self.read_ahead))


def _rebuild_batch(
    crops: list[tuple[int, int, int]], read_ahead: tuple[tuple[int, int, int], ...]
) -> CropBatch:
    batch = CropBatch(crops)
    batch.read_ahead = read_ahead
    return batch


class WindowSampler(Sampler[CropBatch]):
    """Draw training batches from window indexes, region-ordered, reproducibly.

    A batch sampler (pass it as ``DataLoader(batch_sampler=…)``): it yields
    :class:`CropBatch` values, each telling the dataset which batch to read ahead.

    Each epoch draws ``samples_per_epoch`` crops: ``pos_fraction`` of them from windows with
    ink, the rest from windows without (or from the hard-negative pool when one is set), each
    shifted by a uniform jitter of up to ``jitter_px`` and clipped to the fragment. One
    generator, seeded by ``(seed, epoch)``, makes every draw.

    Args:
        sets: candidate windows per fragment.
        tile_px: crop size.
        samples_per_epoch: crops per epoch (over all ranks).
        batch_size, num_workers: for laying out batches per worker (see
            :func:`interleave_batches`).
        pos_fraction: share of positive crops, in [0, 1].
        jitter_px: maximum shift of a crop from its window origin.
        region_px: size of read-locality regions.
        seed: base seed.
        rank, world_size: for DistributedDataParallel sharding.
    """

    def __init__(
        self,
        sets: Sequence[WindowSet],
        tile_px: int,
        samples_per_epoch: int,
        batch_size: int,
        num_workers: int = 0,
        pos_fraction: float = 0.5,
        jitter_px: int = 32,
        region_px: int = 512,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if not 0.0 <= pos_fraction <= 1.0:
            raise ConfigError(f"positive fraction must be in [0, 1], got {pos_fraction}")
        self.tile_px, self.samples = tile_px, samples_per_epoch
        self.batch_size, self.num_workers = batch_size, max(num_workers, 1)
        self.pos_fraction, self.jitter_px, self.region_px = pos_fraction, jitter_px, region_px
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.shapes = {s.fragment: s.shape for s in sets}
        rows = [
            np.column_stack([np.full(len(s.windows), s.fragment), s.windows[:, [Y0, X0]]])
            for s in sets
        ]
        table = np.concatenate(rows).astype(np.int64) if rows else np.zeros((0, 3), np.int64)
        positive: NDArray[np.bool_] = (
            np.concatenate([split_positive(s.windows) for s in sets]) if sets else np.zeros(0, bool)
        )
        self.positives = table[positive]
        self.negatives = table[~positive]
        self.hard_negatives: CropTable | None = None
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose draws ``__iter__`` yields (as DistributedSampler does)."""
        self.epoch = epoch

    def set_hard_negatives(self, crops: CropTable | None) -> None:
        """Draw negatives from ``crops`` (n, 3) from now on (None: from all negatives)."""
        self.hard_negatives = None if crops is None or len(crops) == 0 else crops

    def draw(self, epoch: int) -> CropTable:
        """Return the (samples_per_epoch, 3) crops of an epoch in read order, all ranks."""
        rng = np.random.default_rng([self.seed, epoch])
        n_pos = round(self.samples * self.pos_fraction) if len(self.positives) else 0
        negatives = self.hard_negatives if self.hard_negatives is not None else self.negatives
        if len(negatives) == 0:
            n_pos = self.samples
        parts = []
        if n_pos:
            parts.append(self.positives[rng.integers(0, len(self.positives), n_pos)])
        if self.samples - n_pos:
            parts.append(negatives[rng.integers(0, len(negatives), self.samples - n_pos)])
        crops = np.concatenate(parts) if parts else np.zeros((0, 3), np.int64)
        crops = self.jitter(crops, rng)
        streams = order_by_region(crops, self.region_px, self.num_workers * self.world_size, rng)
        return interleave_batches(streams, self.batch_size)

    def jitter(self, crops: CropTable, rng: np.random.Generator) -> CropTable:
        """Shift crops by up to ``jitter_px`` each way, kept inside their fragment."""
        out = crops.copy()
        if self.jitter_px > 0 and len(out):
            out[:, 1:] += rng.integers(-self.jitter_px, self.jitter_px + 1, (len(out), 2))
        for f, (h, w) in self.shapes.items():
            sel = out[:, 0] == f
            out[sel, 1] = np.clip(out[sel, 1], 0, max(h - self.tile_px, 0))
            out[sel, 2] = np.clip(out[sel, 2], 0, max(w - self.tile_px, 0))
        return out

    def batches(self, epoch: int) -> list[CropBatch]:
        """Return this rank's batches of ``epoch``, each with the batch it reads ahead."""
        crops = self.draw(epoch)
        rows = [crops[i : i + self.batch_size] for i in range(0, len(crops), self.batch_size)]
        mine = [CropBatch(map(tuple, b.tolist())) for b in rows[self.rank :: self.world_size]]
        for b, batch in enumerate(mine[: len(mine) - self.num_workers]):
            batch.read_ahead = tuple(mine[b + self.num_workers])  # the same worker's next one
        return mine

    def __iter__(self) -> Iterator[CropBatch]:
        """Yield this rank's batches of the current epoch."""
        yield from self.batches(self.epoch)

    def __len__(self) -> int:
        """Batches this rank yields per epoch."""
        n_batches = -(-self.samples // self.batch_size)
        return len(range(self.rank, n_batches, self.world_size))


def shifted_range(layers: LayerRange, shift: int, available: int) -> LayerRange:
    """Return ``layers`` widened by ``shift`` on each side, clipped to ``[0, available)``."""
    return LayerRange(max(0, layers.start - shift), min(available, layers.stop + shift))


class CropDataset(Dataset[dict[str, torch.Tensor]]):
    """Read normalised (k, tile, tile) crops with their labels from store fragments.

    ``dataset[(f, y0, x0)]`` returns a dict of float32 tensors: ``image`` (k, t, t),
    ``label`` (1, t, t) 0/1 ink, ``valid`` (1, t, t) 0/1 papyrus (pixels outside the mask or
    the fragment do not count in losses or metrics), and ``origin`` (3,) int64.

    Args:
        fragments: store fragments (training ones need labels).
        layers: the layer range, checked against every fragment.
        tile_px: crop size.
        augment: ``(image (k',t,t) float32, mask (t,t) uint8, depth=k) -> (image (k,t,t),
            mask)`` or None; it receives ``depth_shift`` extra layers on each side (when the
            fragments have them) and picks the ``k`` it keeps.
        cache_mb: decoded-block cache budget of this dataset (per DataLoader worker).
        depth_shift: layers read beyond each end of ``layers`` for the augmentation's depth
            shift; clipped to the layers every fragment has. Unaugmented crops are the
            centre ``k`` layers, exactly ``layers``.
        normalize: how CT values are normalised (see :func:`normalizer_for`).
    """

    def __init__(
        self,
        fragments: Sequence[Fragment],
        layers: LayerRange,
        tile_px: int,
        augment: Augment | None = None,
        cache_mb: float = 512,
        depth_shift: int = 0,
        normalize: NormMode | str = NormMode.FRAGMENT,
    ) -> None:
        self.fragments = list(fragments)
        self.layers = layers
        for f in self.fragments:
            layers.check(f.meta.layers, where=f"fragment {f.id}")
        self.read_layers = shifted_range(
            layers, depth_shift, min((f.meta.layers for f in self.fragments), default=layers.stop)
        )
        self.offset = layers.start - self.read_layers.start
        self.tile_px = tile_px
        self.augment = augment
        self.cache_mb = cache_mb
        self.volumes = [f.volume for f in self.fragments]
        self.masks = [f.mask() for f in self.fragments]
        self.labels = [f.labels() for f in self.fragments]
        self.normalizers = [
            normalizer_for(f.layer_stats(), self.read_layers, normalize) for f in self.fragments
        ]
        self._cache: BlockCache | None = None

    def __getstate__(self) -> dict[str, Any]:
        """Pickle without the cache: each DataLoader worker builds its own."""
        state = self.__dict__.copy()
        state["_cache"] = None
        return state

    @property
    def cache(self) -> BlockCache:
        """Return this process's block cache (created on first use)."""
        if self._cache is None:
            self._cache = BlockCache(self.volumes, self.read_layers, self.cache_mb)
        return self._cache

    def __len__(self) -> int:
        """Not meaningful for coordinate-indexed access; the sampler sets the length."""
        return sum(int(np.prod(v.shape[1:])) for v in self.volumes)

    def read_raw(self, f: int, y0: int, x0: int) -> NDArray[np.uint16]:
        """Return the (k', t, t) uint16 crop of ``read_layers`` at (y0, x0) of fragment ``f``."""
        return self.cache.read(f, y0, x0, self.tile_px)

    def plane_crop(self, plane: NDArray[np.uint8] | None, y0: int, x0: int) -> NDArray[np.uint8]:
        """Return the (t, t) crop of a 2-D plane, zero-padded (zeros if ``plane`` is None)."""
        t = self.tile_px
        out = np.zeros((t, t), dtype=np.uint8)
        if plane is not None:
            part = plane[y0 : y0 + t, x0 : x0 + t]
            out[: part.shape[0], : part.shape[1]] = part
        return out

    def __getitem__(self, key: tuple[int, int, int]) -> dict[str, torch.Tensor]:
        """Read, normalise and augment the crop at ``key = (fragment, y0, x0)``."""
        return self.item(key, augment=True)

    def __getitems__(self, keys: Sequence[tuple[int, int, int]]) -> list[dict[str, torch.Tensor]]:
        """Read an augmented batch (the DataLoader passes a batch's keys here)."""
        return self.batch(keys, augment=True)

    def batch(
        self, keys: Sequence[tuple[int, ...]], augment: bool = True
    ) -> list[dict[str, torch.Tensor]]:
        """Read the samples at ``keys`` through the batched read path, augmented or not.

        Two threads decode, cut and normalise the batch's crops (see
        :meth:`BlockCache.read_many`); augmentation, which draws from one seeded generator,
        follows in this thread in batch order.
        """
        checked = [self._check_key(key) for key in keys]
        images = self.read_raw_batch(keys, transform=self._normalise)
        return [self._sample(key, image, augment) for key, image in zip(checked, images)]

    def read_raw_batch(
        self,
        keys: Sequence[tuple[int, ...]],
        transform: Callable[[int, NDArray[np.uint16]], Any] | None = None,
    ) -> Iterator[Any]:
        """Yield the (k, t, t) uint16 crops at ``keys`` (``transform(fragment, crop)`` of them).

        The blocks of the batch announced in ``keys.read_ahead`` (a :class:`CropBatch`) are
        read ahead.
        """
        checked = [self._check_key(key) for key in keys]
        ahead = list(getattr(keys, "read_ahead", ()))
        return self.cache.read_many(checked, self.tile_px, then=ahead, transform=transform)

    def _normalise(self, f: int, raw: NDArray[np.uint16]) -> NDArray[np.float32]:
        """Normalise a (k, t, t) uint16 crop of fragment ``f`` to float32."""
        return self.normalizers[f](raw)

    def item(self, key: tuple[int, ...], augment: bool = True) -> dict[str, torch.Tensor]:
        """Return the crop at ``key = (fragment, y0, x0)``, augmented or not (see class doc)."""
        f, y0, x0 = self._check_key(key)
        return self._sample((f, y0, x0), self._normalise(f, self.read_raw(f, y0, x0)), augment)

    def _check_key(self, key: tuple[int, ...]) -> tuple[int, int, int]:
        f, y0, x0 = (int(v) for v in key)
        if not 0 <= f < len(self.fragments):
            raise InvalidInputError(f"crop fragment index {f} out of range")
        return f, y0, x0

    def _sample(
        self, key: tuple[int, int, int], image: NDArray[np.float32], augment: bool
    ) -> dict[str, torch.Tensor]:
        """Build the sample dict from the normalised (k, t, t) float32 crop at ``key``."""
        f, y0, x0 = key
        valid = self.plane_crop(self.masks[f], y0, x0)
        label = self.plane_crop(self.labels[f], y0, x0) & valid
        k = self.layers.k
        if augment and self.augment is not None:
            # label and validity travel as one mask so they stay aligned (values 0..3)
            image, moved = self.augment(image, label + 2 * valid, depth=k)
            packed = moved.astype(np.uint8)
            label, valid = packed & np.uint8(1), packed >> np.uint8(1)
        else:
            image = image[self.offset : self.offset + k]
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)),
            "label": torch.from_numpy(label.astype(np.float32))[None],
            "valid": torch.from_numpy(valid.astype(np.float32))[None],
            "origin": torch.tensor([f, y0, x0], dtype=torch.int64),
        }
