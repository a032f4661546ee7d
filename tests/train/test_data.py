import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from inkpipe.pipeline.errors import ConfigError
from inkpipe.pipeline.layers import LayerRange
from inkpipe.pipeline.store import open_fragments
from inkpipe.pipeline.volume import BlockCache, Normalizer, VolumeView
from inkpipe.train.augment import build_augment
from inkpipe.train.data import (
    CropDataset,
    WindowSampler,
    WindowSet,
    interleave_batches,
    order_by_region,
)


def make_sets(n_frag=2, h=2000, w=1500, step=56):
    sets = []
    for f in range(n_frag):
        ys, xs = np.meshgrid(
            np.arange(0, h - 224, step), np.arange(0, w - 224, step), indexing="ij"
        )
        ink = ((ys + xs) % 3 == 0).astype(np.int32) * 50
        win = np.column_stack([ys.ravel(), xs.ravel(), np.full(ys.size, 9000), ink.ravel()])
        sets.append(WindowSet(f, (h, w), win.astype(np.int32)))
    return sets


def test_sampler_is_seeded_mixed_and_inside():
    sets = make_sets()
    s = WindowSampler(sets, 224, 400, batch_size=8, pos_fraction=0.25, jitter_px=30, seed=3)
    a, b = (
        s.draw(0),
        WindowSampler(sets, 224, 400, 8, pos_fraction=0.25, jitter_px=30, seed=3).draw(0),
    )
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, s.draw(1))
    assert len(a) == 400
    assert a[:, 1].min() >= 0 and a[:, 1].max() <= 2000 - 224
    assert a[:, 2].min() >= 0 and a[:, 2].max() <= 1500 - 224
    # the positive share: crops near (within jitter of) a positive window origin
    no_jitter = WindowSampler(sets, 224, 4000, 8, pos_fraction=0.25, jitter_px=0, seed=1).draw(0)
    positive = ((no_jitter[:, 1] + no_jitter[:, 2]) % 3 == 0).mean()
    assert 0.2 < positive < 0.3


def test_region_order_keeps_crops_local_and_is_a_permutation():
    rng = np.random.default_rng(0)
    crops = np.column_stack(
        [rng.integers(0, 2, 500), rng.integers(0, 4000, 500), rng.integers(0, 4000, 500)]
    ).astype(np.int64)
    streams = order_by_region(crops, 1024, 2, rng)
    joined = np.concatenate(streams)
    assert sorted(map(tuple, joined)) == sorted(map(tuple, crops))
    for s in streams:  # each region appears as one contiguous run
        keys = s[:, 0] * 100 + (s[:, 1] // 1024) * 10 + s[:, 2] // 1024
        runs = keys[np.r_[True, keys[1:] != keys[:-1]]]
        assert len(runs) == len(set(runs))
    laid = interleave_batches(streams, 8)
    assert len(laid) == 500
    first = laid[:8]
    assert all(tuple(r) in set(map(tuple, streams[0])) for r in first)


def test_ddp_ranks_split_the_epoch():
    sets = make_sets()
    full = WindowSampler(sets, 224, 96, batch_size=8, seed=0)
    ranks = [list(WindowSampler(sets, 224, 96, 8, seed=0, rank=r, world_size=2)) for r in (0, 1)]
    assert [len(r) for r in ranks] == [48, 48]
    assert sorted(ranks[0] + ranks[1]) == sorted(map(tuple, full.draw(0).tolist()))
    assert len(WindowSampler(sets, 224, 90, 8, rank=1, world_size=2)) == len(
        list(WindowSampler(sets, 224, 90, 8, rank=1, world_size=2))
    )


def test_sampler_rejects_bad_fraction():
    with pytest.raises(ConfigError):
        WindowSampler(make_sets(), 224, 10, 2, pos_fraction=1.5)


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


def test_volume_view_normalises_like_the_normalizer(tiny_store):
    frag = open_fragments(tiny_store, ["2"])[0]
    layers = LayerRange(0, 12)
    norm = Normalizer(frag.layer_stats())
    view = VolumeView(frag.volume, layers, norm)
    assert view.shape == (12, 70, 100)
    np.testing.assert_allclose(view[:, 10:40, 50:100], norm(frag.volume[:, 10:40, 50:100]))
    out = norm(frag.volume[...])
    inside = frag.mask().astype(bool)
    assert abs(float(out[:, inside].mean())) < 0.1 and 0.8 < float(out[:, inside].std()) < 1.2


def test_dataset_items_and_loader_workers(tiny_store):
    frags = open_fragments(tiny_store, ["1", "2"])
    layers = LayerRange(1, 5)
    ds = CropDataset(frags, layers, 32, augment=None)
    item = ds[(1, 10, 20)]
    assert item["image"].shape == (4, 32, 32) and item["image"].dtype == torch.float32
    np.testing.assert_allclose(
        item["image"].numpy(), ds.normalizers[1](frags[1].volume[1:5, 10:42, 20:52])
    )
    np.testing.assert_array_equal(
        item["label"][0].numpy(), frags[1].labels()[10:42, 20:52] & frags[1].mask()[10:42, 20:52]
    )
    np.testing.assert_array_equal(item["valid"][0].numpy(), frags[1].mask()[10:42, 20:52])
    assert pickle.loads(pickle.dumps(ds))._cache is None
    sets = [WindowSet(i, f.meta.shape[1:], f.windows()) for i, f in enumerate(frags)]
    sampler = WindowSampler(sets, 32, 16, batch_size=4, num_workers=2, seed=0)
    aug = CropDataset(frags, layers, 32, augment=build_augment("full", 32, seed=0))
    batches = list(DataLoader(aug, batch_size=4, sampler=sampler, num_workers=2))
    assert len(batches) == 4 and batches[0]["image"].shape == (4, 4, 32, 32)
    origins = torch.cat([b["origin"] for b in batches]).numpy()
    np.testing.assert_array_equal(origins, sampler.draw(0))
    for b in batches:  # labels never outside the valid area, even after augmentation
        assert torch.all(b["label"] <= b["valid"])


def test_dataset_checks_layers(tiny_store):
    with pytest.raises(ConfigError, match="has 12 layers"):
        CropDataset(open_fragments(tiny_store, ["1"]), LayerRange(5, 20), 32)
