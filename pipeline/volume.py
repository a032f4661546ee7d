"""Read normalised crops of a layer range from a stored volume, through a bounded cache.

Shared by training (crops at sampled windows) and inference/validation (crops on a grid):
:class:`BlockCache` keeps decoded (k, B, B) blocks (B = the volume's chunk size) in an LRU of
bounded size, :class:`Normalizer` maps uint16 CT values to float32 with the per-layer
statistics stored at ingest, and :class:`VolumeView` presents a fragment's layer range as a
lazily read, normalised (k, H, W) array.
"""

from __future__ import annotations

import mmap
import os
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from numcodecs import blosc
from numpy.typing import NDArray
from zarr.codecs import BloscCodec, BytesCodec
from zarr.storage import LocalStore

from .errors import InvalidInputError, StoreError
from .layers import LayerRange


def mapped_empty(shape: tuple[int, ...], dtype: Any = np.uint16) -> NDArray[Any]:
    """Return a new uninitialised array in its own anonymous memory mapping.

    Unlike ``np.empty``, this skips numpy's transparent-huge-page advice for arrays >= 4 MB:
    where the kernel has to compact memory to find huge pages, first touch then costs ~5 ms a
    2 MB page instead of ~0.8 ms (measured on the 2-core benchmark machines), which made a
    cold block cache 3x slower to fill. The mapping is released with the array.
    """
    count = int(np.prod(shape))
    buf = mmap.mmap(-1, max(count * np.dtype(dtype).itemsize, 1))
    return np.frombuffer(buf, dtype=dtype, count=count).reshape(shape)


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

    def __call__(self, crop: NDArray[np.uint16]) -> NDArray[np.float32]:
        """Normalise a (k, h, w) uint16 crop to (k, h, w) float32."""
        scale, offset, low, high = self._affine
        x = np.multiply(crop, scale, dtype=np.float32)  # one new array, then in place
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


class ChunkReader:
    """Read (k, B, B) blocks of a (z, H, W) uint16 volume, B = the chunk height/width.

    Zarr's general codec pipeline costs ~5 ms a chunk here, ~7x the work itself (reading a
    2 MB chunk file and Blosc-decoding it takes ~0.7 ms). For the arrays inkpipe writes — a
    local store, no sharding, ``bytes`` + ``blosc`` codecs — this reader opens the chunk files
    and decodes them with numcodecs directly; any other array is read through Zarr.

    Args:
        volume: (z, H, W) uint16 Zarr array.
    """

    def __init__(self, volume: zarr.Array) -> None:
        self.volume = volume
        self.shape = tuple(int(s) for s in volume.shape)
        self.chunks = tuple(int(c) for c in volume.chunks)
        self.root = self._fast_root(volume)
        self._local = threading.local()  # a thread's read buffer and scratch chunk

    @staticmethod
    def _fast_root(volume: zarr.Array) -> Path | None:
        """Return the array's folder if the direct path applies, else None."""
        try:
            meta = volume.metadata
            codecs: tuple[Any, ...] = tuple(getattr(meta, "codecs", ()))
            ok = (
                isinstance(volume.store, LocalStore)
                and volume.shards is None
                and len(codecs) == 2
                and isinstance(codecs[0], BytesCodec)
                and str(getattr(codecs[0].endian, "value", codecs[0].endian)) == "little"
                and isinstance(codecs[1], BloscCodec)
                and np.dtype(volume.dtype) == np.uint16
                and meta.encode_chunk_key((0, 0, 0)) == "c/0/0/0"
            )
        except AttributeError:  # zarr v2 arrays, other metadata layouts
            return None
        return Path(getattr(volume.store, "root", "")) / volume.path if ok else None

    def block_shape(self, zs: slice) -> tuple[int, int, int]:
        """Return the (k, B, B) shape of the blocks :meth:`read_block` fills for layers ``zs``."""
        return (zs.stop - zs.start, self.chunks[1], self.chunks[2])

    def read_block(
        self, zs: slice, by: int, bx: int, out: NDArray[np.uint16] | None = None
    ) -> NDArray[np.uint16]:
        """Return layers ``zs`` of chunk column (by, bx) as a (k, B, B) uint16 block.

        Blocks always have the full chunk size; past the volume's edge they hold the fill
        value. ``out``, if given, must have :meth:`block_shape` and is filled and returned:
        reusing memory avoids first-touch page faults, which cost more than decoding here.
        """
        cz, cy, cx = self.chunks
        shape = self.block_shape(zs)
        if out is None:
            out = mapped_empty(shape)
        if self.root is None:
            _, h, w = self.shape
            y0, x0 = by * cy, bx * cx
            data = np.asarray(self.volume[zs, y0 : min(y0 + cy, h), x0 : min(x0 + cx, w)])
            out[:, : data.shape[1], : data.shape[2]] = data
            out[:, data.shape[1] :] = 0
            out[:, :, data.shape[2] :] = 0
            return out
        fill = self.volume.fill_value or 0  # what chunks never written hold
        for zc in range(zs.start // cz, (zs.stop - 1) // cz + 1):
            z0, z1 = max(zs.start, zc * cz), min(zs.stop, (zc + 1) * cz)
            dst = out[z0 - zs.start : z1 - zs.start]
            path = self.root / "c" / str(zc) / str(by) / str(bx)
            if z1 - z0 == cz:  # a whole chunk: decode straight into the block
                if not self._decode_file(path, dst):
                    dst[...] = fill
                continue
            scratch = getattr(self._local, "scratch", None)
            if scratch is None:
                scratch = self._local.scratch = np.empty((cz, cy, cx), dtype=np.uint16)
            if not self._decode_file(path, scratch):
                scratch[...] = fill
            dst[...] = scratch[z0 - zc * cz : z1 - zc * cz]
        return out

    def _decode_file(self, path: Path, dst: NDArray[np.uint16]) -> bool:
        """Decode chunk file ``path`` into ``dst`` (one whole chunk); False if never written.

        A chunk Blosc stored uncompressed (its ``MEMCPYED`` flag: the data did not compress)
        is read straight into ``dst``, one copy instead of two; any other is read into this
        thread's reusable buffer (no new memory per chunk) and decoded from there.

        Raises:
            StoreError: the file is not a Blosc chunk of this array (damaged or truncated).
        """
        try:
            with open(path, "rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                head = fh.read(_BLOSC_HEADER)
                # Blosc trusts the sizes in the chunk's 16-byte header and would read past
                # the end of a truncated file (stale bytes of the buffer, or a crash): check.
                problem = _header_problem(head, size, dst.nbytes)
                if problem is None and head[2] & _BLOSC_MEMCPYED:
                    got = fh.readinto(dst.data.cast("B"))
                    if got == dst.nbytes:
                        return True
                    problem = f"it ends after {got} of its {dst.nbytes} data bytes"
                if problem is None:
                    buf = getattr(self._local, "buf", None)
                    if buf is None or len(buf) < size:
                        buf = self._local.buf = bytearray(max(size, dst.nbytes + 4096))
                    buf[:_BLOSC_HEADER] = head
                    view = memoryview(buf)[_BLOSC_HEADER:size]
                    got = fh.readinto(view)
                    if got == len(view):
                        try:
                            blosc.decompress(memoryview(buf)[:size], dst)
                            return True
                        except Exception as exc:  # numcodecs raises RuntimeError/ValueError
                            problem = f"Blosc cannot decode it ({exc})"
                    else:
                        problem = f"it changed while being read ({got} of {len(view)} bytes)"
        except FileNotFoundError:
            return False
        frag = self.root.parent.name if self.root is not None else "?"
        raise StoreError(
            f"store chunk file {path} is damaged: {problem}. The store was changed or its "
            f"writing interrupted; re-ingest fragment {frag!r} with "
            "`inkpipe ingest FRAGMENTS --out STORE --overwrite`"
        )


_BLOSC_HEADER = 16  # bytes: version, codec version, flags, type size, 3 x uint32 sizes
_BLOSC_MEMCPYED = 0x02  # flag: the data follows the header uncompressed and unshuffled


def _header_problem(head: bytes, size: int, nbytes: int) -> str | None:
    """Return what is wrong with a Blosc chunk of ``size`` bytes decoding to ``nbytes``, or None.

    ``head`` is the file's first (up to) 16 bytes.
    """
    if len(head) < _BLOSC_HEADER:
        return f"it holds {size} bytes, not even a Blosc header"
    decoded = int.from_bytes(head[4:8], "little")
    stored = int.from_bytes(head[12:16], "little")
    if stored != size:
        return f"its header says {stored} bytes but the file has {size} (truncated?)"
    if decoded != nbytes:
        return f"it decodes to {decoded} bytes, not the {nbytes} of a chunk"
    if head[2] & _BLOSC_MEMCPYED and size != _BLOSC_HEADER + nbytes:
        return (
            f"it says it is stored uncompressed but has {size} bytes, not {_BLOSC_HEADER + nbytes}"
        )
    return None


BlockKey = tuple[int, int, int]  # (fragment, block row, block column)


class BlockCache:
    """A bounded LRU cache of decoded (k, B, B) blocks of volumes, (B, B) = chunk (y, x).

    Blocks are keyed by (fragment, block row, block column) for one fixed layer range. A crop
    is assembled from the (at most 2 x 2) blocks it touches; a missing block is decoded once by
    a :class:`ChunkReader` and then serves every crop that touches it while it stays cached.
    Evicted blocks' memory is kept and decoded into again (blocks and spares together never
    exceed the most the cache held at once), so a warm cache allocates and faults in nothing.

    :meth:`read_many` reads a list of crops on two threads (the caller's and a helper that
    decodes ahead), so decoding and cutting use two cores; afterwards the helper reads ahead
    the blocks of crops announced for the next call. Blocks that coming crops need are
    pinned (not evicted), so the budget may be exceeded by up to a quarter. ``misses``
    counts blocks decoded, ``hits`` block uses that found their block cached or in flight.

    Args:
        volumes: (z, H, W) uint16 Zarr arrays, indexed by fragment.
        layers: the layer range to read.
        budget_mb: maximum decoded bytes held (at least the blocks of one crop are kept).
    """

    def __init__(
        self, volumes: Sequence[zarr.Array], layers: LayerRange, budget_mb: float = 512
    ) -> None:
        self.volumes = list(volumes)
        self.readers = [ChunkReader(v) for v in self.volumes]
        self.layers = layers
        self.block = [(int(v.chunks[1]), int(v.chunks[2])) for v in self.volumes]
        self.budget = int(budget_mb * 2**20)
        self.blocks: OrderedDict[BlockKey, NDArray[np.uint16]] = OrderedDict()
        self.nbytes = 0
        self.hits = self.misses = 0
        self._spare: list[NDArray[np.uint16]] = []  # evicted blocks' memory, to decode into
        self._spare_bytes = 0
        self._lock = threading.Lock()
        self._pins: Counter[BlockKey] = Counter()  # uses still to come: not evictable
        self._loading: dict[BlockKey, Future[None]] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._pid = os.getpid()

    def keys_of(self, f: int, y0: int, x0: int, tile_px: int) -> list[BlockKey]:
        """Return the keys of the blocks the (tile x tile) crop at (y0, x0) touches."""
        bh, bw = self.block[f]
        h, w = self.volumes[f].shape[1:]
        y1, x1 = min(y0 + tile_px, h), min(x0 + tile_px, w)
        return [
            (f, by, bx)
            for by in range(y0 // bh, (y1 - 1) // bh + 1)
            for bx in range(x0 // bw, (x1 - 1) // bw + 1)
        ]

    def _decode(self, key: BlockKey) -> None:
        """Decode block ``key`` into the cache, reusing an evicted block's memory."""
        try:
            zs = self.layers.as_slice()
            reader = self.readers[key[0]]
            shape = reader.block_shape(zs)
            need = self._block_bytes(key)
            with self._lock:  # make room first, then decode into an evicted block's memory
                for old_key in list(self.blocks):
                    if self.nbytes + need <= self.budget:
                        break
                    if not self._pins[old_key]:
                        self._drop(old_key)
                spare = self._take_spare(shape)
            block = reader.read_block(zs, key[1], key[2], out=spare)
            with self._lock:
                self.blocks[key] = block
                self.nbytes += block.nbytes
                self.misses += 1
        finally:
            with self._lock:
                self._loading.pop(key, None)

    def _ensure(self, keys: list[BlockKey], job: _Job | None = None) -> None:
        """Make every block in ``keys`` (pinned by the caller) present in the cache.

        While a block is still being decoded by the other thread, this one decodes blocks
        of ``job``'s coming crops (if given) instead of waiting idle.
        """
        waits, todo = [], []
        with self._lock:
            for key in keys:
                if key in self.blocks:
                    self.blocks.move_to_end(key)
                    self.hits += 1
                elif key in self._loading:  # being read ahead
                    waits.append(self._loading[key])
                    self.hits += 1
                else:
                    todo.append(key)
                    self._loading[key] = Future()
        for key in todo:
            fut = self._loading[key]
            try:
                self._decode(key)
            except BaseException as exc:
                fut.set_exception(exc)
                raise
            fut.set_result(None)
        for fut in waits:
            while job is not None and not fut.done():
                ahead = self._claim_ahead(job)
                if ahead is None:
                    break
                self._read_ahead(ahead)
            fut.result()  # re-raises a failed read-ahead here, in the reading thread

    def _cut(
        self, f: int, y0: int, x0: int, tile_px: int, keys: list[BlockKey]
    ) -> NDArray[np.uint16]:
        """Copy the crop out of its (present, pinned) blocks."""
        bh, bw = self.block[f]
        h, w = self.volumes[f].shape[1:]
        y1, x1 = min(y0 + tile_px, h), min(x0 + tile_px, w)
        out = np.empty((self.layers.k, tile_px, tile_px), dtype=np.uint16)
        if y1 - y0 < tile_px or x1 - x0 < tile_px:  # past the edge: zeros
            out[:, y1 - y0 :] = 0
            out[:, :, x1 - x0 :] = 0
        with self._lock:
            blocks = [self.blocks[key] for key in keys]
        for key, block in zip(keys, blocks):
            by, bx = key[1] * bh, key[2] * bw
            ys, ye = max(y0, by), min(y1, by + bh)
            xs, xe = max(x0, bx), min(x1, bx + bw)
            out[:, ys - y0 : ye - y0, xs - x0 : xe - x0] = block[
                :, ys - by : ye - by, xs - bx : xe - bx
            ]
        return out

    def _unpin(self, keys: list[BlockKey]) -> None:
        """Release one use of each key; then drop unpinned blocks while over budget."""
        with self._lock:
            for key in keys:
                self._pins[key] -= 1
                if self._pins[key] <= 0:
                    del self._pins[key]
            if self.nbytes > self.budget:  # read-ahead overshot: back within the budget
                for key in [k for k in self.blocks if not self._pins[k]]:
                    if self.nbytes <= self.budget:
                        break
                    self._drop(key)

    def _drop(self, key: BlockKey) -> None:
        """Evict block ``key`` (caller holds the lock), keeping its memory for reuse.

        Blocks and spares together never exceed the most the cache held at once (bounded by
        the budget plus read-ahead): memory handed back to the kernel would cost page faults
        again when touched, ~0.5 s a GiB or more here.
        """
        block = self.blocks.pop(key)
        self.nbytes -= block.nbytes
        self._spare.append(block)
        self._spare_bytes += block.nbytes

    def _take_spare(self, shape: tuple[int, ...]) -> NDArray[np.uint16] | None:
        """Return kept memory for a block of ``shape`` (caller holds the lock), or None.

        With none of that shape (fragments chunked differently), one spare is let go, so
        the new block does not add to the memory held.
        """
        for i, block in enumerate(self._spare):
            if block.shape == shape:
                self._spare_bytes -= block.nbytes
                return self._spare.pop(i)
        if self._spare:
            self._spare_bytes -= self._spare.pop(0).nbytes
        return None

    def _check_fork(self) -> None:
        """In a forked child (a DataLoader worker) start afresh: no thread followed the fork."""
        if os.getpid() != self._pid:
            self._pid = os.getpid()
            self._pool, self._lock = None, threading.Lock()
            self._loading, self._pins = {}, Counter()

    def read(self, f: int, y0: int, x0: int, tile_px: int) -> NDArray[np.uint16]:
        """Return the (k, tile, tile) uint16 crop at (y0, x0); zeros outside the volume."""
        self._check_fork()
        f, y0, x0 = int(f), int(y0), int(x0)
        keys = self.keys_of(f, y0, x0, tile_px)
        with self._lock:
            self._pins.update(keys)
        try:
            self._ensure(keys)
            return self._cut(f, y0, x0, tile_px, keys)
        finally:
            self._unpin(keys)

    def _read_ahead(self, key: BlockKey) -> None:
        """Decode ``key`` (claimed in ``_loading``), handing any error to a waiting reader."""
        fut = self._loading[key]
        try:
            self._decode(key)
        except BaseException as exc:  # noqa: BLE001  # re-raised by the reader in _ensure
            fut.set_exception(exc)
            return
        fut.set_result(None)

    def _block_bytes(self, key: BlockKey) -> int:
        """Bytes of the decoded block ``key``."""
        return int(np.prod(self.readers[key[0]].block_shape(self.layers.as_slice()))) * 2

    def _work(self, job: _Job) -> bool:
        """Take the next crop of ``job`` not yet taken and produce it; False if none is left.

        The crop's blocks are pinned (unless read-ahead did), decoded if missing (or awaited
        if the other thread is decoding them), the crop is cut and transformed, and its
        result (or error) is set.
        """
        with self._lock:
            if job.taken >= len(job.plan):
                return False
            i = job.taken
            job.taken += 1
            keys = job.keys[i]
            if job.pinned <= i:
                self._pins.update(keys)
                job.pinned = i + 1
        try:
            self._ensure(keys, job)
            f, y, x = job.plan[i]
            crop = self._cut(f, y, x, job.tile_px, keys)
            job.results[i].set_result(crop if job.transform is None else job.transform(f, crop))
        except BaseException as exc:  # noqa: BLE001  # re-raised by the reader in read_many
            job.results[i].set_exception(exc)
        finally:
            self._unpin(keys)
        return True

    def _claim_ahead(self, job: _Job) -> BlockKey | None:
        """Claim the next missing block of the crops ahead of the taken ones, or None.

        Crops are pinned in order as the scan reaches them, while the blocks decoded for
        crops not yet taken stay under a quarter of the budget.
        """
        with self._lock:
            if job.closed:
                return None
            job.scan = max(job.scan, job.taken)
            while job.scan < len(job.plan):
                j = job.scan
                if job.pinned <= j:
                    if sum(job.cost[job.taken : j]) >= self.budget // 4:
                        return None
                    self._pins.update(job.keys[j])
                    job.pinned = j + 1
                for key in job.keys[j]:
                    if key not in self.blocks and key not in self._loading:
                        self._loading[key] = Future()
                        job.cost[j] += self._block_bytes(key)
                        return key
                job.scan += 1
        return None

    def _help(self, job: _Job, then: list[BlockKey]) -> None:
        """Helper-thread task: decode ahead, share ``job``'s crops, then read ``then`` ahead.

        Decoding the blocks of coming crops comes first (the reader cuts meanwhile); when
        none is missing and crops are transformed, the helper takes crops too. The ``then``
        blocks (those of the crops a later call will read) are decoded last, unpinned, at
        most a quarter of the budget.
        """
        while True:
            key = self._claim_ahead(job)
            if key is not None:
                self._read_ahead(key)
                continue
            # plain crops: copying is memory-bound, so this thread only decodes
            if job.transform is not None and self._work(job):
                continue
            with self._lock:  # read-ahead is at its limit: wait for the reader to move on
                n = len(job.plan)
                limited = not job.closed and job.scan < n and job.taken < n
                coming = job.results[job.taken] if limited else None
            if coming is None:
                break
            wait([coming])
        room = self.budget // 4
        for key in dict.fromkeys(then):
            need = self._block_bytes(key)
            with self._lock:
                if job.closed or room < need:
                    return
                if key in self.blocks or key in self._loading:
                    continue
                self._loading[key] = Future()
            room -= need
            self._read_ahead(key)

    def read_many(
        self,
        crops: Sequence[tuple[int, int, int]],
        tile_px: int,
        then: Sequence[tuple[int, int, int]] = (),
        transform: Callable[[int, NDArray[np.uint16]], Any] | None = None,
    ) -> Iterator[Any]:
        """Yield the (k, tile, tile) uint16 crops at ``crops`` (fragment, y0, x0), in order.

        Two threads share the work. A helper thread decodes the missing blocks of coming
        crops, in order, while this thread cuts the crops whose blocks are ready (and, rather
        than wait for a block the helper is decoding, decodes coming blocks too). Decoding
        runs at most a quarter of the budget ahead; blocks of crops ahead stay pinned until
        used. With ``transform``, ``transform(fragment, crop)`` is yielded instead of each
        crop (e.g. normalisation: it must be thread-safe and draw no random numbers, as
        crops are transformed on either thread in no fixed order), and the helper takes
        crops too whenever no block is missing. Blosc decoding, NumPy copies and arithmetic
        release the GIL, so both cores work. Plain crops are cut by this thread only: two
        threads copying measured slower than one here (memory-bound). Last, the helper
        decodes the blocks of ``then`` (crops a later call will read), unpinned. Errors are
        raised here, at the crop they belong to.
        """
        self._check_fork()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="inkpipe-read-ahead")
        plan = [(int(f), int(y), int(x)) for f, y, x in crops]
        job = _Job(plan, [self.keys_of(f, y, x, tile_px) for f, y, x in plan], tile_px, transform)
        hints = [k for f, y, x in then for k in self.keys_of(int(f), int(y), int(x), tile_px)]
        helper = self._pool.submit(self._help, job, hints)
        done = 0
        try:
            for i in range(len(plan)):
                while not job.results[i].done() and self._work(job):
                    pass  # this thread takes crops until the next one to yield is ready
                crop = job.results[i].result()
                job.results[i] = _DONE  # hold no crop the reader has let go of
                done += 1
                yield crop
        finally:
            if done < len(plan):  # the reader stopped early: take nothing more
                with self._lock:
                    taken, pinned = job.taken, job.pinned
                    job.taken = job.pinned = len(plan)
                    job.closed = True
                for keys in job.keys[taken:pinned]:  # pinned ahead, never taken
                    self._unpin(keys)
                for result in job.results[taken:]:  # wake a helper waiting for the reader
                    result.cancel()
                    result.set_running_or_notify_cancel()  # cancel() alone wakes no wait()
                wait([helper])  # the helper stops after the crop or block in hand


_DONE: Future[Any] = Future()  # stands in for the results a reader has taken
_DONE.set_result(None)


@dataclass
class _Job:
    """The shared state of one :meth:`BlockCache.read_many` call (guarded by the lock)."""

    plan: list[tuple[int, int, int]]  # (fragment, y0, x0) of each crop
    keys: list[list[BlockKey]]  # the blocks each crop touches
    tile_px: int
    transform: Callable[[int, NDArray[np.uint16]], Any] | None
    taken: int = 0  # crops [0, taken) were taken by a thread to cut
    pinned: int = 0  # crops [0, pinned) had their blocks pinned
    scan: int = 0  # read-ahead found no missing block in the crops before this one
    closed: bool = False
    results: list[Future[Any]] = field(default_factory=list)
    cost: list[int] = field(default_factory=list)  # bytes read ahead for each crop

    def __post_init__(self) -> None:
        self.results = [Future() for _ in self.plan]
        self.cost = [0] * len(self.plan)


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
