"""Fault injection: hostile submission CSVs through ``inkpipe evaluate``.

Each bad file gives exit code 1 and one line naming the file, the row and the fix, never a
traceback; evaluate writes nothing, so the submission and the labels stay as they were.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from inkpipe.cli import cli
from inkpipe.infer.rle import encode_rle
from inkpipe.pipeline.images import write_png

H, W = 10, 8  # label images of 80 pixels


@pytest.fixture
def labels(tmp_path: Path) -> Path:
    """Fragments 'a' (ink in rows 2-3) and 'b' (ink in row 0), 10 x 8, as 0/255 PNGs."""
    root = tmp_path / "labels"
    a = np.zeros((H, W), np.uint8)
    a[2:4, :] = 255
    (root / "a").mkdir(parents=True)
    write_png(root / "a" / "inklabels.png", a)
    b = np.zeros((H, W), np.uint8)
    b[0, :] = 255
    write_png(root / "b.png", b)
    return root


def snapshot(*folders: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for f in folders for p in sorted(f.rglob("*")) if p.is_file()}


def run(tmp_path: Path, labels: Path, content: str | bytes):
    sub = tmp_path / "submission.csv"
    if isinstance(content, str):
        content = content.encode()
    sub.write_bytes(content)
    before = snapshot(tmp_path)
    result = CliRunner().invoke(cli, ["evaluate", str(sub), "--labels", str(labels)])
    assert "Traceback" not in result.output
    assert snapshot(tmp_path) == before  # nothing written, nothing lost
    return sub, result


def one_line_error(result) -> str:
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


A = encode_rle(np.repeat([0, 1, 0], [16, 16, 48]).reshape(H, W))  # a, exactly
B = "1 8"  # b, exactly

ERRORS = {
    # the int64 wrap of starts + lengths - 1 (issue 12, item 4)
    "length wraps int64": (f"Id,Predicted\na,{A}\nb,5 9223372036854775807\n", "b", "past the end"),
    "wrap hides unsorted": (
        f"Id,Predicted\na,{A}\nb,10 9223372036854775800 5 1\n",
        "b",
        "run 1 .* past the end",
    ),
    "unsorted runs": (f"Id,Predicted\na,{A}\nb,10 2 5 1\n", "b", "run 2 .*comes before run 1"),
    "overlapping runs": (f"Id,Predicted\na,{A}\nb,1 5 3 2\n", "b", "run 2 .*overlaps run 1"),
    "above int64": (
        f"Id,Predicted\na,{A}\nb,1 99999999999999999999\n",
        "b",
        "token 2 .*too large for the 10x8 image",
    ),
    "5000 digits": (f"Id,Predicted\na,{A}\nb,{'9' * 5000} 1\n", "b", "token 1 .*too large"),
    "below int64": (
        f"Id,Predicted\na,{A}\nb,1 -99999999999999999999\n",
        "b",
        "token 2 .*too small, expected >= 1",
    ),
    "run past the end": (f"Id,Predicted\na,{A}\nb,79 3\n", "b", "ends at pixel 81, past the end"),
    "start past the end": (f"Id,Predicted\na,{A}\nb,81 1\n", "b", "starts at pixel 81"),
    "start 0": (f"Id,Predicted\na,{A}\nb,0 1\n", "b", "starts at 0, expected a start >= 1"),
    "length 0": (f"Id,Predicted\na,{A}\nb,1 0\n", "b", "length 0, expected a length >= 1"),
    "odd count": (f"Id,Predicted\na,{A}\nb,1 2 3\n", "b", "even count"),
    "not an integer": (f"Id,Predicted\na,{A}\nb,1 x\n", "b", "token 2 .*'x', expected an integer"),
    "NUL byte": (f"Id,Predicted\na,{A}\nb,1 2\x00\n", "b", "expected an integer"),
    "swapped header": (f"Predicted,Id\n{A},a\n{B},b\n", None, "columns are swapped"),
    "swapped rows": (f"Id,Predicted\n{A},a\n{B},b\n", None, "looks like a run-length string"),
    "duplicate id": (
        f"Id,Predicted\na,{A}\nb,{B}\na,\n",
        "a",
        "line 4 already appeared on line 2",
    ),
    "no header": (f"a,{A}\nb,{B}\n", None, "expected the header 'Id,Predicted'"),
    "empty file": ("", None, "expected the header"),
    "header only": ("Id,Predicted\n", None, "no rows"),
    "Id without comma": (f"Id,Predicted\na,{A}\nb\n", None, "line 3 has 1 field.*write 'b,'"),
    "three fields": (f"Id,Predicted\na,{A},1\n", None, "line 2 has 3 fields"),
    "empty Id": (f"Id,Predicted\n,{A}\n", None, "line 2 has an empty Id"),
    "no id matches": ("Id,Predicted\nx,\ny,\n", None, "none of its ids \\(x, y\\)"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_hostile_csv_is_a_one_line_error(tmp_path, labels, case):
    content, row, match = ERRORS[case]
    sub, result = run(tmp_path, labels, content)
    line = one_line_error(result)
    assert str(sub) in line
    if row is not None:
        assert f"'{row}'" in line
    assert re.search(match, line), line


@pytest.mark.parametrize(
    ("content", "where"),
    [
        (b"Id,Predicted\na,1 2\nb,3 \xff4\n", "line 3 (row 'b'), byte 5 (offset 23 in the file)"),
        (b"Id,Predicted\n\xffa,1 2\n", "line 2, byte 1 (offset 13 in the file) is 0xff"),
        (b"\xef\xbb\xbfId,Predicted\na,1 2\nb\xc3,3 4\n", "line 3, byte 2 (offset 23"),
        (b"\xff\xfeI\x00d\x00", "line 1, byte 1 (offset 0 in the file) is 0xff"),  # UTF-16
    ],
)
def test_invalid_utf8_names_line_and_byte(tmp_path, labels, content, where):
    sub, result = run(tmp_path, labels, content)
    line = one_line_error(result)
    assert str(sub) in line and where in line and "not valid UTF-8" in line


def test_empty_predicted_is_an_empty_mask(tmp_path, labels):
    _, result = run(tmp_path, labels, f"Id,Predicted\na,{A}\nb,\n")
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line.split() for line in result.output.splitlines() if line}
    assert rows["a"][1] == "1.0000"
    assert rows["b"][1:] == ["0.0000", "0.0000", "0.0000", "0", "0", "8"]
    assert rows["mean"][1] == "0.5000"


def test_missing_row_scores_zero_and_counts_in_the_mean(tmp_path, labels):
    _, result = run(tmp_path, labels, f"Id,Predicted\na,{A}\nzz,{B}\n")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert any(line.split()[:3] == ["b", "(missing)", "0.0000"] for line in lines)
    assert any(line.split()[:2] == ["mean", "0.5000"] for line in lines)
    assert "missing rows (1), scored as empty masks: b" in result.output
    assert "extra rows (1), no label image, not scored: zz" in result.output


def test_evaluate_help_states_the_row_rule():
    result = CliRunner().invoke(cli, ["evaluate", "--help"])
    text = " ".join(result.output.split())
    assert "a missing row is scored as an empty mask" in text
    assert "An empty Predicted is a valid empty mask" in text
    assert "listed as extra and not scored" in text
