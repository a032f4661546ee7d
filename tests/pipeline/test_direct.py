"""Direct I/O: the same bytes as ordinary I/O, and ordinary I/O where O_DIRECT is refused."""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest
import tifffile

from inkpipe.pipeline import direct
from inkpipe.pipeline.chunks import ChunkWriter
from inkpipe.pipeline.direct import ALIGN, open_direct, read_direct, write_direct
from inkpipe.pipeline.tiff import inspect_slice, read_rows_into

O_DIRECT = getattr(os, "O_DIRECT", 0)


@pytest.fixture
def direct_dir(tmp_path):
    """tmp_path, if its file system takes O_DIRECT (else the test is about the fallback only)."""
    fd = open_direct(tmp_path / "probe", os.O_WRONLY | os.O_CREAT)
    if fd is None:
        pytest.skip("this file system refuses O_DIRECT")
    os.close(fd)
    return tmp_path


@pytest.fixture
def refused(monkeypatch):
    """Make every open with O_DIRECT fail as tmpfs or FUSE do; record the flags of opens."""
    real_open = os.open
    flags_seen: list[int] = []

    def fake_open(path, flags, *args, **kwargs):
        flags_seen.append(flags)
        if O_DIRECT and flags & O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(direct.os, "open", fake_open)
    return flags_seen


def test_direct_reads_give_the_bytes_at_any_offset_and_length(direct_dir):
    data = np.random.default_rng(0).integers(0, 256, 3 * ALIGN + 123, dtype=np.uint8).tobytes()
    path = direct_dir / "f.bin"
    path.write_bytes(data)
    for offset, length in [(0, 10), (7, ALIGN), (ALIGN - 1, 2), (ALIGN, ALIGN), (5, 2 * ALIGN + 9)]:
        out = bytearray(length)
        assert read_direct(path, offset, memoryview(out)) == length
        assert bytes(out) == data[offset : offset + length]
    out = bytearray(200)  # past the end: the bytes that are there
    assert read_direct(path, len(data) - 50, memoryview(out)) == 50
    assert bytes(out[:50]) == data[-50:]


def test_direct_writes_give_the_exact_file_and_replace_a_longer_one(direct_dir):
    path = direct_dir / "c.bin"
    path.write_bytes(b"x" * (5 * ALIGN))
    for size in (1, ALIGN, ALIGN + 16, 2 * 1024 * 1024 + 16):
        data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
        assert write_direct(path, data)
        assert path.read_bytes() == data


def test_where_o_direct_is_refused_the_functions_say_so(tmp_path, refused):
    path = tmp_path / "f.bin"
    path.write_bytes(b"abc" * 100)
    assert read_direct(path, 1, memoryview(bytearray(10))) is None
    assert not write_direct(tmp_path / "g.bin", b"abc")


def test_other_errors_of_a_direct_open_are_raised(direct_dir):
    with pytest.raises(FileNotFoundError):
        open_direct(direct_dir / "missing" / "f", os.O_RDONLY)


@pytest.mark.parametrize("refuse", [False, True])
def test_slice_rows_read_directly_equal_the_ordinary_read(tmp_path, request, refuse):
    if refuse:
        request.getfixturevalue("refused")
    image = np.random.default_rng(1).integers(0, 65535, (37, 53), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "s.tif", image)
    info = inspect_slice(tmp_path / "s.tif")
    assert info.offset >= 0 and info.offset % ALIGN  # the pixels start off the block
    for y0, y1 in [(0, 37), (3, 4), (20, 37)]:
        out = np.empty((y1 - y0, 53), np.uint16)
        read_rows_into(info, y0, y1, out, direct=True)
        np.testing.assert_array_equal(out, image[y0:y1])


@pytest.mark.parametrize("refuse", [False, True])
def test_chunk_files_written_directly_are_the_ordinary_ones(tmp_path, request, refuse):
    flags = request.getfixturevalue("refused") if refuse else None
    chunk = np.random.default_rng(2).integers(0, 65535, (2, 8, 8), dtype=np.uint16)
    files = {}
    for mode in (False, True):
        writer = ChunkWriter(tmp_path / f"v{mode}", (2, 8, 8), "lz4", 0, "shuffle", direct=mode)
        writer.write((0, 1, 2), writer.encode(chunk))
        files[mode] = (tmp_path / f"v{mode}" / "c" / "0" / "1" / "2").read_bytes()
    assert files[True] == files[False] and len(files[True]) % ALIGN
    if flags is not None:
        assert any(f & O_DIRECT for f in flags)  # tried, refused, written the ordinary way


def test_direct_writes_are_used_where_the_file_system_takes_them(direct_dir, monkeypatch):
    seen: list[int] = []
    real_open = os.open

    def spy(path, flags, *args, **kwargs):
        seen.append(flags)
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(direct.os, "open", spy)
    writer = ChunkWriter(direct_dir / "v", (1, 4, 4), "lz4", 0, "shuffle", direct=True)
    writer.write((0, 0, 0), writer.encode(np.ones((1, 4, 4), np.uint16)))
    assert seen and all(f & O_DIRECT for f in seen)
