"""Run-length encoding of binary masks and the submission CSV, in the Kaggle Vesuvius format.

A mask is flattened row-major (C order); each run of 1s becomes a ``"start length"`` pair, the
start counted from 1; pairs are separated by single spaces; an empty mask is ``""``. Example:
``[[0, 1, 1], [1, 0, 1]]`` flattens to ``0 1 1 1 0 1`` and encodes as ``"2 3 6 1"``.

A submission is a CSV with the header ``Id,Predicted`` and one row per fragment.
"""

from __future__ import annotations

import codecs
import csv
import io
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from inkpipe.pipeline.errors import InputNotFoundError, InvalidInputError
from inkpipe.pipeline.files import atomic_write

SUBMISSION_HEADER = ("Id", "Predicted")

_FIX = "re-encode the mask with inkpipe.infer.rle.encode_rle"


def encode_rle(mask: NDArray[np.bool_] | NDArray[np.integer]) -> str:
    """Encode a binary mask as a Kaggle run-length string.

    Runs over the whole mask in O(H*W) NumPy operations, no Python loop over pixels.

    Args:
        mask: (H, W) bool or integer array; any nonzero pixel is ink.

    Returns:
        ``"start length start length ..."`` with 1-indexed starts in row-major order, or ``""``
        for a mask without ink.

    Raises:
        InvalidInputError: ``mask`` is not 2-D or not bool/integer.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise InvalidInputError(
            f"encode_rle: expected a (H, W) mask, got shape {mask.shape}; pass one 2-D mask"
        )
    if mask.dtype != np.bool_ and not np.issubdtype(mask.dtype, np.integer):
        raise InvalidInputError(
            f"encode_rle: expected a bool or integer mask, got dtype {mask.dtype}; "
            "binarize probabilities first (inkpipe.infer.postprocess.binarize)"
        )
    pixels = mask.reshape(-1)
    if pixels.dtype != np.bool_:
        pixels = pixels != 0
    if pixels.size == 0:
        return ""
    # Indices i where pixel i differs from pixel i-1 are run boundaries (0-indexed).
    changes = np.flatnonzero(pixels[1:] != pixels[:-1]) + 1
    head = [0] if pixels[0] else []
    tail = [pixels.size] if pixels[-1] else []
    bounds = np.concatenate([np.asarray(head, np.int64), changes, np.asarray(tail, np.int64)])
    if bounds.size == 0:
        return ""
    starts = bounds[0::2]
    lengths = bounds[1::2] - starts
    pairs = np.column_stack([starts + 1, lengths]).reshape(-1)
    return " ".join(map(str, pairs.tolist()))


def _shown(token: str) -> str:
    """Return a token for a message: whole if short, else its start and its length."""
    return token if len(token) <= 40 else f"{token[:20]}... ({len(token)} characters)"


def _run_of(i: int) -> str:
    return f"{'start' if i % 2 == 0 else 'length'} of run {i // 2 + 1}"


def _parse_tokens(tokens: list[str], size: str) -> NDArray[np.int64]:
    """Parse RLE tokens as int64, naming the first bad token on failure.

    A token is what Python's ``int`` reads (as the official metric's ``np.array(..., int)``
    does). NumPy parses all tokens at once; only when that fails are they walked one by one
    to name the first that is not an integer or does not fit in int64 ("too large", not "not
    an integer"), without converting huge digit strings (Python refuses > 4300 digits).
    """
    try:
        return np.array(tokens, dtype=np.int64)
    except (ValueError, OverflowError):
        pass
    for i, tok in enumerate(tokens):
        digits = tok.strip().lstrip("+-").replace("_", "")
        if digits.isdigit() and len(digits) > 19:
            value = None  # beyond int64 whatever the digits
        else:
            try:
                value = int(tok)
            except ValueError:
                raise InvalidInputError(
                    f"RLE token {i + 1} ({_run_of(i)}) is {_shown(tok)!r}, expected an "
                    f"integer; {_FIX}"
                ) from None
            if -(2**63) <= value < 2**63:
                continue
        problem = (
            "too small, expected >= 1" if tok.strip().startswith("-") else f"too large for {size}"
        )
        raise InvalidInputError(
            f"RLE token {i + 1} ({_run_of(i)}) is {_shown(tok.strip())}, {problem}; {_FIX}"
        )
    raise AssertionError("unreachable: np.array failed but every token parsed")  # pragma: no cover


def _check_shape(shape: tuple[int, int]) -> tuple[int, int]:
    """Return ``shape`` as two positive ints or raise :class:`InvalidInputError`."""
    try:
        height, width = (int(s) for s in shape)
    except (TypeError, ValueError):
        raise InvalidInputError(
            f"decode_rle: expected shape (H, W), got {shape!r}; pass the label image's shape"
        ) from None
    if height < 1 or width < 1:
        raise InvalidInputError(
            f"decode_rle: expected a positive shape (H, W), got {shape!r}; "
            "pass the label image's shape"
        )
    return height, width


def decode_rle(rle: str, shape: tuple[int, int]) -> NDArray[np.uint8]:
    """Decode a Kaggle run-length string into a binary mask, strictly.

    Runs must be sorted by start and must not overlap (touching runs are allowed). Every start
    and length is checked against the image size before any arithmetic on it, so no sum can
    wrap around int64 and hide a run past the end or out of order.

    Args:
        rle: ``"start length ..."`` with 1-indexed starts in row-major order; ``""`` (or only
            whitespace) is an empty mask.
        shape: (H, W) of the mask.

    Returns:
        (H, W) uint8 array of 0 and 1.

    Raises:
        InvalidInputError: a token is not an integer or is beyond int64, the token count is
            odd, a start is < 1 or past the image, a length is < 1, a run passes the end of
            the image, runs are unsorted or overlap, or ``shape`` is not two positive ints.
            The message names the run.
    """
    height, width = _check_shape(shape)
    n_pixels = height * width
    size = f"the {height}x{width} image ({n_pixels} pixels)"
    tokens = rle.split()
    if not tokens:
        return np.zeros((height, width), dtype=np.uint8)
    if len(tokens) % 2:
        raise InvalidInputError(
            f"RLE has {len(tokens)} numbers, expected an even count of 'start length' pairs "
            f"(the last run, starting at {_shown(tokens[-1])!r}, has no length); {_FIX}"
        )
    values = _parse_tokens(tokens, size)
    starts = values[0::2]
    lengths = values[1::2]

    # Range checks first, comparisons only: no arithmetic on unchecked values.
    bad = np.flatnonzero(starts < 1)
    if bad.size:
        i = int(bad[0])
        raise InvalidInputError(
            f"RLE run {i + 1} starts at {starts[i]}, expected a start >= 1 (starts are "
            f"1-indexed); {_FIX}"
        )
    bad = np.flatnonzero(starts > n_pixels)
    if bad.size:
        i = int(bad[0])
        raise InvalidInputError(
            f"RLE run {i + 1} starts at pixel {starts[i]}, past the end of {size}; check that the "
            "mask was encoded at the label image's shape"
        )
    bad = np.flatnonzero(lengths < 1)
    if bad.size:
        i = int(bad[0])
        raise InvalidInputError(
            f"RLE run {i + 1} (start {starts[i]}) has length {lengths[i]}, expected a length "
            f">= 1; {_FIX}"
        )
    room = n_pixels - starts + 1  # 1 <= starts <= n_pixels: no overflow
    bad = np.flatnonzero(lengths > room)
    if bad.size:
        i = int(bad[0])
        end = int(starts[i]) + int(lengths[i]) - 1  # Python ints: exact
        raise InvalidInputError(
            f"RLE run {i + 1} (start {starts[i]}, length {lengths[i]}) ends at pixel {end}, "
            f"past the end of {size}; check that the mask was encoded at the label image's shape"
        )
    ends = starts + lengths - 1  # last pixel of each run, 1-indexed, <= n_pixels
    bad = np.flatnonzero(starts[1:] <= ends[:-1])
    if bad.size:
        i = int(bad[0]) + 1
        problem = "comes before" if starts[i] < starts[i - 1] else "overlaps"
        raise InvalidInputError(
            f"RLE run {i + 1} (start {starts[i]}, length {lengths[i]}) {problem} run {i} "
            f"(pixels {starts[i - 1]}..{ends[i - 1]}), expected runs sorted by start and not "
            f"overlapping; {_FIX}"
        )

    # +1 where a run starts, -1 just after it ends; the running sum is the mask. Starts are
    # distinct and ends are distinct, so each fancy-index update touches an index once.
    delta = np.zeros(n_pixels + 1, dtype=np.int8)
    delta[starts - 1] += 1
    delta[ends] -= 1
    flat = np.cumsum(delta[:-1], dtype=np.int8).view(np.uint8)
    return flat.reshape(height, width)


def write_submission(path: Path, rows: Iterable[tuple[str, str]]) -> Path:
    """Write a submission CSV (``Id,Predicted``) atomically; return ``path``.

    The file is written to a temporary file in the same folder and renamed over ``path``, so
    an interrupted write never leaves a half-written submission.

    Args:
        path: the CSV to write; parent folders are created.
        rows: ``(fragment_id, rle)`` pairs, in the order to write them.

    Raises:
        InvalidInputError: an id is empty or repeated.
    """
    path = Path(path)
    seen: set[str] = set()
    with atomic_write(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(SUBMISSION_HEADER)
        for fragment_id, rle in rows:
            fragment_id = str(fragment_id)
            if not fragment_id.strip():
                raise InvalidInputError(
                    f"submission {path}: a row has an empty Id, expected a fragment id"
                )
            if fragment_id in seen:
                raise InvalidInputError(
                    f"submission {path}: Id '{fragment_id}' given twice, expected one row "
                    "per fragment"
                )
            seen.add(fragment_id)
            writer.writerow((fragment_id, rle))
    return path


def _raise_field_limit() -> None:
    """Let the csv module read RLE fields of any length (real ones are many megabytes)."""
    limit = 2**31 - 1
    if csv.field_size_limit() < limit:
        csv.field_size_limit(limit)


def _decode_utf8(path: Path, data: bytes) -> str:
    """Decode a submission's bytes, naming the line, byte and row of the first bad byte."""
    bom = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        return data[bom:].decode("utf-8")
    except UnicodeDecodeError as exc:
        bad = exc.start + bom  # offset in the file
        line_start = data.rfind(b"\n", 0, bad) + 1
        line = data.count(b"\n", 0, bad) + 1
        line_end = data.find(b"\n", bad)
        text = data[line_start : line_end if line_end >= 0 else len(data)]
        head, comma, _ = text.partition(b",")
        in_id = not comma or line_start + len(head) >= bad
        row = "" if in_id else f" (row '{head.decode('utf-8', 'replace').strip()[:40]}')"
        raise InvalidInputError(
            f"submission {path}: line {line}{row}, byte {bad - line_start + 1} (offset {bad} in "
            f"the file) is 0x{data[bad]:02x}, not valid UTF-8; save the file as UTF-8 (e.g. "
            "with inkpipe.infer.rle.write_submission)"
        ) from None


def read_submission(path: Path) -> dict[str, str]:
    """Read a submission CSV into ``{fragment_id: rle}``, in file order.

    An empty ``Predicted`` (``a,``) is a valid empty mask. Blank lines are skipped; a UTF-8
    byte-order mark and CRLF line ends are accepted.

    Args:
        path: a UTF-8 CSV whose first row is ``Id,Predicted``.

    Raises:
        InputNotFoundError: the file does not exist.
        InvalidInputError: the file is not UTF-8, the header is missing, wrong or swapped, a
            row does not have exactly two fields, an Id is empty, or an Id repeats. The
            message names the line (and the row's Id where there is one).
    """
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"submission not found: {path}")
    _raise_field_limit()
    text = _decode_utf8(path, path.read_bytes())
    result: dict[str, str] = {}
    first_line: dict[str, int] = {}
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
        names = None if header is None else tuple(h.strip() for h in header)
        if names == SUBMISSION_HEADER[::-1]:
            raise InvalidInputError(
                f"submission {path}: line 1 is '{','.join(header or ())}', the columns are "
                f"swapped; expected '{','.join(SUBMISSION_HEADER)}' (Id first)"
            )
        if names != SUBMISSION_HEADER:
            raise InvalidInputError(
                f"submission {path}: line 1 is {header!r}, expected the header "
                f"'{','.join(SUBMISSION_HEADER)}'; add it as the first line"
            )
        for row in reader:
            line = reader.line_num
            if not row:
                continue
            if len(row) != 2:
                hint = (
                    f"write '{row[0].strip()[:40]},' for an empty prediction"
                    if len(row) == 1
                    else "quote fields that contain commas"
                )
                raise InvalidInputError(
                    f"submission {path}: line {line} has {len(row)} "
                    f"field{'s' if len(row) != 1 else ''}, expected 2 (Id,Predicted); {hint}"
                )
            fragment_id, rle = row[0].strip(), row[1]
            if not fragment_id:
                raise InvalidInputError(
                    f"submission {path}: line {line} has an empty Id, expected a fragment id"
                )
            if fragment_id in result:
                raise InvalidInputError(
                    f"submission {path}: Id '{fragment_id}' on line {line} already appeared "
                    f"on line {first_line[fragment_id]}; keep one row per fragment"
                )
            result[fragment_id] = rle
            first_line[fragment_id] = line
    except csv.Error as exc:
        raise InvalidInputError(
            f"submission {path}: line {reader.line_num} is not valid CSV ({exc}); rewrite it "
            "with inkpipe.infer.rle.write_submission"
        ) from None
    return result
