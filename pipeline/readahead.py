"""Read a batch of crops on two threads: a helper decodes the blocks of coming crops ahead.

:class:`ReadAhead` schedules the work of :meth:`ReadAhead.read_batch` over the calling thread
and one helper thread, on a :class:`~inkpipe.pipeline.blocks.BlockStore`: the helper decodes
the missing blocks of coming crops in order while the caller cuts the crops whose blocks are
ready. Blosc decoding, NumPy copies and arithmetic release the GIL, so both cores work.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
from numpy.typing import NDArray

from .blocks import BlockKey, BlockStore

Crop = tuple[int, int, int]  # (fragment, y0, x0)
Transform = Callable[[int, NDArray[np.uint16]], Any]  # (fragment, (k, t, t) uint16 crop) -> …


@dataclass
class _Batch:
    """The shared state of one :meth:`ReadAhead.read_batch` call (guarded by the store lock)."""

    plan: list[Crop]  # (fragment, y0, x0) of each crop
    keys: list[list[BlockKey]]  # the blocks each crop touches
    tile_px: int
    transform: Transform | None
    taken: int = 0  # crops [0, taken) were taken by a thread to cut
    pinned: int = 0  # crops [0, pinned) had their blocks pinned
    scan: int = 0  # read-ahead found no missing block in the crops before this one
    closed: bool = False  # the reader stopped early: take and decode nothing more
    results: list[Future[Any]] = field(default_factory=list)
    cost: list[int] = field(default_factory=list)  # bytes read ahead for each crop

    def __post_init__(self) -> None:
        self.results = [Future() for _ in self.plan]
        self.cost = [0] * len(self.plan)


_DONE: Future[Any] = Future()  # stands in for the results a reader has taken
_DONE.set_result(None)


class ReadAhead:
    """Read batches of crops from a block store, decoding ahead on a helper thread.

    Decoding runs at most a quarter of the store's budget ahead of the crops taken; the
    blocks of crops ahead stay pinned until used, so the store may exceed its budget by up
    to that quarter. One helper thread serves every batch; in a forked child (a DataLoader
    worker) a new one is started.

    Args:
        store: where blocks are decoded and kept.
    """

    def __init__(self, store: BlockStore) -> None:
        self.store = store
        self._pool: ThreadPoolExecutor | None = None
        self._pid = os.getpid()

    @property
    def ahead_bytes(self) -> int:
        """Decoded bytes read-ahead may hold for crops not yet taken: a quarter of the budget."""
        return self.store.budget // 4

    def read_batch(
        self,
        crops: Sequence[tuple[int, int, int]],
        tile_px: int,
        read_ahead: Sequence[tuple[int, int, int]] = (),
        transform: Transform | None = None,
    ) -> Iterator[Any]:
        """Yield the (k, tile, tile) uint16 crops at ``crops`` (fragment, y0, x0), in order.

        Two threads share the work. A helper thread decodes the missing blocks of coming
        crops, in order, while this thread cuts the crops whose blocks are ready (and, rather
        than wait for a block the helper is decoding, decodes coming blocks too). With
        ``transform``, ``transform(fragment, crop)`` is yielded instead of each crop (e.g.
        normalisation: it must be thread-safe and draw no random numbers, as crops are
        transformed on either thread in no fixed order), and the helper takes crops too
        whenever no block is missing. Plain crops are cut by this thread only: two threads
        copying measured slower than one here (memory-bound). Last, the helper decodes the
        blocks of the crops ``read_ahead`` (those a later call will read), unpinned, at most
        :attr:`ahead_bytes`. Errors are raised here, at the crop they belong to.

        Args:
            crops: (fragment, y0, x0) of each crop, in the order to yield them.
            tile_px: crop size.
            read_ahead: (fragment, y0, x0) of crops a later call will read.
            transform: applied to each crop before it is yielded, or None.

        Yields:
            (k, tile, tile) uint16 crops (zeros outside the volume), or what ``transform``
            returns for them.
        """
        store = self.store
        store.reset_if_forked()
        if os.getpid() != self._pid:  # no thread followed the fork
            self._pid, self._pool = os.getpid(), None
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="inkpipe-read-ahead")
        plan = [(int(f), int(y), int(x)) for f, y, x in crops]
        keys = [store.keys_of(f, y, x, tile_px) for f, y, x in plan]
        batch = _Batch(plan, keys, tile_px, transform)
        hints = [
            k for f, y, x in read_ahead for k in store.keys_of(int(f), int(y), int(x), tile_px)
        ]
        helper = self._pool.submit(self._help, batch, hints)
        done = 0
        try:
            for i in range(len(plan)):
                while not batch.results[i].done() and self._produce_next_crop(batch):
                    pass  # this thread takes crops until the next one to yield is ready
                crop = batch.results[i].result()
                batch.results[i] = _DONE  # hold no crop the reader has let go of
                done += 1
                yield crop
        finally:
            if done < len(plan):  # the reader stopped early
                self._abandon(batch)
                wait([helper])  # the helper stops after the crop or block in hand

    def decode_ahead(self, key: BlockKey) -> None:
        """Decode the claimed block ``key``, handing any error to the reader waiting for it."""
        try:
            self.store.load(key)
        except BaseException:  # noqa: BLE001  # re-raised by the reader in ensure_present
            return

    def _produce_next_crop(self, batch: _Batch) -> bool:
        """Take the next crop of ``batch`` not yet taken and produce it; False if none is left.

        The crop's blocks are pinned (unless read-ahead did), decoded if missing (or awaited
        while decoding coming blocks, if the other thread is decoding them), the crop is cut
        and transformed, and its result (or error) is set.
        """
        store = self.store
        with store.lock:
            if batch.taken >= len(batch.plan):
                return False
            i = batch.taken
            batch.taken += 1
            keys = batch.keys[i]
            if batch.pinned <= i:
                store.pins.update(keys)
                batch.pinned = i + 1
        try:
            store.ensure_present(keys, meanwhile=partial(self._decode_next_ahead, batch))
            f, y, x = batch.plan[i]
            crop = store.cut_crop(f, y, x, batch.tile_px, keys)
            result = crop if batch.transform is None else batch.transform(f, crop)
            batch.results[i].set_result(result)
        except BaseException as exc:  # noqa: BLE001  # re-raised by the reader in read_batch
            batch.results[i].set_exception(exc)
        finally:
            store.unpin(keys)
        return True

    def _claim_next_ahead(self, batch: _Batch) -> BlockKey | None:
        """Claim the next missing block of the crops ahead of the taken ones, or None.

        Crops are pinned in order as the scan reaches them, while the blocks decoded for
        crops not yet taken stay under :attr:`ahead_bytes`.
        """
        store = self.store
        with store.lock:
            if batch.closed:
                return None
            batch.scan = max(batch.scan, batch.taken)
            while batch.scan < len(batch.plan):
                j = batch.scan
                if batch.pinned <= j:
                    if sum(batch.cost[batch.taken : j]) >= self.ahead_bytes:
                        return None
                    store.pins.update(batch.keys[j])
                    batch.pinned = j + 1
                for key in batch.keys[j]:
                    if store.claim_if_absent(key):
                        batch.cost[j] += store.block_bytes(key)
                        return key
                batch.scan += 1
        return None

    def _decode_next_ahead(self, batch: _Batch) -> bool:
        """Claim and decode the next missing block of ``batch``; False if none may be."""
        key = self._claim_next_ahead(batch)
        if key is None:
            return False
        self.decode_ahead(key)
        return True

    def _help(self, batch: _Batch, read_ahead: list[BlockKey]) -> None:
        """Helper-thread task: decode ahead, share ``batch``'s crops, then decode ``read_ahead``.

        Decoding the blocks of coming crops comes first (the reader cuts meanwhile); when
        none is missing and crops are transformed, the helper takes crops too. The
        ``read_ahead`` blocks (those of the crops a later call will read) are decoded last,
        unpinned, at most :attr:`ahead_bytes`.
        """
        store = self.store
        while True:
            if self._decode_next_ahead(batch):
                continue
            # plain crops: copying is memory-bound, so this thread only decodes
            if batch.transform is not None and self._produce_next_crop(batch):
                continue
            with store.lock:  # read-ahead is at its limit: wait for the reader to move on
                n = len(batch.plan)
                limited = not batch.closed and batch.scan < n and batch.taken < n
                coming = batch.results[batch.taken] if limited else None
            if coming is None:
                break
            wait([coming])
        room = self.ahead_bytes
        for key in dict.fromkeys(read_ahead):
            need = store.block_bytes(key)
            with store.lock:
                if batch.closed or room < need:
                    return
                if not store.claim_if_absent(key):
                    continue
            room -= need
            self.decode_ahead(key)

    def _abandon(self, batch: _Batch) -> None:
        """Stop ``batch`` after its reader let go early: release its pins, wake its helper."""
        store = self.store
        with store.lock:
            taken, pinned = batch.taken, batch.pinned
            batch.taken = batch.pinned = len(batch.plan)
            batch.closed = True
        for keys in batch.keys[taken:pinned]:  # pinned ahead, never taken
            store.unpin(keys)
        for result in batch.results[taken:]:  # wake a helper waiting for the reader
            result.cancel()
            result.set_running_or_notify_cancel()  # cancel() alone wakes no wait()
