import shutil

import numpy as np
import pytest
from numcodecs import blosc

from inkpipe.pipeline.chunks import (
    BLOSC_HEADER_BYTES,
    BLOSC_MEMCPYED,
    BloscHeader,
    ChunkReader,
    chunk_key,
    chunk_path,
    header_problem,
)
from inkpipe.pipeline.errors import StoreError
from inkpipe.pipeline.layers import LayerRange
from inkpipe.pipeline.store import open_fragments
from inkpipe.pipeline.volume import BlockCache


def test_chunk_files_lie_where_the_store_writes_them(tiny_store):
    frag = open_fragments(tiny_store, ["1"])[0]
    volume = frag.volume
    assert chunk_key((0, 1, 0)) == volume.metadata.encode_chunk_key((0, 1, 0)) == "c/0/1/0"
    reader = ChunkReader(volume)
    assert reader.root == tiny_store / "1" / "volume"
    path = chunk_path(reader.root, (2, 1, 1))
    assert path == tiny_store / "1" / "volume" / "c" / "2" / "1" / "1" and path.is_file()


def test_blosc_header_parses_what_numcodecs_writes():
    rng = np.random.default_rng(0)
    smooth = np.repeat(np.arange(4 * 64, dtype=np.uint16), 64).reshape(4, 64, 64)
    noise = rng.integers(0, 65535, (4, 64, 64), dtype=np.uint16)
    packed = blosc.compress(smooth, b"lz4", 5, blosc.SHUFFLE)
    header = BloscHeader.parse(packed[:BLOSC_HEADER_BYTES])
    assert header is not None
    assert header.decoded_bytes == smooth.nbytes and header.stored_bytes == len(packed)
    assert header.type_bytes == 2 and not header.stored_raw
    raw = blosc.compress(noise, b"lz4", 5, blosc.SHUFFLE)
    raw_header = BloscHeader.parse(raw)
    assert raw_header is not None and raw_header.stored_raw
    assert raw_header.flags & BLOSC_MEMCPYED and raw_header.stored_bytes == len(raw)
    assert len(raw) == BLOSC_HEADER_BYTES + noise.nbytes
    assert BloscHeader.parse(packed[: BLOSC_HEADER_BYTES - 1]) is None


def test_header_problem_names_each_inconsistency():
    data = np.arange(4 * 64 * 64, dtype=np.uint16)
    packed = blosc.compress(data, b"lz4", 5, blosc.SHUFFLE)
    good = BloscHeader.parse(packed)
    assert header_problem(good, len(packed), data.nbytes) is None
    assert "not even a Blosc header" in str(header_problem(None, 5, data.nbytes))
    assert "truncated" in str(header_problem(good, len(packed) - 1, data.nbytes))
    assert "decodes to" in str(header_problem(good, len(packed), data.nbytes * 2))
    raw = blosc.compress(data, b"lz4", 0, blosc.SHUFFLE)
    short = bytearray(raw[:-100])
    short[12:16] = len(short).to_bytes(4, "little")
    problem = header_problem(BloscHeader.parse(bytes(short)), len(short), data.nbytes)
    assert "stored uncompressed but has" in str(problem)


def test_chunks_stored_compressed_and_uncompressed_both_read_like_zarr(tiny_store, tmp_path):
    store = tmp_path / "store.zarr"
    shutil.copytree(tiny_store, store)
    rng = np.random.default_rng(5)
    smooth = np.repeat(np.arange(4 * 64, dtype=np.uint16), 64).reshape(4, 64, 64)
    noise = rng.integers(0, 65535, (4, 64, 64), dtype=np.uint16)
    packed = {}
    for name, data in {"0/0/0": smooth, "1/0/1": noise, "0/1/1": smooth + 7}.items():
        packed[name] = blosc.compress(data, b"lz4", 5, blosc.SHUFFLE)
        (store / "1" / "volume" / "c" / name).write_bytes(packed[name])
    assert packed["0/0/0"][2] & 0x02 == 0 and len(packed["0/0/0"]) < smooth.nbytes  # compressed
    assert packed["1/0/1"][2] & 0x02 and len(packed["1/0/1"]) == noise.nbytes + 16  # stored raw
    frag = open_fragments(store, ["1"])[0]
    reader = ChunkReader(frag.volume)
    assert reader.root is not None  # the direct path, not zarr's
    for zs in (slice(0, 8), slice(2, 7)):
        for by, bx in [(0, 0), (0, 1), (1, 0), (1, 1)]:
            block = reader.read_block(zs, by, bx)
            part = frag.volume[zs, by * 64 : by * 64 + 64, bx * 64 : bx * 64 + 64]
            np.testing.assert_array_equal(block[:, : part.shape[1], : part.shape[2]], part)
    np.testing.assert_array_equal(reader.read_block(slice(0, 4), 0, 0), smooth)
    np.testing.assert_array_equal(reader.read_block(slice(4, 8), 0, 1), noise)


@pytest.mark.parametrize("damage", ["truncate", "empty", "other size", "raw too short"])
def test_damaged_chunk_files_are_store_errors_not_crashes(tiny_store, tmp_path, damage):
    store = tmp_path / "store.zarr"
    shutil.copytree(tiny_store, store)
    chunk = store / "1" / "volume" / "c" / "1" / "0" / "1"
    data = chunk.read_bytes()
    if damage == "truncate":  # a valid header: Blosc alone would read past the end
        chunk.write_bytes(data[: len(data) // 2])
    elif damage == "empty":
        chunk.write_bytes(b"")
    elif damage == "other size":
        chunk.write_bytes(blosc.compress(np.zeros(100, np.uint16), b"lz4", 5, blosc.SHUFFLE))
    else:  # flagged "stored uncompressed", with sizes that agree but too few data bytes
        raw = blosc.compress(np.arange(4 * 64 * 64, dtype=np.uint16), b"lz4", 0, blosc.SHUFFLE)
        assert raw[2] & 0x02
        short = bytearray(raw[:-100])
        short[12:16] = len(short).to_bytes(4, "little")
        chunk.write_bytes(bytes(short))
    frag = open_fragments(store, ["1"])[0]
    expect = {
        "truncate": "truncated",
        "empty": "not even a Blosc header",
        "other size": "200",
        "raw too short": "stored uncompressed but has",
    }
    with pytest.raises(StoreError, match=expect[damage]):
        BlockCache([frag.volume], LayerRange(3, 9), budget_mb=1).read(0, 0, 40, 32)


@pytest.mark.parametrize(
    ("codec", "clevel", "shuffle"),
    [("lz4", 5, "shuffle"), ("zstd", 3, "bitshuffle"), ("lz4", 0, "noshuffle")],
)
def test_chunk_writer_writes_what_zarr_reads_chunk_by_chunk(tmp_path, codec, clevel, shuffle):
    import zarr
    from zarr.codecs import BloscCodec

    from inkpipe.pipeline.chunks import ChunkWriter

    rng = np.random.default_rng(7)
    data = rng.integers(0, 65535, (6, 100, 90), dtype=np.uint16)
    data[:4, :64, :64] = 0  # an all-fill chunk: neither Zarr nor the writer stores it
    data[4:, 64:, :] = np.arange(90, dtype=np.uint16)  # compressible edge chunks

    def array(name):
        g = zarr.open_group(tmp_path / name, mode="a", zarr_format=3)
        return g.create_array(
            "volume",
            shape=data.shape,
            dtype="uint16",
            chunks=(4, 64, 64),
            compressors=BloscCodec(cname=codec, clevel=clevel, shuffle=shuffle),
            fill_value=0,
        )

    ours, theirs = array("ours.zarr"), array("theirs.zarr")
    theirs[...] = data
    writer = ChunkWriter.for_array(ours)
    assert writer is not None and writer.chunks == (4, 64, 64)
    assert (writer.cname, writer.clevel, writer.shuffle) == (codec, clevel, shuffle)
    for zc in range(2):
        for yc in range(2):
            for xc in range(2):
                chunk = np.zeros((4, 64, 64), np.uint16)
                part = data[zc * 4 : zc * 4 + 4, yc * 64 : yc * 64 + 64, xc * 64 : xc * 64 + 64]
                chunk[: part.shape[0], : part.shape[1], : part.shape[2]] = part
                writer.write((zc, yc, xc), writer.encode(chunk, padded=part.shape != chunk.shape))

    def files(name):
        root = tmp_path / name / "volume" / "c"
        return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())

    assert files("ours.zarr") == files("theirs.zarr")  # the same chunks, fill ones absent
    assert "0/0/0" not in files("ours.zarr")
    # the padded chunk is compressed even at level 0 (its fill is 65 % of it)
    edge = chunk_path(writer.root, (1, 1, 1)).stat().st_size
    assert edge < 4 * 64 * 64 * 2 * 0.6
    reread = zarr.open_array(tmp_path / "ours.zarr" / "volume", mode="r")
    np.testing.assert_array_equal(reread[...], data)
    for zc in range(2):
        for yc in range(2):
            for xc in range(2):
                sel = np.s_[zc * 4 : zc * 4 + 4, yc * 64 : yc * 64 + 64, xc * 64 : xc * 64 + 64]
                np.testing.assert_array_equal(reread[sel], theirs[sel])
    reader = ChunkReader(reread)
    assert reader.root is not None
    np.testing.assert_array_equal(
        reader.read_block(slice(0, 6), 1, 1)[:, :36, :26], data[:, 64:, 64:]
    )
    # a chunk rewritten as all fill drops its old file
    writer.write((1, 1, 1), writer.encode(np.zeros((4, 64, 64), np.uint16)))
    assert not chunk_path(writer.root, (1, 1, 1)).exists()


def test_chunk_writer_is_none_for_other_layouts(tmp_path):
    import zarr

    from inkpipe.pipeline.chunks import ChunkWriter

    g = zarr.open_group(tmp_path / "s.zarr", mode="w", zarr_format=3)
    sharded = g.create_array(
        "v", shape=(8, 128, 128), dtype="uint16", chunks=(4, 64, 64), shards=(8, 128, 128)
    )
    assert ChunkWriter.for_array(sharded) is None
