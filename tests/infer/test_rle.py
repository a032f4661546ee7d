from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from inkpipe.infer.rle import decode_rle, encode_rle, read_submission, write_submission
from inkpipe.pipeline.errors import InkpipeError, InputNotFoundError, InvalidInputError

shapes = st.tuples(st.integers(1, 12), st.integers(1, 12))


@st.composite
def masks(draw: st.DrawFn) -> np.ndarray:
    shape = draw(shapes)
    kind = draw(st.sampled_from(["random", "zeros", "ones", "first", "last", "ends"]))
    if kind == "random":
        return draw(arrays(np.bool_, shape))
    mask = np.zeros(shape, dtype=bool) if kind != "ones" else np.ones(shape, dtype=bool)
    if kind in ("first", "ends"):
        mask.flat[0] = True
    if kind in ("last", "ends"):
        mask.flat[-1] = True
    return mask


@settings(max_examples=200, deadline=None)
@given(masks())
def test_round_trip(mask: np.ndarray) -> None:
    rle = encode_rle(mask)
    decoded = decode_rle(rle, mask.shape)
    assert decoded.dtype == np.uint8
    np.testing.assert_array_equal(decoded, mask.astype(np.uint8))
    # uint8 input (any nonzero value is ink) encodes the same
    assert encode_rle(mask.astype(np.uint8) * 255) == rle


@settings(max_examples=100, deadline=None)
@given(masks())
def test_encoding_is_canonical(mask: np.ndarray) -> None:
    """Runs are maximal, sorted, 1-indexed and lie inside the image."""
    values = [int(v) for v in encode_rle(mask).split()]
    starts, lengths = values[0::2], values[1::2]
    assert sum(lengths) == int(mask.sum())
    assert all(s >= 1 for s in starts) and all(n >= 1 for n in lengths)
    ends = [s + n for s, n in zip(starts, lengths, strict=True)]  # one past the run, 1-indexed
    assert all(e < s for e, s in zip(ends[:-1], starts[1:], strict=True))  # gap between runs
    assert not ends or ends[-1] - 1 <= mask.size


def test_hand_checked_example() -> None:
    mask = np.array([[0, 1, 1], [1, 0, 1]], dtype=np.uint8)
    assert encode_rle(mask) == "2 3 6 1"
    np.testing.assert_array_equal(decode_rle("2 3 6 1", (2, 3)), mask)


def test_edges_and_empty() -> None:
    assert encode_rle(np.zeros((4, 5), bool)) == ""
    assert encode_rle(np.ones((4, 5), bool)) == "1 20"
    assert encode_rle(np.array([[1, 0, 0, 1]])) == "1 1 4 1"
    np.testing.assert_array_equal(decode_rle("", (2, 2)), np.zeros((2, 2), np.uint8))
    np.testing.assert_array_equal(decode_rle("  \n", (1, 2)), np.zeros((1, 2), np.uint8))


def test_encode_is_row_major_for_non_contiguous_input() -> None:
    mask = np.array([[1, 0], [1, 0]], dtype=bool)
    assert encode_rle(mask.T) == "1 2"  # mask.T is [[1, 1], [0, 0]]
    assert encode_rle(np.asfortranarray(mask)) == "1 1 3 1"


def test_touching_runs_decode() -> None:
    np.testing.assert_array_equal(decode_rle("1 2 3 1", (1, 4)), [[1, 1, 1, 0]])


@pytest.mark.parametrize(
    ("rle", "match"),
    [
        ("1 2 2 1", "run 2 .*overlaps run 1"),
        ("4 1 1 1", "run 2 .*comes before run 1"),
        ("3 1 3 1", "run 2 .*overlaps run 1"),
        ("0 1", "run 1 starts at 0"),
        ("-2 1", "run 1 starts at -2"),
        ("1 0", "run 1 .*length 0"),
        ("2 -1", "run 1 .*length -1"),
        ("1 2 3", "even count"),
        ("1 x", "token 2 .*length of run 1.*'x'"),
        ("1.5 2", "token 1 .*'1.5'"),
        ("1 99999999999999999999999", "token 2"),
        ("6 2", "run 1 .*past the end of the 2x3 image"),
        ("1 7", "ends at pixel 7"),
    ],
)
def test_decode_rejects(rle: str, match: str) -> None:
    with pytest.raises(InvalidInputError, match=match):
        decode_rle(rle, (2, 3))


@pytest.mark.parametrize("shape", [(0, 3), (2,), (2, -1), "ab"])
def test_decode_rejects_bad_shape(shape: object) -> None:
    with pytest.raises(InvalidInputError, match="shape"):
        decode_rle("1 1", shape)  # type: ignore[arg-type]


def test_encode_rejects_bad_masks() -> None:
    with pytest.raises(InvalidInputError, match="expected a \\(H, W\\) mask"):
        encode_rle(np.zeros((2, 2, 2), bool))
    with pytest.raises(InvalidInputError, match="binarize"):
        encode_rle(np.zeros((2, 2), np.float32))


def test_submission_round_trip(tmp_path: Path) -> None:
    long_rle = encode_rle(np.tile([True, False], 200_000).reshape(400, 1000))
    assert len(long_rle) > 131072  # above the csv module's default field limit
    rows = [("1", "2 3 6 1"), ("b", ""), ("c,d", long_rle)]
    path = write_submission(tmp_path / "out" / "submission.csv", rows)
    assert path.read_text().splitlines()[0] == "Id,Predicted"
    assert read_submission(path) == dict(rows)
    assert list(read_submission(path)) == ["1", "b", "c,d"]
    assert [p.name for p in path.parent.iterdir()] == ["submission.csv"]  # no temp files left


def test_write_submission_rejects_duplicates_and_keeps_old_file(tmp_path: Path) -> None:
    path = write_submission(tmp_path / "s.csv", [("a", "1 1")])
    with pytest.raises(InvalidInputError, match="'a' given twice"):
        write_submission(path, [("a", "1 1"), ("a", "")])
    with pytest.raises(InvalidInputError, match="empty Id"):
        write_submission(path, [(" ", "1 1")])
    assert read_submission(path) == {"a": "1 1"}
    assert [p.name for p in tmp_path.iterdir()] == ["s.csv"]


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "line 1 is None, expected the header"),
        ("a,1 1\n", "expected the header 'Id,Predicted'"),
        ("Id,Predicted\na,1 1\na,2 1\n", "'a' on line 3 already appeared on line 2"),
        ("Id,Predicted\na,1 1,3\n", "line 2 has 3 fields, expected 2"),
        ("Id,Predicted\na\n", "line 2 has 1 field, expected 2.*write 'a,'"),
        ("Id,Predicted\n,1 1\n", "line 2 has an empty Id"),
    ],
)
def test_read_submission_rejects(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "s.csv"
    path.write_text(text)
    with pytest.raises(InvalidInputError, match=match):
        read_submission(path)


def test_read_submission_tolerates_bom_and_crlf(tmp_path: Path) -> None:
    path = tmp_path / "s.csv"
    path.write_bytes(b"\xef\xbb\xbfId,Predicted\r\na,1 1\r\n\r\nb,\r\n")
    assert read_submission(path) == {"a": "1 1", "b": ""}


def test_read_submission_missing(tmp_path: Path) -> None:
    with pytest.raises(InputNotFoundError, match="submission not found"):
        read_submission(tmp_path / "nope.csv")


def test_read_submission_binary_garbage(tmp_path: Path) -> None:
    path = tmp_path / "s.csv"
    path.write_bytes(b"Id,Predicted\n\xff\xfe\x00garbage\n")
    with pytest.raises(InkpipeError):
        read_submission(path)
