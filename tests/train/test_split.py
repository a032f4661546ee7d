"""Held-out validation regions: picked on the papyrus, excluded from training, read in place."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import zarr

from inkpipe.pipeline.errors import ConfigError
from inkpipe.pipeline.layers import LayerRange
from inkpipe.pipeline.store import Fragment, open_fragments
from inkpipe.pipeline.volume import Normalizer, RegionView, VolumeView
from inkpipe.pipeline.windows import INK_PX, X0, Y0, index_windows
from inkpipe.train.config import TrainConfig, Validation, parse_validation
from inkpipe.train.data import CropDataset, WindowSet
from inkpipe.train.split import (
    exclude_blocks,
    pick_regions,
    plan_run,
    region_crops,
)


@dataclass
class FakeFragment:
    """What the region helpers read of a fragment: its mask and labels, (H, W) uint8."""

    mask_px: np.ndarray
    labels_px: np.ndarray

    def mask(self) -> np.ndarray:
        return self.mask_px

    def labels(self) -> np.ndarray:
        return self.labels_px


def fragment(seed: int, h: int = 900, w: int = 700) -> tuple[FakeFragment, WindowSet]:
    rng = np.random.default_rng(seed)
    mask = np.zeros((h, w), np.uint8)
    mask[40 : h - 30, 20 : w - 50] = 1
    labels = np.zeros((h, w), np.uint8)
    for _ in range(12):  # ink strokes
        y, x = rng.integers(0, h - 60), rng.integers(0, w - 60)
        labels[y : y + 20, x : x + 60] = 1
    labels &= mask
    return FakeFragment(mask, labels), WindowSet(
        0, (h, w), index_windows(mask, labels, 64, 32, 0.1)
    )


def test_regions_cover_the_fraction_and_no_training_crop_reaches_them():
    frags, sets = [], []
    for i in range(2):
        f, s = fragment(i)
        frags.append(f)
        sets.append(WindowSet(i, s.shape, s.windows))
    blocks = pick_regions(frags, sets, 0.15, 256, 64, 32, np.random.default_rng(0))
    assert blocks.shape[1] == 5 and set(blocks[:, 0]) == {0, 1}
    kept = exclude_blocks(sets, blocks, 64, 32)
    for f, s, k in zip(frags, sets, kept, strict=True):
        mine = blocks[blocks[:, 0] == s.fragment]
        held = sum(int(f.mask()[y : y + h, x : x + w].sum()) for _, y, x, h, w in mine)
        assert held >= 0.15 * f.mask().sum()
        assert len(k.windows) >= len(s.windows) / 2 and (k.windows[:, INK_PX] > 0).any()
        # the first block of a fragment holds ink, so validation always scores some ink
        _, y, x, h, w = mine[0]
        assert f.labels()[y : y + h, x : x + w].any()
        # brute force: no pixel a jittered training crop can cover lies in a held-out block
        covered = np.zeros(f.mask().shape, bool)
        for wy, wx in k.windows[:, [Y0, X0]]:
            covered[max(0, wy - 32) : wy + 64 + 32, max(0, wx - 32) : wx + 64 + 32] = True
        for _, y, x, h, w in mine:
            assert not covered[y : y + h, x : x + w].any()
    regions = region_crops(frags, blocks, 32)
    for r, (fi, y, x, h, w) in zip(regions, blocks, strict=True):
        assert r.valid.shape == r.truth.shape
        assert r.valid.sum() == frags[fi].mask()[y : y + h, x : x + w].sum()
        assert (
            r.truth[r.valid]
            == (
                frags[fi].labels()[y : y + h, x : x + w][frags[fi].mask()[y : y + h, x : x + w] > 0]
                > 0
            )
        ).all()


def test_a_fragment_too_small_for_regions_holds_none_out():
    f, s = fragment(0, 300, 300)
    assert len(pick_regions([f], [s], 0.15, 256, 64, 32, np.random.default_rng(0))) == 0


def test_small_stores_fall_back_to_patches(tiny_store):
    cfg = TrainConfig(store=tiny_store, out=Path("unused"), layers=LayerRange(0, 4), tile_px=32)
    assert cfg.val.kind == "regions"
    plan = plan_run(cfg)
    assert not plan.val_regions and len(plan.val_windows) > 0


def test_parse_regions():
    assert parse_validation("regions") == Validation("regions", fraction=0.15)
    assert parse_validation("regions:0.3") == Validation("regions", fraction=0.3)
    assert str(parse_validation("regions:0.3")) == "regions:0.3"
    for bad in ("regions:0", "regions:0.7", "regions:x"):
        with pytest.raises(ConfigError, match="regions"):
            parse_validation(bad)


def test_region_view_reads_what_the_volume_view_reads(tmp_path):
    data = np.random.default_rng(0).integers(0, 65535, (6, 300, 260), dtype=np.uint16)
    arr = zarr.create_array(
        tmp_path / "v.zarr", shape=data.shape, chunks=(6, 64, 64), dtype="uint16"
    )
    arr[:] = data
    layers = LayerRange(1, 5)
    stats = np.tile([30000.0, 10000.0, 0.0, 65535.0], (4, 1))
    view = VolumeView(arr, layers, Normalizer(stats))
    region = RegionView(view, 40, 30, 200, 150)
    assert region.shape == (4, 200, 150)
    np.testing.assert_array_equal(region[:, 10:74, 5:69], view[:, 50:114, 35:99])
    got = region.read_windows(np.array([[0, 0], [136, 86]]), 64)
    np.testing.assert_array_equal(got[1], view[:, 176:240, 116:180])
    with pytest.raises(Exception, match="outside the view"):
        RegionView(view, 200, 0, 200, 10)


def test_mask_and_labels_are_read_once_per_fragment(tiny_store, monkeypatch):
    reads: Counter[tuple[str, str]] = Counter()
    for name in ("mask", "labels"):
        read = getattr(Fragment, name)

        def counted(self: Fragment, read=read, name=name) -> np.ndarray | None:
            reads[self.id, name] += 1
            return read(self)

        monkeypatch.setattr(Fragment, name, counted)
    # a tile the store was not indexed with: windows are derived from the mask and labels
    cfg = TrainConfig(store=tiny_store, out=Path("unused"), layers=LayerRange(0, 4), tile_px=16)
    assert open_fragments(tiny_store)[0].settings.tile_px != 16
    plan = plan_run(cfg)
    dataset = CropDataset(plan.fragments, cfg.layers, plan.tile_px)
    for f in plan.fragments:  # fragment validation reads them again each epoch
        f.mask(), f.labels()
    assert reads == {(f.id, name): 1 for f in plan.fragments for name in ("mask", "labels")}
    assert dataset.masks[0] is plan.fragments[0].mask()
    with pytest.raises(ValueError, match="read-only"):
        dataset.labels[0][0, 0] = 1
