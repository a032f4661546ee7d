from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from inkpipe.numerics.blending import (
    GIL_TURN_S,
    BlendAccumulator,
    gaussian_importance,
    read_in_background,
    short_gil_turns,
    sliding_window_predict,
)
from inkpipe.pipeline.errors import ConfigError, InvalidInputError
from inkpipe.pipeline.windows import grid_windows, tile_starts


def pointwise(batch: np.ndarray) -> np.ndarray:
    """A per-pixel predictor: sigmoid of an affine function of the channel mean."""
    return (1 / (1 + np.exp(-(3.0 * batch.mean(axis=1) - 1.0)))).astype(np.float32)


@st.composite
def tiling(draw: st.DrawFn) -> tuple[int, int, int, int]:
    tile = draw(st.integers(1, 16))
    stride = draw(st.integers(1, tile))
    height = draw(st.integers(1, 40))
    width = draw(st.integers(1, 40))
    return height, width, tile, stride


# --- window geometry -------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(length=st.integers(1, 300), tile=st.integers(1, 64), data=st.data())
def test_tile_starts_cover_and_stay_in_bounds(length: int, tile: int, data: st.DataObject) -> None:
    stride = data.draw(st.integers(1, tile))
    starts = tile_starts(length, tile, stride)
    assert starts.dtype == np.int64
    assert starts[0] == 0
    assert np.all(np.diff(starts) > 0)
    assert np.all(np.diff(starts) <= stride)
    if length <= tile:
        assert starts.tolist() == [0]
    else:
        assert starts[-1] + tile == length  # last window ends exactly at the edge
        assert np.all(starts + tile <= length)  # never overhangs
        assert np.all(starts[:-1] == np.arange(len(starts) - 1) * stride)
        assert len(starts) == -(-(length - tile) // stride) + 1  # documented count
    covered = np.zeros(max(length, tile), bool)
    for s in starts:
        covered[s : s + tile] = True
    assert covered[:length].all()


def test_tile_starts_examples() -> None:
    assert tile_starts(10, 4, 3).tolist() == [0, 3, 6]
    assert tile_starts(11, 4, 3).tolist() == [0, 3, 6, 7]
    assert tile_starts(8, 4, 4).tolist() == [0, 4]
    assert tile_starts(3, 4, 2).tolist() == [0]


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((10, 4, 5), "larger than tile_px"),
        ((10, 0, 1), "tile_px"),
        ((0, 4, 2), "length"),
        ((10, 4, 0), "stride_px"),
        ((10, 4.0, 2), "tile_px"),
    ],
)
def test_tile_starts_rejects(args: tuple, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        tile_starts(*args)


def test_grid_windows_row_major() -> None:
    windows = grid_windows(6, 5, 4, 2)
    assert windows.tolist() == [[0, 0], [0, 1], [2, 0], [2, 1]]
    assert windows.shape == (4, 2)


def test_gaussian_importance() -> None:
    g = gaussian_importance(16)
    assert g.shape == (16, 16) and g.dtype == np.float32
    assert g.max() == pytest.approx(1.0) and g.min() >= 1e-3
    np.testing.assert_allclose(g, g.T)
    np.testing.assert_allclose(g, g[::-1, ::-1])
    assert g[7, 7] > g[3, 7] > g[3, 3] > g[0, 0] == pytest.approx(1e-3)
    assert gaussian_importance(1).tolist() == [[1.0]]
    assert gaussian_importance(64, min_weight=0.5).min() == pytest.approx(0.5)
    with pytest.raises(ConfigError, match="sigma_frac"):
        gaussian_importance(8, sigma_frac=0)
    with pytest.raises(ConfigError, match="min_weight"):
        gaussian_importance(8, min_weight=0)


# --- the MONAI property ----------------------------------------------------------------------


@settings(max_examples=120, deadline=None)
@given(
    geometry=tiling(),
    channels=st.integers(1, 3),
    batch_size=st.integers(1, 5),
    pad_mode=st.sampled_from(["constant", "reflect"]),
    seed=st.integers(0, 2**16),
)
def test_pointwise_predictor_equals_whole_image(
    geometry: tuple[int, int, int, int], channels: int, batch_size: int, pad_mode: str, seed: int
) -> None:
    height, width, tile, stride = geometry
    image = np.random.default_rng(seed).random((channels, height, width), dtype=np.float32)
    out = sliding_window_predict(
        image,
        pointwise,
        tile,
        stride,
        batch_size=batch_size,
        pad_mode=pad_mode,  # type: ignore[arg-type]
    )
    assert out.shape == (height, width) and out.dtype == np.float32
    np.testing.assert_allclose(out, pointwise(image[None])[0], atol=1e-5, rtol=0)


@settings(max_examples=60, deadline=None)
@given(geometry=tiling(), seed=st.integers(0, 2**16))
def test_valid_mask_skips_windows(geometry: tuple[int, int, int, int], seed: int) -> None:
    height, width, tile, stride = geometry
    rng = np.random.default_rng(seed)
    image = rng.random((2, height, width), dtype=np.float32)
    valid = rng.random((height, width)) < 0.05
    calls: list[int] = []

    def counting(batch: np.ndarray) -> np.ndarray:
        calls.append(len(batch))
        return pointwise(batch)

    out = sliding_window_predict(image, counting, tile, stride, valid=valid)
    expected = pointwise(image[None])[0]
    np.testing.assert_allclose(out[valid], expected[valid], atol=1e-5, rtol=0)
    windows = grid_windows(height, width, tile, stride)
    kept = [valid[y : y + tile, x : x + tile].any() for y, x in windows]
    assert sum(calls) == sum(kept)
    covered = np.zeros((height, width), bool)
    for (y, x), keep in zip(windows, kept, strict=True):
        if keep:
            covered[y : y + tile, x : x + tile] = True
    assert np.all(out[~covered] == 0)


def test_all_invalid_calls_nothing() -> None:
    def fail(batch: np.ndarray) -> np.ndarray:
        raise AssertionError("called")

    out = sliding_window_predict(np.ones((1, 9, 9)), fail, 4, 2, valid=np.zeros((9, 9), bool))
    assert np.all(out == 0)


def test_blending_is_a_weighted_average() -> None:
    """A predictor returning a different constant per window blends to values between them."""
    counter = iter(range(1000))

    def per_window(batch: np.ndarray) -> np.ndarray:
        return np.stack([np.full(batch.shape[2:], next(counter), np.float32) for _ in batch])

    out = sliding_window_predict(np.zeros((1, 12, 12), np.float32), per_window, 8, 4)
    assert out.min() >= 0 and out.max() <= 3 + 1e-5
    assert out[0, 0] == 0 and out[-1, -1] == pytest.approx(3)  # corners see one window each


def test_accepts_channel_output_and_rejects_wrong_shape() -> None:
    image = np.random.default_rng(0).random((1, 10, 10), dtype=np.float32)
    out = sliding_window_predict(image, lambda b: pointwise(b)[:, None], 4, 3)
    np.testing.assert_allclose(out, pointwise(image[None])[0], atol=1e-5)
    with pytest.raises(InvalidInputError, match="predictor returned shape"):
        sliding_window_predict(image, lambda b: pointwise(b)[:, :2], 4, 3)
    with pytest.raises(InvalidInputError, match="expected \\(C, H, W\\)"):
        sliding_window_predict(image[0], pointwise, 4, 3)
    with pytest.raises(InvalidInputError, match="valid mask has shape"):
        sliding_window_predict(image, pointwise, 4, 3, valid=np.ones((9, 10), bool))
    with pytest.raises(ConfigError, match="pad mode"):
        sliding_window_predict(image, pointwise, 4, 3, pad_mode="reflekt")  # type: ignore[arg-type]


def test_reads_only_crops() -> None:
    class Sliceable:
        """An image that is not an ndarray: records every read."""

        def __init__(self, data: np.ndarray) -> None:
            self.data, self.shape = data, data.shape
            self.reads: list[tuple] = []

        def __getitem__(self, key: tuple) -> np.ndarray:
            self.reads.append(key)
            return self.data[key]

    data = np.random.default_rng(1).random((2, 20, 17), dtype=np.float32)
    image = Sliceable(data)
    out = sliding_window_predict(image, pointwise, 8, 6, batch_size=3)  # type: ignore[arg-type]
    np.testing.assert_allclose(out, pointwise(data[None])[0], atol=1e-5)
    assert len(image.reads) == len(grid_windows(20, 17, 8, 6))


# --- accumulator -----------------------------------------------------------------------------


def test_memmap_accumulator_matches_ram(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    origins = grid_windows(30, 21, 8, 5)
    prob = rng.random((len(origins), 8, 8), dtype=np.float32)
    ram = BlendAccumulator((30, 21), 8)
    disk = BlendAccumulator((30, 21), 8, out_dir=tmp_path / "canvas")
    for acc in (ram, disk):
        acc.add(prob[:3], origins[:3])
        acc.add(prob[3:], origins[3:])
    assert isinstance(disk.sum, np.memmap)
    assert {p.name for p in (tmp_path / "canvas").iterdir()} == {
        "blend_sum.npy",
        "blend_weight.npy",
    }
    np.testing.assert_array_equal(disk.result(), ram.result())
    out = np.lib.format.open_memmap(tmp_path / "out.npy", "w+", np.float32, (30, 21))
    assert disk.result(out=out) is out
    np.testing.assert_array_equal(out, ram.result())


def test_memmap_sliding_window_predict(tmp_path: Path) -> None:
    image = np.random.default_rng(3).random((1, 13, 11), dtype=np.float32)
    ram = sliding_window_predict(image, pointwise, 6, 4)
    mapped = sliding_window_predict(image, pointwise, 6, 4, out_dir=tmp_path)
    np.testing.assert_array_equal(ram, mapped)


def test_accumulator_clips_overhanging_windows_and_zero_weight() -> None:
    acc = BlendAccumulator((3, 5), 4, weight=np.ones((4, 4)))
    acc.add(np.full((1, 4, 4), 0.5, np.float32), np.array([[0, 0]]))
    result = acc.result()
    assert result.dtype == np.float32
    np.testing.assert_array_equal(result[:, :4], 0.5)
    np.testing.assert_array_equal(result[:, 4], 0.0)  # never covered: 0, not NaN


def test_accumulator_rejects() -> None:
    acc = BlendAccumulator((8, 8), 4)
    tile = np.zeros((1, 4, 4), np.float32)
    with pytest.raises(InvalidInputError, match="outside the 8x8 canvas"):
        acc.add(tile, np.array([[8, 0]]))
    with pytest.raises(InvalidInputError, match="outside"):
        acc.add(tile, np.array([[0, -1]]))
    with pytest.raises(InvalidInputError, match="expected \\(n, 4, 4\\)"):
        acc.add(np.zeros((1, 3, 4)), np.array([[0, 0]]))
    with pytest.raises(InvalidInputError, match="origins"):
        acc.add(tile, np.array([[0.0, 0.0]]))
    with pytest.raises(InvalidInputError, match="NaN"):
        acc.add(np.full((1, 4, 4), np.nan), np.array([[0, 0]]))
    with pytest.raises(ConfigError, match="weight has shape"):
        BlendAccumulator((8, 8), 4, weight=np.ones((3, 3)))
    with pytest.raises(ConfigError, match="> 0"):
        BlendAccumulator((8, 8), 4, weight=np.zeros((4, 4)))
    with pytest.raises(ConfigError, match="floating"):
        BlendAccumulator((8, 8), 4, dtype=np.int32)


# --- reading ahead in a background thread ----------------------------------------------------


def test_read_in_background_keeps_order_and_bounds_the_lead() -> None:
    made: list[int] = []
    taken: list[int] = []

    def items():
        for i in range(20):
            made.append(i)
            yield i

    for i in read_in_background(items(), depth=2):
        time.sleep(0.002)
        # the thread is at most depth ready + the one it is making ahead of the reader
        assert len(made) - len(taken) <= 4
        taken.append(i)
    assert taken == list(range(20))


def test_read_in_background_raises_at_the_failing_item() -> None:
    def items():
        yield 0
        yield 1
        raise OSError("chunk 3 unreadable")

    got = []
    with pytest.raises(OSError, match="chunk 3 unreadable"):
        for i in read_in_background(items(), 1):
            got.append(i)
    assert got == [0, 1]
    with pytest.raises(ConfigError, match="depth"):
        next(read_in_background([], 0))


def test_read_in_background_stops_when_the_reader_does() -> None:
    before = threading.active_count()
    made: list[int] = []

    def items():
        for i in range(1000):
            made.append(i)
            yield i

    gen = read_in_background(items(), 2)
    assert next(gen) == 0
    gen.close()  # joins the thread
    assert threading.active_count() == before
    assert len(made) <= 5


class SlowView:
    """A (C, H, W) source with ``read_windows`` that records its thread and takes its time."""

    def __init__(self, image: np.ndarray, delay_s: float = 0.0) -> None:
        self.image, self.delay_s = image, delay_s
        self.shape = image.shape
        self.threads: set[int] = set()

    def read_windows(self, origins, tile_px, read_ahead=None):
        self.threads.add(threading.get_ident())
        time.sleep(self.delay_s)
        t = tile_px
        return np.stack([self.image[:, y : y + t, x : x + t] for y, x in origins.tolist()])


def test_tiles_are_read_in_another_thread_the_predictor_runs_in_this_one() -> None:
    image = np.random.default_rng(0).random((2, 40, 36)).astype(np.float32)
    view = SlowView(image)
    predictor_threads = set()

    def predictor(batch):
        predictor_threads.add(threading.get_ident())
        return pointwise(batch)

    ahead = sliding_window_predict(view, predictor, 8, 5, batch_size=3)
    assert predictor_threads == {threading.get_ident()}
    assert threading.get_ident() not in view.threads
    here = sliding_window_predict(SlowView(image), pointwise, 8, 5, batch_size=3, read_ahead=0)
    np.testing.assert_array_equal(ahead, here)
    np.testing.assert_allclose(ahead, pointwise(image[None])[0], atol=1e-6)


def test_the_predictor_does_not_wait_for_reading() -> None:
    """Reading 50 ms and predicting 50 ms per batch overlap: ~n x 50 ms, not n x 100 ms."""
    image = np.zeros((1, 8, 8 * 10), np.float32)  # 10 batches of one window

    def slow_predictor(batch):
        time.sleep(0.05)
        return batch[:, 0]

    t0 = time.perf_counter()
    sliding_window_predict(SlowView(image, 0.05), slow_predictor, 8, 8, batch_size=1)
    overlapped = time.perf_counter() - t0
    assert overlapped < 0.85  # serial would be 1.0 s; sleeping needs no free core


def test_a_failing_predictor_stops_the_reading_thread() -> None:
    before = threading.active_count()
    image = np.zeros((1, 64, 64), np.float32)

    def failing(batch):
        raise RuntimeError("CUDA out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        sliding_window_predict(SlowView(image), failing, 8, 4, batch_size=2)
    assert threading.active_count() == before
    with pytest.raises(ConfigError, match="read_ahead"):
        sliding_window_predict(image, pointwise, 8, 4, read_ahead=-1)


# --- blending in a background thread --------------------------------------------------------


def test_predictions_are_blended_in_another_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    image = np.random.default_rng(1).random((2, 40, 36)).astype(np.float32)
    adders: list[int] = []
    add = BlendAccumulator.add

    def recording_add(self, prob, origins):
        adders.append(threading.get_ident())
        add(self, prob, origins)

    monkeypatch.setattr(BlendAccumulator, "add", recording_add)
    behind = sliding_window_predict(image, pointwise, 8, 5, batch_size=3)
    assert adders and threading.get_ident() not in adders
    adders.clear()
    here = sliding_window_predict(image, pointwise, 8, 5, batch_size=3, blend_behind=0)
    assert set(adders) == {threading.get_ident()}
    np.testing.assert_array_equal(behind, here)


@pytest.mark.parametrize("blend_behind", [0, 1, 3])
def test_a_bad_prediction_is_reported_wherever_it_is_blended(blend_behind: int) -> None:
    before = threading.active_count()
    image = np.zeros((1, 64, 64), np.float32)
    calls = iter(range(100))

    def nan_at_third(batch):
        out = batch[:, 0].copy()
        if next(calls) == 2:
            out[0, 0, 0] = np.nan
        return out

    with pytest.raises(InvalidInputError, match="NaN"):
        sliding_window_predict(image, nan_at_third, 8, 4, batch_size=2, blend_behind=blend_behind)
    assert threading.active_count() == before
    with pytest.raises(ConfigError, match="blend_behind"):
        sliding_window_predict(image, pointwise, 8, 4, blend_behind=-1)


def test_a_failing_predictor_stops_the_blending_thread() -> None:
    before = threading.active_count()
    calls = iter(range(100))

    def fails_late(batch):
        if next(calls) == 3:
            raise RuntimeError("CUDA out of memory")
        return batch[:, 0]

    with pytest.raises(RuntimeError, match="out of memory"):
        sliding_window_predict(np.zeros((1, 64, 64), np.float32), fails_late, 8, 4, batch_size=2)
    assert threading.active_count() == before


def test_threads_take_short_gil_turns_while_predicting_and_the_interval_comes_back() -> None:
    before = sys.getswitchinterval()
    seen: list[float] = []

    def recording(batch):
        seen.append(sys.getswitchinterval())
        if len(seen) == 3:
            raise RuntimeError("CUDA out of memory")
        return batch[:, 0]

    image = np.zeros((1, 64, 64), np.float32)
    with pytest.raises(RuntimeError, match="out of memory"):
        sliding_window_predict(image, recording, 8, 4, batch_size=2)
    assert seen and max(seen) <= GIL_TURN_S < before
    assert sys.getswitchinterval() == before
    sys.setswitchinterval(1e-4)  # a caller's shorter interval is kept
    try:
        with short_gil_turns():
            assert sys.getswitchinterval() == pytest.approx(1e-4, abs=2e-6)
    finally:
        sys.setswitchinterval(before)
