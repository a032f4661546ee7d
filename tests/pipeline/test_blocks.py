import os
import shutil
import time

import numpy as np
import pytest

from inkpipe.pipeline.blocks import BlockStore
from inkpipe.pipeline.errors import StoreError
from inkpipe.pipeline.layers import LayerRange
from inkpipe.pipeline.store import open_fragments
from inkpipe.pipeline.volume import BlockCache, ChunkReader, Normalizer

BLOCK_4 = 4 * 64 * 64 * 2  # bytes of a 4-layer block of the tiny store (64 px chunks)


def test_block_cache_crops_equal_direct_reads_and_stay_bounded(tiny_store):
    frag = open_fragments(tiny_store, ["1"])[0]
    layers = LayerRange(2, 9)
    full = frag.volume[2:9]
    cache = BlockCache([frag.volume], layers, budget_mb=0.2)
    rng = np.random.default_rng(0)
    for _ in range(60):
        y, x = int(rng.integers(0, 96)), int(rng.integers(0, 80))
        crop = cache.read(0, y, x, 32)
        expect = np.zeros((7, 32, 32), np.uint16)
        part = full[:, y : y + 32, x : x + 32]
        expect[:, : part.shape[1], : part.shape[2]] = part
        np.testing.assert_array_equal(crop, expect)
        assert cache.nbytes <= max(0.2 * 2**20, 4 * 7 * 64 * 64 * 2)
    assert cache.hits > 0


def test_read_many_reads_ahead_equal_to_read_and_releases_blocks(tiny_store):
    frags = open_fragments(tiny_store, ["1", "2"])
    layers = LayerRange(1, 10)
    rng = np.random.default_rng(2)
    shapes = [fr.meta.shape[1:] for fr in frags]
    crops = [
        (int(f), int(rng.integers(0, shapes[f][0])), int(rng.integers(0, shapes[f][1])))
        for f in rng.integers(0, 2, 80)
    ]
    plain = BlockCache([fr.volume for fr in frags], layers, budget_mb=0.3)
    ahead = BlockCache([fr.volume for fr in frags], layers, budget_mb=0.3)
    got = list(ahead.read_many(crops, 40))
    assert len(got) == len(crops)
    for crop, key in zip(got, crops):
        np.testing.assert_array_equal(crop, plain.read(*key, 40))
    big_plain = BlockCache([fr.volume for fr in frags], layers, budget_mb=64)
    big_ahead = BlockCache([fr.volume for fr in frags], layers, budget_mb=64)
    for key in crops:
        big_plain.read(*key, 40)
    assert len(list(big_ahead.read_many(crops, 40))) == len(crops)
    assert big_ahead.misses == big_plain.misses == len(big_plain.blocks)  # each block once
    assert not ahead.store.pins and not ahead.store.loading  # nothing pinned or in flight
    assert ahead.nbytes <= 0.3 * 2**20
    # a reader stopped early releases its pins too
    it = ahead.read_many(crops, 40)
    next(it)
    time.sleep(0.3)  # the helper, at its read-ahead limit, now waits for the reader
    it.close()  # must wake it
    assert not ahead.store.pins and not ahead.store.loading  # and the helper has stopped


def test_evicted_memory_is_decoded_into_again_never_given_back(tiny_store, monkeypatch):
    frags = open_fragments(tiny_store, ["1", "2"])
    fresh = []
    read_block = ChunkReader.read_block

    def spy(self, zs, by, bx, out=None):
        fresh.append(out is None)
        return read_block(self, zs, by, bx, out)

    monkeypatch.setattr(ChunkReader, "read_block", spy)
    block = 12 * 64 * 64 * 2
    cache = BlockCache([fr.volume for fr in frags], LayerRange(0, 12), budget_mb=5 * block / 2**20)
    rng = np.random.default_rng(4)
    crops = [
        (int(f), int(rng.integers(0, 70)), int(rng.integers(0, 80))) for f in rng.integers(0, 2, 60)
    ]
    for _ in range(3):
        for i in range(0, len(crops), 8):
            list(cache.read_many(crops[i : i + 8], 40, then=crops[i + 8 : i + 16]))
    held = len(cache.blocks) + cache.store.spare_count
    assert cache.misses == len(fresh) > 3 * held  # blocks were decoded again and again...
    assert sum(fresh) == held  # ...into memory allocated once and still held
    assert held * block <= 1.25 * cache.budget + 4 * block  # the budget, read-ahead, one crop


def test_read_ahead_errors_reach_the_reader(tiny_store, tmp_path):
    store = tmp_path / "store.zarr"
    shutil.copytree(tiny_store, store)
    frag = open_fragments(store, ["1"])[0]
    chunk = store / "1" / "volume" / "c" / "0" / "1" / "0"
    chunk.write_bytes(b"not a blosc chunk")
    cache = BlockCache([frag.volume], LayerRange(0, 4), budget_mb=1)
    crops = [(0, 0, 0), (0, 70, 0), (0, 0, 40)]
    got = cache.read_many(crops, 32)
    next(got)  # the crops before the damaged chunk are fine
    with pytest.raises(StoreError, match=r"c/0/1/0 is damaged.*fragment '1'.*--overwrite"):
        next(got)
    with pytest.raises(StoreError):
        cache.read(0, 70, 0, 32)
    assert not cache.store.loading


def test_read_many_transforms_each_crop_in_order(tiny_store):
    frag = open_fragments(tiny_store, ["1"])[0]
    layers = LayerRange(1, 10)
    norm = Normalizer(frag.layer_stats()[1:10])
    crops = [(0, y, x) for y in range(0, 96, 8) for x in range(0, 80, 8)]
    seen = []

    def transform(f, crop):
        seen.append(f)
        return f, norm(crop)

    cache = BlockCache([frag.volume], layers, budget_mb=0.1)
    got = list(cache.read_many(crops, 24, transform=transform))
    assert len(got) == len(seen) == len(crops)
    for (f, image), (_, y, x) in zip(got, crops):
        raw = np.zeros((9, 24, 24), np.uint16)  # zeros past the edge, normalised like the rest
        part = frag.volume[1:10, y : y + 24, x : x + 24]
        raw[:, : part.shape[1], : part.shape[2]] = part
        assert f == 0 and image.dtype == np.float32
        np.testing.assert_array_equal(image, norm(raw))


def test_read_many_raises_a_transform_error_at_its_crop(tiny_store):
    frag = open_fragments(tiny_store, ["1"])[0]
    crops = [(0, y, 0) for y in range(0, 96, 8)]

    def transform(f, crop):
        if crop.sum() == bad_sum:
            raise ValueError("bad crop")
        return crop

    cache = BlockCache([frag.volume], LayerRange(0, 4), budget_mb=1)
    bad_sum = cache.read(0, 40, 0, 24).sum()  # crop 5
    got = cache.read_many(crops, 24, transform=transform)
    assert len([next(got) for _ in range(5)]) == 5
    with pytest.raises(ValueError, match="bad crop"):
        next(got)
    assert not cache.store.pins and not cache.store.loading


def test_read_batch_is_read_many_and_decodes_the_read_ahead_crops(tiny_store):
    frags = open_fragments(tiny_store, ["1", "2"])
    layers = LayerRange(0, 8)
    crops = [(0, 0, 0), (1, 10, 20), (0, 40, 40)]
    coming = [(1, 40, 60), (0, 64, 0)]
    named = BlockCache([fr.volume for fr in frags], layers, budget_mb=8)
    positional = BlockCache([fr.volume for fr in frags], layers, budget_mb=8)
    got = list(named.read_batch(crops, 32, read_ahead=coming))
    again = list(positional.read_many(crops, 32, coming))
    for a, b, key in zip(got, again, crops):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, named.read(*key, 32))
    for cache in (named, positional):
        cache.scheduler._pool.submit(lambda: None).result()  # the one helper has finished
        ahead = {k for f, y, x in coming for k in cache.keys_of(f, y, x, 32)}
        assert ahead <= set(cache.blocks)  # decoded ahead, unpinned
        assert not cache.store.pins and not cache.store.loading


def _tiny_store_blocks(tiny_store, budget_blocks):
    frag = open_fragments(tiny_store, ["1"])[0]  # 96 x 80 px: 2 x 2 blocks of 64 px
    return BlockStore([ChunkReader(frag.volume)], LayerRange(0, 4), budget_blocks * BLOCK_4)


def test_block_store_keeps_pinned_blocks_over_budget_and_trims_when_unpinned(tiny_store):
    store = _tiny_store_blocks(tiny_store, budget_blocks=2)
    keys = [(0, 0, 0), (0, 0, 1), (0, 1, 0)]
    assert store.keys_of(0, 0, 0, 96) == keys + [(0, 1, 1)]
    assert store.block_bytes(keys[0]) == BLOCK_4
    store.pin(keys)
    store.ensure_present(keys)
    assert list(store.blocks) == keys and store.nbytes == 3 * BLOCK_4  # pinned: over budget
    assert store.misses == 3 and store.hits == 0 and not store.loading
    store.ensure_present(keys[:1])  # a use moves the block to the most recent end
    assert list(store.blocks) == keys[1:] + keys[:1] and store.hits == 1
    store.unpin(keys)
    assert not store.pins and store.nbytes == 2 * BLOCK_4  # back within the budget
    assert list(store.blocks) == [keys[2], keys[0]] and store.spare_count == 1  # LRU evicted
    store.pin([(0, 1, 1)])
    store.ensure_present([(0, 1, 1)])  # makes room, and decodes into the kept memory
    store.unpin([(0, 1, 1)])
    assert store.spare_count == 1 and store.nbytes == 2 * BLOCK_4 and store.misses == 4
    assert list(store.blocks) == [keys[0], (0, 1, 1)]


def test_block_store_claims_a_block_once_and_settles_its_future(tiny_store):
    store = _tiny_store_blocks(tiny_store, budget_blocks=4)
    key = (0, 1, 1)
    with store.lock:
        assert store.claim_if_absent(key)
        assert not store.claim_if_absent(key)  # already being decoded
    future = store.loading[key]
    store.load(key)
    assert future.done() and future.result() is None
    assert key in store.blocks and not store.loading
    with store.lock:
        assert not store.claim_if_absent(key)  # present
    crop = store.read_crop(0, 64, 64, 32)  # the corner block: 32 x 16 px of it in the volume
    volume = store.readers[0].volume
    assert crop.shape == (4, 32, 32) and not crop[:, :, 16:].any()
    np.testing.assert_array_equal(crop[:, :, :16], volume[0:4, 64:96, 64:80])
    assert store.hits == 1 and store.misses == 1 and not store.pins


def test_block_store_starts_afresh_in_a_forked_child(tiny_store, monkeypatch):
    store = _tiny_store_blocks(tiny_store, budget_blocks=4)
    assert not store.reset_if_forked()
    store.read_crop(0, 0, 0, 32)
    store.pin([(0, 0, 0)])
    with store.lock:
        store.claim_if_absent((0, 1, 0))  # in flight in the parent: never settled in a child
    lock = store.lock
    child = os.getpid() + 1
    monkeypatch.setattr(os, "getpid", lambda: child)
    assert store.reset_if_forked()
    assert store.lock is not lock and not store.pins and not store.loading
    assert list(store.blocks) == [(0, 0, 0)]  # decoded blocks stay valid
    assert not store.reset_if_forked()  # once
