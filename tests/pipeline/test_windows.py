import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from inkpipe.pipeline.errors import ConfigError
from inkpipe.pipeline.layers import LayerRange, parse_layers
from inkpipe.pipeline.windows import (
    INK_PX,
    MASK_PX,
    X0,
    Y0,
    grid_windows,
    holds_valid_pixel,
    index_windows,
    tile_starts,
    window_sums,
)


@given(st.integers(1, 700), st.integers(8, 128), st.data())
def test_tile_starts_cover_and_stay_inside(length, tile, data):
    stride = data.draw(st.integers(1, tile))
    starts = tile_starts(length, tile, stride)
    assert starts[0] == 0
    assert np.all(np.diff(starts) > 0)
    assert np.all(np.diff(starts) <= stride)
    if length >= tile:
        assert starts[-1] == length - tile  # last window ends exactly at the edge
        covered = np.zeros(length, bool)
        for s in starts:
            covered[s : s + tile] = True
        assert covered.all()
        expected = int(np.ceil((length - tile) / stride)) + 1
        assert len(starts) == expected
    else:
        assert list(starts) == [0]


def test_tile_starts_rejects_bad_stride():
    with pytest.raises(ConfigError, match="stride"):
        tile_starts(100, 32, 40)


@given(st.integers(1, 90), st.integers(1, 90), st.integers(8, 40), st.data())
def test_window_sums_match_direct_sum(h, w, tile, data):
    stride = data.draw(st.integers(1, tile))
    rng = np.random.default_rng(h * 100 + w)
    img = rng.integers(0, 2, (h, w)).astype(np.uint8)
    origins = grid_windows(h, w, tile, stride)
    sums = window_sums(img, origins, tile)
    direct = [img[y : y + tile, x : x + tile].sum() for y, x in origins]
    assert list(sums) == direct


@given(st.integers(1, 90), st.integers(1, 90), st.integers(8, 40), st.data())
def test_holds_valid_pixel_matches_any(h, w, tile, data):
    stride = data.draw(st.integers(1, tile))
    valid = np.random.default_rng(h * 100 + w).random((h, w)) > 0.995  # a few valid pixels
    origins = grid_windows(h, w, tile, stride)
    direct = [valid[y : y + tile, x : x + tile].any() for y, x in origins]
    assert holds_valid_pixel(valid, origins, tile).tolist() == direct


def test_index_windows_counts_and_coverage():
    mask = np.zeros((100, 100), np.uint8)
    mask[:50, :] = 1
    labels = np.zeros_like(mask)
    labels[0:10, 0:10] = 1
    labels[60:70, 60:70] = 1  # outside the mask: never counted
    w = index_windows(mask, labels, tile_px=20, stride_px=20, min_coverage=0.1)
    assert set(w[:, Y0]) == {0, 20, 40}  # the window at 40 is half papyrus, 60+ has none
    assert w[(w[:, Y0] == 0) & (w[:, X0] == 0), INK_PX].item() == 100
    assert w[:, INK_PX].sum() == 100
    assert np.all(w[w[:, Y0] == 40, MASK_PX] == 200)


def test_parse_layers():
    assert parse_layers("28:38") == LayerRange(28, 38)
    assert parse_layers("28:38").k == 10
    for bad in ("38:28", "a:b", "5", "1:2:3", "-1:4"):
        with pytest.raises(ConfigError, match="START:STOP"):
            parse_layers(bad)
    with pytest.raises(ConfigError, match="has 12 layers"):
        parse_layers("5:20").check(12)


def test_window_sums_within_a_mask_equal_the_sums_of_the_masked_image():
    rng = np.random.default_rng(2)
    image = (rng.random((70, 50)) > 0.5).astype(np.uint8)
    mask = (rng.random((70, 50)) > 0.3).astype(np.uint8)
    origins = grid_windows(70, 50, 16, 8)
    np.testing.assert_array_equal(
        window_sums(image, origins, 16, within=mask), window_sums(image & mask, origins, 16)
    )
    assert (
        window_sums(image, origins, 16, within=mask).sum() < window_sums(image, origins, 16).sum()
    )
