from __future__ import annotations

import numpy as np
import pytest

from inkpipe.infer.postprocess import (
    apply_mask,
    binarize,
    disk,
    open_mask,
    postprocess,
    remove_small,
)
from inkpipe.pipeline.errors import ConfigError, InvalidInputError


def scene() -> np.ndarray:
    """A 1-px speck, a 10x10 square and a 2x2 blob on a 40x40 canvas."""
    mask = np.zeros((40, 40), np.uint8)
    mask[5, 5] = 1
    mask[20:30, 20:30] = 1
    mask[2:4, 30:32] = 1
    return mask


def test_binarize() -> None:
    prob = np.array([[0.1, 0.5, 0.9]], np.float32)
    out = binarize(prob, 0.5)
    assert out.dtype == np.uint8
    assert out.tolist() == [[0, 1, 1]]
    assert binarize(prob, 0.0).tolist() == [[1, 1, 1]]
    assert binarize(prob, 1.0).tolist() == [[0, 0, 0]]
    # compared in float32: 0.1 as float32 is slightly above 0.1, and still reaches it
    assert binarize(np.array([[0.1]], np.float32), 0.1).tolist() == [[1]]
    with pytest.raises(ConfigError, match="threshold must be in \\[0, 1\\]"):
        binarize(prob, 1.5)
    with pytest.raises(InvalidInputError, match="float map"):
        binarize(prob.astype(np.uint8), 0.5)


def test_disk() -> None:
    assert disk(0).tolist() == [[True]]
    assert disk(1).astype(int).tolist() == [[0, 1, 0], [1, 1, 1], [0, 1, 0]]
    assert disk(3).shape == (7, 7) and disk(3).sum() == 29


def test_opening_removes_speck_keeps_square() -> None:
    mask = scene()
    opened = open_mask(mask, 1)
    assert opened.dtype == np.uint8
    assert opened[5, 5] == 0
    # a disk rounds corners: the radius-1 disk (a cross) cannot reach a square's corner pixel
    square = np.ones((10, 10), np.uint8)
    square[[0, 0, -1, -1], [0, -1, 0, -1]] = 0
    np.testing.assert_array_equal(opened[20:30, 20:30], square)
    assert opened[2:4, 30:32].sum() == 0  # a 2x2 blob does not contain a radius-1 disk
    assert opened.sum() == 96
    assert np.all(opened <= mask)  # an opening never adds ink


def test_opening_zero_is_identity_copy() -> None:
    mask = scene().astype(bool)
    out = open_mask(mask, 0)
    np.testing.assert_array_equal(out, mask)
    out[0, 0] = 1
    assert not mask[0, 0]  # no aliasing of the input


def test_opening_keeps_ink_touching_the_border() -> None:
    full = np.ones((12, 12), np.uint8)
    np.testing.assert_array_equal(open_mask(full, 3), full)
    edge = np.zeros((12, 12), np.uint8)
    edge[:, :5] = 1
    np.testing.assert_array_equal(open_mask(edge, 2), edge)


def test_remove_small() -> None:
    mask = scene()
    kept = remove_small(mask, 4)
    assert kept.dtype == np.uint8
    assert kept[5, 5] == 0 and kept[2:4, 30:32].sum() == 4 and kept.sum() == 104
    assert remove_small(mask, 5).sum() == 100
    assert remove_small(mask, 101).sum() == 0
    np.testing.assert_array_equal(remove_small(mask, 0), mask)
    np.testing.assert_array_equal(remove_small(mask, 1), mask)


def test_remove_small_uses_8_connectivity() -> None:
    diagonal = np.eye(4, dtype=np.uint8)
    np.testing.assert_array_equal(remove_small(diagonal, 4), diagonal)


def test_apply_mask() -> None:
    pred = np.ones((3, 3), np.uint8)
    papyrus = np.zeros((3, 3), np.uint8)
    papyrus[1] = 255
    out = apply_mask(pred, papyrus)
    assert out.dtype == np.uint8
    assert out.tolist() == [[0, 0, 0], [1, 1, 1], [0, 0, 0]]
    with pytest.raises(InvalidInputError, match="papyrus mask has shape"):
        apply_mask(pred, papyrus[:2])


def test_postprocess_composes() -> None:
    mask = scene()
    prob = np.where(mask, 0.8, 0.2).astype(np.float32)
    papyrus = np.ones((40, 40), bool)
    papyrus[:, 25:] = False
    out = postprocess(prob, 0.5, open_px=1, min_area=30, papyrus_mask=papyrus)
    assert out.dtype == np.uint8
    expected = np.zeros((40, 40), np.uint8)
    expected[20:30, 20:25] = 1  # the masked square is 10x5 = 50 px; speck and blob are gone
    expected[[20, 20, 29, 29], [20, 24, 20, 24]] = 0  # corners rounded by the opening
    np.testing.assert_array_equal(out, expected)
    assert postprocess(prob, 0.5, min_area=60, papyrus_mask=papyrus).sum() == 0
    np.testing.assert_array_equal(postprocess(prob, 0.5), mask)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda m: open_mask(m, -1), "open_px"),
        (lambda m: open_mask(m, 1.5), "open_px"),
        (lambda m: remove_small(m, -3), "min_area"),
        (lambda m: open_mask(m[None], 1), "expected a \\(H, W\\) mask"),
    ],
)
def test_rejects(call, match: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises((ConfigError, InvalidInputError), match=match):
        call(scene())
