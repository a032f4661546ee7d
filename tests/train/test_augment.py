from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from inkpipe.pipeline.errors import ConfigError
from inkpipe.train.augment import AugLevel, Augment, build_augment, reseed

RNG = np.random.default_rng(0)


def _blocky_mask(side: int = 64, block: int = 8) -> np.ndarray:
    """A random 0/1 mask made of block x block squares (smooth, so resampling barely moves it)."""
    cells = (RNG.random((side // block, side // block)) > 0.5).astype(np.uint8)
    return np.kron(cells, np.ones((block, block), np.uint8))


def _image_with_mask_in_channel_0(k: int, mask: np.ndarray) -> np.ndarray:
    image = RNG.normal(size=(k, *mask.shape)).astype(np.float32)
    image[0] = mask
    return image


# The eight poses of the square: what flips and 90-degree rotations can produce.
POSES = {
    "id": lambda a: a,
    "h": lambda a: a[:, ::-1],
    "v": lambda a: a[::-1],
    "hv": lambda a: a[::-1, ::-1],
    "t": lambda a: a.T,
    "th": lambda a: a.T[:, ::-1],
    "tv": lambda a: a.T[::-1],
    "thv": lambda a: a.T[::-1, ::-1],
}


def _pose(out: np.ndarray, src: np.ndarray) -> str:
    return next(name for name, f in POSES.items() if np.array_equal(out, f(src)))


@pytest.mark.parametrize("level", list(AugLevel))
@pytest.mark.parametrize("k", [1, 10, 65])
@pytest.mark.parametrize("mask_dtype", [np.uint8, np.float32])
def test_shapes_and_dtypes_are_kept(level: str, k: int, mask_dtype: type) -> None:
    augment = build_augment(level, tile_px=64, seed=0)
    mask = _blocky_mask().astype(mask_dtype)
    for _ in range(3):
        image, out_mask = augment(_image_with_mask_in_channel_0(k, mask), mask)
        assert image.shape == (k, 64, 64) and image.dtype == np.float32
        assert out_mask.shape == (64, 64) and out_mask.dtype == np.float32
        assert image.flags.c_contiguous and out_mask.flags.c_contiguous
        assert set(np.unique(out_mask)) <= {0.0, 1.0}  # nearest: no new mask values


def test_none_is_identity() -> None:
    augment = build_augment("none")
    image = RNG.normal(size=(10, 32, 32)).astype(np.float32)
    mask = _blocky_mask(32)
    out_image, out_mask = augment(image, mask)
    np.testing.assert_array_equal(out_image, image)
    np.testing.assert_array_equal(out_mask, mask.astype(np.float32))
    assert out_image is not image
    assert out_mask.dtype == np.float32


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_light_moves_image_and_mask_together(seed: int) -> None:
    augment = build_augment("light", tile_px=64, seed=seed)
    mask = _blocky_mask()
    image = _image_with_mask_in_channel_0(10, mask)
    image[1] = np.arange(64 * 64, dtype=np.float32).reshape(64, 64)  # every pixel distinct
    for _ in range(10):
        out_image, out_mask = augment(image, mask)
        np.testing.assert_array_equal(out_image[0], out_mask)
        # the same pose for every channel
        pose = _pose(out_image[1], image[1])
        np.testing.assert_array_equal(out_image[2], POSES[pose](image[2]))


def test_light_reaches_all_eight_poses() -> None:
    # albumentations' Compose(seed=s) seeds every transform alike, so two p=0.5 flips
    # always agree and only half the poses appear; the shared generator must avoid that.
    augment = build_augment("light", tile_px=8, seed=0)
    src = np.arange(64, dtype=np.float32).reshape(8, 8)
    seen = {_pose(augment(src[None], np.zeros((8, 8), np.uint8))[0][0], src) for _ in range(200)}
    assert seen == set(POSES)


def test_full_moves_image_and_mask_together() -> None:
    augment = build_augment("full", tile_px=64, seed=0)
    agreement = []
    for _ in range(30):
        mask = _blocky_mask()
        out_image, out_mask = augment(_image_with_mask_in_channel_0(3, mask), mask)
        # brightness/contrast keep 0 below 0.4 and 1 above 0.6; holes are 0 in both
        agreement.append(np.mean((out_image[0] > 0.4) == (out_mask > 0.5)))
    assert min(agreement) > 0.9
    assert np.mean(agreement) > 0.97


def test_coarse_dropout_cuts_holes() -> None:
    augment = build_augment("full", tile_px=64, seed=0)
    image = np.full((5, 64, 64), 5.0, np.float32)
    mask = np.ones((64, 64), np.uint8)
    draws_with_holes = 0
    for _ in range(40):
        out_image, out_mask = augment(image, mask)
        holes = out_image[0] == 0.0
        if holes.any():
            draws_with_holes += 1
            assert (out_image[:, holes] == 0.0).all()  # a hole goes through every layer
            assert (out_mask[holes] == 0.0).all() and (out_mask[~holes] == 1.0).all()
            assert holes.sum() >= 6 * 6  # at least one hole of tile_px // 10 a side
    assert 5 <= draws_with_holes <= 35  # p = 0.5


def test_brightness_contrast_does_not_clip_normalised_images() -> None:
    # albumentations' RandomBrightnessContrast would clip float images to [0, 1].
    augment = build_augment("full", tile_px=64, seed=0)
    image = RNG.normal(size=(4, 64, 64)).astype(np.float32)
    mask = np.zeros((64, 64), np.uint8)
    means, stds = [], []
    for _ in range(30):
        out, _ = augment(image, mask)
        assert out.min() < -2 and out.max() > 2
        means.append(out.mean())
        stds.append(out.std())
    assert np.ptp(means) > 0.05  # brightness moved
    assert np.ptp(stds) > 0.05  # contrast moved
    assert max(abs(m) for m in means) < 0.5


def test_seeded_augment_is_reproducible() -> None:
    image = RNG.normal(size=(10, 64, 64)).astype(np.float32)
    mask = _blocky_mask()
    a, b, c = (build_augment("full", 64, seed=s) for s in (7, 7, 8))
    outs_a = [a(image, mask) for _ in range(8)]
    outs_b = [b(image, mask) for _ in range(8)]
    outs_c = [c(image, mask) for _ in range(8)]
    for (ia, ma), (ib, mb) in zip(outs_a, outs_b, strict=True):
        np.testing.assert_array_equal(ia, ib)
        np.testing.assert_array_equal(ma, mb)
    assert any(not np.array_equal(ia, ic) for (ia, _), (ic, _) in zip(outs_a, outs_c, strict=True))
    reseed(a, 7)
    np.testing.assert_array_equal(a(image, mask)[0], outs_a[0][0])


def test_augment_pickles_with_its_state() -> None:
    image = RNG.normal(size=(3, 32, 32)).astype(np.float32)
    mask = _blocky_mask(32)
    augment = build_augment("full", 32, seed=3)
    augment(image, mask)
    copy = pickle.loads(pickle.dumps(augment))
    assert isinstance(copy, Augment)
    for _ in range(5):
        np.testing.assert_array_equal(augment(image, mask)[0], copy(image, mask)[0])


class _PoseDataset(Dataset):
    def __init__(self) -> None:
        self.augment = build_augment("light", tile_px=8, seed=5)
        self.src = np.arange(64, dtype=np.float32).reshape(1, 8, 8)

    def __len__(self) -> int:
        return 16

    def __getitem__(self, i: int) -> str:
        out, _ = self.augment(self.src, np.zeros((8, 8), np.uint8))
        return _pose(out[0], self.src[0])


def _poses_from_workers(seed: int) -> list[str]:
    loader = DataLoader(
        _PoseDataset(),
        batch_size=None,
        num_workers=2,
        generator=torch.Generator().manual_seed(seed),
    )
    return list(loader)


def test_workers_get_different_reproducible_streams() -> None:
    first = _poses_from_workers(0)
    # items alternate between the two workers; copies of one generator would repeat
    assert first[0::2] != first[1::2]
    assert _poses_from_workers(0) == first
    assert _poses_from_workers(1) != first


@pytest.mark.parametrize(("level", "match"), [("ful", "did you mean 'full'"), ("heavy", "none")])
def test_unknown_level(level: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        build_augment(level)


def test_bad_inputs() -> None:
    with pytest.raises(ConfigError, match=r"^tile_px must be an integer >= 1, got 0$"):
        build_augment("light", tile_px=0)
    augment = build_augment("light")
    assert augment.level is AugLevel.LIGHT and repr(augment) == "Augment(level='light', seed=None)"
    with pytest.raises(ValueError, match="same H, W"):
        augment(np.zeros((2, 8, 8), np.float32), np.zeros((8, 9), np.uint8))
    with pytest.raises(ValueError, match=r"\(k, H, W\)"):
        augment(np.zeros((8, 8), np.float32), np.zeros((8, 8), np.uint8))
