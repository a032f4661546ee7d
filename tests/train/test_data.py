import pickle
import time
from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from inkpipe.pipeline.errors import ConfigError, InvalidInputError
from inkpipe.pipeline.layers import LayerRange
from inkpipe.pipeline.store import open_fragments
from inkpipe.pipeline.volume import Normalizer, NormMode, VolumeView, normalizer_for, pooled_stats
from inkpipe.train.augment import build_augment
from inkpipe.train.data import (
    CropBatch,
    CropDataset,
    WindowSampler,
    WindowSet,
    interleave_batches,
    order_by_region,
    sweep,
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


def _region_runs(seq, region):
    """Region keys of a (n, 3) crop sequence, one entry per contiguous run."""
    keys = (seq[:, 1] // region) * 1000 + seq[:, 2] // region
    return keys[np.r_[True, keys[1:] != keys[:-1]]]


def test_region_order_sweeps_each_fragment_and_is_a_permutation():
    rng = np.random.default_rng(0)
    crops = np.column_stack(
        [rng.integers(0, 2, 3000), rng.integers(0, 4000, 3000), rng.integers(0, 3000, 3000)]
    ).astype(np.int64)
    streams = order_by_region(crops, 512, 2, rng)
    joined = np.concatenate(streams)
    assert sorted(map(tuple, joined)) == sorted(map(tuple, crops))
    for s in streams:
        frags = s[:, 0]
        assert 0.3 < frags[: len(s) // 4].mean() < 0.7  # fragments are mixed all along
        for f in (0, 1):
            runs = _region_runs(s[frags == f], 512)
            assert len(runs) == len(set(runs))  # each region is visited once, in one run
            ry, rx = runs // 1000, runs % 1000
            step = np.maximum(abs(np.diff(ry)), abs(np.diff(rx)))
            assert step.max() == 1  # the next region is always a neighbour: a sweep
    # the two streams sweep different halves of each fragment
    for f in (0, 1):
        a, b = (set(map(tuple, s[s[:, 0] == f, 1:] // 512)) for s in streams)
        assert len(a & b) <= 2
    laid = interleave_batches(streams, 8)
    assert len(laid) == 3000
    first = laid[:8]
    assert all(tuple(r) in set(map(tuple, streams[0])) for r in first)


def _lru_misses(crops, capacity, block=512, tile=224):
    lru, misses = OrderedDict(), 0
    for f, y, x in crops:
        for by in range(y // block, (y + tile - 1) // block + 1):
            for bx in range(x // block, (x + tile - 1) // block + 1):
                if (f, by, bx) in lru:
                    lru.move_to_end((f, by, bx))
                    continue
                misses += 1
                lru[(f, by, bx)] = True
                if len(lru) > capacity:
                    lru.popitem(last=False)
    return misses


def test_sweep_decodes_each_block_once_with_three_rows_cached():
    rng = np.random.default_rng(1)
    crops = np.column_stack(
        [np.zeros(2000), rng.integers(0, 6000, 2000), rng.integers(0, 4000, 2000)]
    ).astype(np.int64)
    distinct = _lru_misses(crops, capacity=10**6)
    row = 4000 // 512 + 2  # blocks across the shorter side, crops reach into the next one
    assert _lru_misses(sweep(crops, 512, rng), capacity=3 * row) == distinct
    # random order (what a plain shuffle does) decodes blocks many times over
    assert _lru_misses(crops[rng.permutation(2000)], capacity=3 * row) > 3 * distinct


def test_ddp_ranks_split_the_epoch():
    sets = make_sets()
    full = WindowSampler(sets, 224, 96, batch_size=8, seed=0)
    ranks = [
        [
            key
            for batch in WindowSampler(sets, 224, 96, 8, seed=0, rank=r, world_size=2)
            for key in batch
        ]
        for r in (0, 1)
    ]
    assert [len(r) for r in ranks] == [48, 48]
    assert sorted(ranks[0] + ranks[1]) == sorted(map(tuple, full.draw(0).tolist()))
    assert len(WindowSampler(sets, 224, 90, 8, rank=1, world_size=2)) == len(
        list(WindowSampler(sets, 224, 90, 8, rank=1, world_size=2))
    )


def test_sampler_rejects_bad_fraction():
    with pytest.raises(ConfigError):
        WindowSampler(make_sets(), 224, 10, 2, pos_fraction=1.5)


def test_normalizer_clips_then_standardises():
    stats = np.array([[1000.0, 200.0, 700.0, 1500.0], [50.0, 0.5, 0.0, 100.0]])
    crop = np.array([[[0, 700, 1000, 1400, 60000]], [[0, 50, 51, 100, 101]]], np.uint16)
    x = crop.astype(np.float64)
    lo, hi = stats[:, 2, None, None], stats[:, 3, None, None]
    expect = (np.clip(x, lo, hi) - stats[:, 0, None, None]) / np.maximum(stats[:, 1, None, None], 1)
    out = Normalizer(stats)(crop)
    assert out.dtype == np.float32 and out.shape == crop.shape
    np.testing.assert_allclose(out, expect, rtol=1e-6, atol=1e-5)


def test_pooled_stats_are_those_of_all_layers_together():
    rng = np.random.default_rng(0)
    layers = [rng.normal(m, s, 4000) for m, s in ((100.0, 5.0), (300.0, 20.0), (200.0, 1.0))]
    stats = np.array(
        [[v.mean(), v.std(), np.quantile(v, 0.01), np.quantile(v, 0.99)] for v in layers]
    )
    stats = np.vstack([stats, np.full(4, np.nan)])  # a layer without statistics is left out
    pooled = pooled_stats(stats)
    every = np.concatenate(layers)
    np.testing.assert_allclose(pooled[:2], [every.mean(), every.std()], rtol=1e-9)
    assert pooled[2] == stats[:3, 2].min() and pooled[3] == stats[:3, 3].max()
    with pytest.raises(InvalidInputError, match="NaN"):
        pooled_stats(np.full((2, 4), np.nan))


def test_fragment_normalisation_keeps_the_depth_profile():
    # two fragments: the same column of values, the surface one layer deeper in the second
    profile = np.array([100, 100, 400, 420, 410, 405], np.float64)
    deeper = np.concatenate([[100.0], profile[:-1]])
    outs = {}
    for mode in NormMode:
        got = []
        for col in (profile, deeper):
            stats = np.column_stack([col, np.full(6, 10.0), col - 50, col + 50])
            crop = col[1:5, None, None].astype(np.uint16)
            got.append(normalizer_for(stats, LayerRange(1, 5), mode)(crop)[:, 0, 0])
        outs[mode] = got
    # per fragment: one affine map for every layer, so layer differences keep their ratios
    for a in outs[NormMode.FRAGMENT]:
        assert np.ptp(a) > 1
    a, b = outs[NormMode.FRAGMENT]
    np.testing.assert_allclose(
        np.diff(a)[1:] / np.diff(a)[1], np.diff(profile[1:5])[1:] / 20, rtol=1e-5
    )
    # per layer: every layer is centred on its own mean, so the step to papyrus disappears
    for a in outs[NormMode.LAYER]:
        np.testing.assert_allclose(a, 0, atol=1e-6)
    with pytest.raises(ValueError):
        normalizer_for(np.zeros((6, 4)), LayerRange(1, 5), "bogus")


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
    before = aug.__getitems__([(0, 0, 0), (1, 5, 5)])  # the parent's read-ahead thread exists
    assert len(before) == 2 and before[1]["origin"].tolist() == [1, 5, 5]
    batches = list(DataLoader(aug, batch_sampler=sampler, num_workers=2))
    assert len(batches) == 4 and batches[0]["image"].shape == (4, 4, 32, 32)
    origins = torch.cat([b["origin"] for b in batches]).numpy()
    np.testing.assert_array_equal(origins, sampler.draw(0))
    for b in batches:  # labels never outside the valid area, even after augmentation
        assert torch.all(b["label"] <= b["valid"])


def test_dataset_checks_layers(tiny_store):
    with pytest.raises(ConfigError, match="has 12 layers"):
        CropDataset(open_fragments(tiny_store, ["1"]), LayerRange(5, 20), 32)


def test_sampler_batches_name_the_next_batch_of_the_same_worker():
    s = WindowSampler(make_sets(), 224, 64, batch_size=8, num_workers=2, seed=0)
    batches = list(s)
    assert len(batches) == len(s) == 8 and all(isinstance(b, CropBatch) for b in batches)
    keys = [key for batch in batches for key in batch]
    assert keys == list(map(tuple, s.draw(0).tolist()))  # plain (f, y0, x0) tuples
    for b, batch in enumerate(batches):
        expect = tuple(batches[b + 2]) if b + 2 < len(batches) else ()
        assert batch.read_ahead == expect
    copy = pickle.loads(pickle.dumps(batches[1]))
    assert copy == batches[1] and copy.read_ahead == batches[1].read_ahead


def test_dataset_reads_ahead_the_batch_the_sampler_names(tiny_store):
    frags = open_fragments(tiny_store, ["1", "2"])
    ds = CropDataset(frags, LayerRange(1, 5), 32, augment=None)
    batch = CropBatch([(0, 0, 0)])
    batch.read_ahead = ((1, 30, 60),)
    ds.batch(batch, augment=False)
    wanted = set(ds.cache.keys_of(1, 30, 60, 32))
    deadline = time.monotonic() + 10
    while not wanted <= set(ds.cache.blocks) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert wanted <= set(ds.cache.blocks)


def test_volume_view_reads_windows_in_batches_like_slicing(tiny_store):
    from inkpipe.numerics.blending import sliding_window_predict

    frag = open_fragments(tiny_store, ["2"])[0]
    view = VolumeView(frag.volume, LayerRange(2, 8), Normalizer(frag.layer_stats()[2:8]))
    origins = np.array([[0, 0], [30, 60], [38, 68]])
    got = view.read_windows(origins, 32, read_ahead=np.array([[10, 10]]))
    assert got.shape == (3, 6, 32, 32) and got.dtype == np.float32
    for window, (y, x) in zip(got, origins):
        np.testing.assert_array_equal(window, view[:, y : y + 32, x : x + 32])

    def predictor(batch):
        return batch.mean(axis=1)

    batched = sliding_window_predict(view, predictor, 32, 16, batch_size=3)
    plain = sliding_window_predict(np.asarray(view), predictor, 32, 16, batch_size=3)
    np.testing.assert_allclose(batched, plain, rtol=1e-6)
