"""Keep decoded blocks of volumes in a bounded LRU, pinned while coming crops need them.

A block is one fixed layer range of one chunk column: a (k, B, B) uint16 array, (B, B) = the
volume's chunk (y, x) size, keyed by ``(fragment, block row, block column)``. A crop is cut
from the (at most 2 x 2) blocks it touches. :class:`BlockStore` decodes a missing block once,
through a :class:`~inkpipe.pipeline.chunks.ChunkReader`, and keeps it while the decoded bytes
fit the budget. It is safe to use from several threads; the read-ahead scheduler
(:mod:`inkpipe.pipeline.readahead`) decodes blocks on a second one.
"""

from __future__ import annotations

import os
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Future

import numpy as np
from numpy.typing import NDArray

from .chunks import ChunkReader
from .layers import LayerRange

BlockKey = tuple[int, int, int]  # (fragment, block row, block column)


class BlockStore:
    """A bounded LRU of decoded (k, B, B) uint16 blocks, with pins and kept spare memory.

    Each block is present (in :attr:`blocks`), being decoded (its future in :attr:`loading`)
    or absent. A pinned block (:attr:`pins` counts the uses still to come) is never evicted,
    so the store may exceed its budget while pinned blocks need the room; :meth:`unpin`
    trims it back. Evicted blocks' memory is kept and decoded into again (blocks and spares
    together never exceed the most the store held at once), so a warm store allocates and
    faults in nothing. In a forked child (a DataLoader worker) the store starts afresh: no
    thread followed the fork.

    ``lock`` guards every attribute; methods documented "caller holds ``lock``" let the
    scheduler make a claim and its own bookkeeping in one step.

    Args:
        readers: one reader per fragment, indexed by fragment.
        layers: the layer range of every block.
        budget_bytes: decoded bytes to hold at most (at least the blocks of one crop are kept).

    Attributes:
        blocks: the present blocks, least recently used first.
        nbytes: bytes of the present blocks.
        hits: block uses that found their block present or being decoded.
        misses: blocks decoded.
        pins: per key, the uses still to come.
        loading: per key being decoded, the future its decoder settles.
    """

    def __init__(
        self, readers: Sequence[ChunkReader], layers: LayerRange, budget_bytes: int
    ) -> None:
        self.readers = list(readers)
        self.layers = layers
        self.budget = budget_bytes
        self.blocks: OrderedDict[BlockKey, NDArray[np.uint16]] = OrderedDict()
        self.nbytes = 0
        self.hits = self.misses = 0
        self.lock = threading.Lock()
        self.pins: Counter[BlockKey] = Counter()
        self.loading: dict[BlockKey, Future[None]] = {}
        self._spare: list[NDArray[np.uint16]] = []  # evicted blocks' memory, to decode into
        self._spare_bytes = 0
        self._pid = os.getpid()
        zs = layers.as_slice()
        self._shapes = [r.block_shape(zs) for r in self.readers]
        self._bytes = [int(np.prod(shape)) * 2 for shape in self._shapes]

    @property
    def spare_count(self) -> int:
        """Number of evicted blocks whose memory is kept for decoding into."""
        return len(self._spare)

    def reset_if_forked(self) -> bool:
        """In a forked child, drop pins and in-flight decodes of the parent; True if forked.

        Blocks already decoded stay: they are valid in the child too.
        """
        if os.getpid() == self._pid:
            return False
        self._pid = os.getpid()
        self.lock = threading.Lock()
        self.loading, self.pins = {}, Counter()
        return True

    def keys_of(self, f: int, y0: int, x0: int, tile_px: int) -> list[BlockKey]:
        """Return the keys of the blocks the (tile x tile) crop at (y0, x0) touches."""
        _, bh, bw = self._shapes[f]
        _, h, w = self.readers[f].shape
        y1, x1 = min(y0 + tile_px, h), min(x0 + tile_px, w)
        return [
            (f, by, bx)
            for by in range(y0 // bh, (y1 - 1) // bh + 1)
            for bx in range(x0 // bw, (x1 - 1) // bw + 1)
        ]

    def block_bytes(self, key: BlockKey) -> int:
        """Return the bytes of the decoded block ``key``."""
        return self._bytes[key[0]]

    def claim_if_absent(self, key: BlockKey) -> bool:
        """Register ``key`` as being decoded unless present or claimed (caller holds ``lock``).

        Returns:
            True if claimed: the caller must then :meth:`load` it.
        """
        if key in self.blocks or key in self.loading:
            return False
        self.loading[key] = Future()
        return True

    def load(self, key: BlockKey) -> None:
        """Decode the claimed block ``key`` and settle its future (with the error, if any).

        Raises:
            StoreError: a chunk file of the block is damaged (after settling the future).
        """
        future = self.loading[key]
        try:
            self._decode(key)
        except BaseException as exc:
            future.set_exception(exc)
            raise
        future.set_result(None)

    def ensure_present(
        self, keys: list[BlockKey], meanwhile: Callable[[], bool] | None = None
    ) -> None:
        """Make every block in ``keys`` (pinned by the caller) present.

        Absent blocks are decoded in this thread. While a block is still being decoded by
        another thread, ``meanwhile()`` (if given) is called to do other useful work instead
        of waiting idle, until it returns False (nothing left to do) or the block is ready.

        Raises:
            StoreError: a block's chunk file is damaged (also when another thread decoded it).
        """
        waits, todo = [], []
        with self.lock:
            for key in keys:
                if key in self.blocks:
                    self.blocks.move_to_end(key)
                    self.hits += 1
                elif key in self.loading:  # being read ahead
                    waits.append(self.loading[key])
                    self.hits += 1
                else:
                    todo.append(key)
                    self.loading[key] = Future()
        for key in todo:
            self.load(key)
        for future in waits:
            while meanwhile is not None and not future.done():
                if not meanwhile():
                    break
            future.result()  # re-raises a failed read-ahead here, in the reading thread

    def cut_crop(
        self, f: int, y0: int, x0: int, tile_px: int, keys: list[BlockKey]
    ) -> NDArray[np.uint16]:
        """Return the (k, tile, tile) uint16 crop at (y0, x0) cut from its blocks ``keys``.

        The blocks must be present and pinned; the crop is zero past the volume's edge.
        """
        _, bh, bw = self._shapes[f]
        _, h, w = self.readers[f].shape
        y1, x1 = min(y0 + tile_px, h), min(x0 + tile_px, w)
        out = np.empty((self.layers.k, tile_px, tile_px), dtype=np.uint16)
        if y1 - y0 < tile_px or x1 - x0 < tile_px:  # past the edge: zeros
            out[:, y1 - y0 :] = 0
            out[:, :, x1 - x0 :] = 0
        with self.lock:
            blocks = [self.blocks[key] for key in keys]
        for key, block in zip(keys, blocks):
            by, bx = key[1] * bh, key[2] * bw
            ys, ye = max(y0, by), min(y1, by + bh)
            xs, xe = max(x0, bx), min(x1, bx + bw)
            out[:, ys - y0 : ye - y0, xs - x0 : xe - x0] = block[
                :, ys - by : ye - by, xs - bx : xe - bx
            ]
        return out

    def pin(self, keys: list[BlockKey]) -> None:
        """Add one coming use to each of ``keys``: they stay until :meth:`unpin`."""
        with self.lock:
            self.pins.update(keys)

    def unpin(self, keys: list[BlockKey]) -> None:
        """Release one use of each key; then evict unpinned blocks while over budget."""
        with self.lock:
            for key in keys:
                self.pins[key] -= 1
                if self.pins[key] <= 0:
                    del self.pins[key]
            if self.nbytes > self.budget:  # read-ahead overshot: back within the budget
                for key in [k for k in self.blocks if not self.pins[k]]:
                    if self.nbytes <= self.budget:
                        break
                    self._evict(key)

    def read_crop(self, f: int, y0: int, x0: int, tile_px: int) -> NDArray[np.uint16]:
        """Return the (k, tile, tile) uint16 crop at (y0, x0), read in this thread.

        Zeros outside the volume.
        """
        self.reset_if_forked()
        f, y0, x0 = int(f), int(y0), int(x0)
        keys = self.keys_of(f, y0, x0, tile_px)
        self.pin(keys)
        try:
            self.ensure_present(keys)
            return self.cut_crop(f, y0, x0, tile_px, keys)
        finally:
            self.unpin(keys)

    def _decode(self, key: BlockKey) -> None:
        """Decode the claimed block ``key`` into the LRU, reusing an evicted block's memory."""
        try:
            reader = self.readers[key[0]]
            with self.lock:  # make room first, then decode into an evicted block's memory
                for old_key in list(self.blocks):
                    if self.nbytes + self._bytes[key[0]] <= self.budget:
                        break
                    if not self.pins[old_key]:
                        self._evict(old_key)
                spare = self._take_spare(self._shapes[key[0]])
            block = reader.read_block(self.layers.as_slice(), key[1], key[2], out=spare)
            with self.lock:
                self.blocks[key] = block
                self.nbytes += block.nbytes
                self.misses += 1
        finally:
            with self.lock:
                self.loading.pop(key, None)

    def _evict(self, key: BlockKey) -> None:
        """Evict block ``key`` (caller holds ``lock``), keeping its memory for reuse.

        Blocks and spares together never exceed the most the store held at once (bounded by
        the budget plus read-ahead): memory handed back to the kernel would cost page faults
        again when touched, ~0.5 s a GiB or more here.
        """
        block = self.blocks.pop(key)
        self.nbytes -= block.nbytes
        self._spare.append(block)
        self._spare_bytes += block.nbytes

    def _take_spare(self, shape: tuple[int, ...]) -> NDArray[np.uint16] | None:
        """Return kept memory for a block of ``shape`` (caller holds ``lock``), or None.

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
