"""The chunk files of a stored volume: where they are, what their bytes say, how to read them.

The store (:mod:`inkpipe.pipeline.store`) writes each fragment's ``volume`` as a Zarr v3 array
with Zarr's default chunk-key encoding, no sharding, and the codecs ``bytes`` (little-endian)
then ``blosc``. Its chunk files then lie, and hold, this::

    <fragment id>/volume/c/<z chunk>/<y chunk>/<x chunk>    one file a chunk; absent = fill

    offset  bytes  Blosc (1.x) frame header, little-endian
       0      1    format version
       1      1    codec format version
       2      1    flags: BLOSC_MEMCPYED = the data follows the header as is
       3      1    type size (2 for uint16)
       4      4    decoded size: a whole chunk's bytes, cz * cy * cx * 2
       8      4    Blosc block size
      12      4    stored size: the whole file, header included
      16      …    the (compressed, or for BLOSC_MEMCPYED raw) data

:class:`ChunkReader` reads chunk files of that layout directly (see its docstring for why)
and decodes them into (k, B, B) uint16 blocks, B = the chunk's height/width, checking each
header first: Blosc trusts those sizes and would read past the end of a truncated file.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import zarr
from numcodecs import blosc
from numpy.typing import NDArray
from zarr.codecs import BloscCodec, BytesCodec
from zarr.storage import LocalStore

from .direct import write_direct
from .errors import StoreError

CHUNK_KEY_PREFIX = "c"  # Zarr v3 default chunk-key encoding: c/<z>/<y>/<x>
CHUNK_KEY_SEPARATOR = "/"
BLOSC_HEADER_BYTES = 16  # bytes before a chunk file's data (the table in the module docstring)
BLOSC_FLAGS_OFFSET = 2  # byte of the header holding the flags
BLOSC_MEMCPYED = 0x02  # flag: the data follows the header uncompressed and unshuffled
_HEADER = struct.Struct("<4B3I")  # the header's 4 single bytes, then 3 x uint32 sizes
assert _HEADER.size == BLOSC_HEADER_BYTES


class VolumeArray(Protocol):
    """A (z, H, W) uint16 array read by slicing: a Zarr array, or an adapter around any source.

    :class:`ChunkReader` reads blocks of ``chunks[1] x chunks[2]`` px from it (an adapter such
    as :class:`inkpipe.infer.sources.SourceVolume` chooses its block size there).
    """

    @property
    def shape(self) -> tuple[int, ...]:
        """(z, H, W)."""
        ...

    @property
    def chunks(self) -> tuple[int, ...]:
        """Chunk (z, y, x): the block size a reader uses."""
        ...

    @property
    def fill_value(self) -> Any:
        """What never-written chunks hold."""
        ...

    def __getitem__(self, key: Any) -> Any:
        """Return ``array[key]`` as uint16."""
        ...


def chunk_key(index: tuple[int, ...]) -> str:
    """Return the store key of the chunk at grid ``index`` (z, y, x), e.g. ``"c/0/1/2"``."""
    return CHUNK_KEY_SEPARATOR.join((CHUNK_KEY_PREFIX, *map(str, index)))


def chunk_path(array_dir: Path, index: tuple[int, ...]) -> Path:
    """Return the file of the chunk at grid ``index`` (z, y, x) of the array in ``array_dir``."""
    return array_dir.joinpath(CHUNK_KEY_PREFIX, *map(str, index))


@dataclass(frozen=True)
class BloscHeader:
    """The header at the start of a chunk file (layout in the module docstring).

    Attributes:
        version, codec_version: Blosc format and codec format versions.
        flags: flag bits (:data:`BLOSC_MEMCPYED` among them).
        type_bytes: the element size the data was shuffled by.
        decoded_bytes: bytes the chunk decodes to.
        block_bytes: Blosc's internal block size.
        stored_bytes: bytes of the whole file, header included.
    """

    version: int
    codec_version: int
    flags: int
    type_bytes: int
    decoded_bytes: int
    block_bytes: int
    stored_bytes: int

    @classmethod
    def parse(cls, head: bytes) -> BloscHeader | None:
        """Parse a file's first bytes; None if there are fewer than :data:`BLOSC_HEADER_BYTES`."""
        if len(head) < BLOSC_HEADER_BYTES:
            return None
        return cls(*_HEADER.unpack_from(head))

    @property
    def stored_raw(self) -> bool:
        """Whether the data follows the header as is (it did not compress)."""
        return bool(self.flags & BLOSC_MEMCPYED)


def header_problem(header: BloscHeader | None, file_bytes: int, chunk_bytes: int) -> str | None:
    """Say what is wrong with a chunk file, judged by its header, or return None.

    Args:
        header: the parsed header, or None if the file is shorter than one.
        file_bytes: the file's size.
        chunk_bytes: bytes of one decoded chunk of the array.
    """
    if header is None:
        return f"it holds {file_bytes} bytes, not even a Blosc header"
    if header.stored_bytes != file_bytes:
        return (
            f"its header says {header.stored_bytes} bytes but the file has {file_bytes} "
            "(truncated?)"
        )
    if header.decoded_bytes != chunk_bytes:
        return f"it decodes to {header.decoded_bytes} bytes, not the {chunk_bytes} of a chunk"
    if header.stored_raw and file_bytes != BLOSC_HEADER_BYTES + chunk_bytes:
        return (
            f"it says it is stored uncompressed but has {file_bytes} bytes, not "
            f"{BLOSC_HEADER_BYTES + chunk_bytes}"
        )
    return None


def direct_read_dir(volume: VolumeArray) -> Path | None:
    """Return the folder of ``volume``'s chunk files if they have this module's format, else None.

    That is a uint16 array in a local store, unsharded, with the ``bytes`` (little-endian) and
    ``blosc`` codecs and the default chunk-key encoding: what the store writes.
    """
    if not isinstance(volume, zarr.Array):
        return None
    try:
        meta = volume.metadata
        codecs: tuple[Any, ...] = tuple(getattr(meta, "codecs", ()))
        ok = (
            isinstance(volume.store, LocalStore)
            and volume.shards is None
            and len(codecs) == 2
            and isinstance(codecs[0], BytesCodec)
            and str(getattr(codecs[0].endian, "value", codecs[0].endian)) == "little"
            and isinstance(codecs[1], BloscCodec)
            and np.dtype(volume.dtype) == np.uint16
            and meta.encode_chunk_key((0, 0, 0)) == chunk_key((0, 0, 0))
        )
    except AttributeError:  # zarr v2 arrays, other metadata layouts
        return None
    return Path(getattr(volume.store, "root", "")) / volume.path if ok else None


def mapped_empty(shape: tuple[int, ...], dtype: Any = np.uint16) -> NDArray[Any]:
    """Return a new uninitialised array in its own anonymous memory mapping.

    Unlike ``np.empty``, this skips numpy's transparent-huge-page advice for arrays >= 4 MB:
    where the kernel has to compact memory to find huge pages, first touch then costs ~5 ms a
    2 MB page instead of ~0.8 ms (measured on the 2-core benchmark machines), which made a
    cold block cache 3x slower to fill. The mapping is released with the array.
    """
    count = int(np.prod(shape))
    buf = mmap.mmap(-1, max(count * np.dtype(dtype).itemsize, 1))
    return np.frombuffer(buf, dtype=dtype, count=count).reshape(shape)


class ChunkReader:
    """Read (k, B, B) blocks of a (z, H, W) uint16 volume, B = the chunk height/width.

    Zarr's general codec pipeline costs ~5 ms a chunk here, ~7x the work itself (reading a
    2 MB chunk file and Blosc-decoding it takes ~0.7 ms). For the arrays inkpipe writes (see
    :func:`direct_read_dir`) this reader opens the chunk files and decodes them with numcodecs
    directly; any other array is read through Zarr.

    Args:
        volume: (z, H, W) uint16 Zarr array (or any :class:`VolumeArray`).

    Attributes:
        root: the folder of the chunk files read directly, or None (read through Zarr).
    """

    def __init__(self, volume: VolumeArray) -> None:
        self.volume = volume
        self.shape = tuple(int(s) for s in volume.shape)
        self.chunks = tuple(int(c) for c in volume.chunks)
        self.root = direct_read_dir(volume)
        self._local = threading.local()  # a thread's read buffer and scratch chunk

    def block_shape(self, zs: slice) -> tuple[int, int, int]:
        """Return the (k, B, B) shape of the blocks :meth:`read_block` fills for layers ``zs``."""
        return (zs.stop - zs.start, self.chunks[1], self.chunks[2])

    def read_block(
        self, zs: slice, by: int, bx: int, out: NDArray[np.uint16] | None = None
    ) -> NDArray[np.uint16]:
        """Return layers ``zs`` of chunk column (by, bx) as a (k, B, B) uint16 block.

        Blocks always have the full chunk size; past the volume's edge they hold the fill
        value. ``out``, if given, must have :meth:`block_shape` and is filled and returned:
        reusing memory avoids first-touch page faults, which cost more than decoding here.

        Raises:
            StoreError: a chunk file is damaged (see :func:`header_problem`).
        """
        cz, cy, cx = self.chunks
        shape = self.block_shape(zs)
        if out is None:
            out = mapped_empty(shape)
        if self.root is None:
            _, h, w = self.shape
            y0, x0 = by * cy, bx * cx
            data = np.asarray(self.volume[zs, y0 : min(y0 + cy, h), x0 : min(x0 + cx, w)])
            out[:, : data.shape[1], : data.shape[2]] = data
            out[:, data.shape[1] :] = 0
            out[:, :, data.shape[2] :] = 0
            return out
        fill = self.volume.fill_value or 0  # what chunks never written hold
        for zc in range(zs.start // cz, (zs.stop - 1) // cz + 1):
            z0, z1 = max(zs.start, zc * cz), min(zs.stop, (zc + 1) * cz)
            dst = out[z0 - zs.start : z1 - zs.start]
            path = chunk_path(self.root, (zc, by, bx))
            if z1 - z0 == cz:  # a whole chunk: decode straight into the block
                if not self._decode_file(path, dst):
                    dst[...] = fill
                continue
            scratch = getattr(self._local, "scratch", None)
            if scratch is None:
                scratch = self._local.scratch = np.empty((cz, cy, cx), dtype=np.uint16)
            if not self._decode_file(path, scratch):
                scratch[...] = fill
            dst[...] = scratch[z0 - zc * cz : z1 - zc * cz]
        return out

    def _decode_file(self, path: Path, dst: NDArray[np.uint16]) -> bool:
        """Decode chunk file ``path`` into ``dst`` (one whole chunk); False if never written.

        A chunk Blosc stored uncompressed (:data:`BLOSC_MEMCPYED`: the data did not compress)
        is read straight into ``dst``, one copy instead of two; any other is read into this
        thread's reusable buffer (no new memory per chunk) and decoded from there.

        Raises:
            StoreError: the file is not a Blosc chunk of this array (damaged or truncated).
        """
        try:
            with open(path, "rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                head = fh.read(BLOSC_HEADER_BYTES)
                header = BloscHeader.parse(head)
                problem = header_problem(header, size, dst.nbytes)
                if problem is None and header is not None and header.stored_raw:
                    got = fh.readinto(dst.data.cast("B"))
                    if got == dst.nbytes:
                        return True
                    problem = f"it ends after {got} of its {dst.nbytes} data bytes"
                if problem is None:
                    buf = getattr(self._local, "buf", None)
                    if buf is None or len(buf) < size:
                        buf = self._local.buf = bytearray(max(size, dst.nbytes + 4096))
                    buf[:BLOSC_HEADER_BYTES] = head
                    view = memoryview(buf)[BLOSC_HEADER_BYTES:size]
                    got = fh.readinto(view)
                    if got == len(view):
                        try:
                            blosc.decompress(memoryview(buf)[:size], dst)
                            return True
                        except Exception as exc:  # numcodecs raises RuntimeError/ValueError
                            problem = f"Blosc cannot decode it ({exc})"
                    else:
                        problem = f"it changed while being read ({got} of {len(view)} bytes)"
        except FileNotFoundError:
            return False
        frag = self.root.parent.name if self.root is not None else "?"
        raise StoreError(
            f"store chunk file {path} is damaged: {problem}. The store was changed or its "
            f"writing interrupted; re-ingest fragment {frag!r} with "
            "`inkpipe ingest FRAGMENTS --out STORE --overwrite`"
        )


BLOSC_SHUFFLES = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}  # numcodecs' shuffle codes


def start_writeback(fd: int) -> None:
    """Start writing a just-written file's pages to its disk, without waiting for it.

    ``POSIX_FADV_DONTNEED`` starts the writeback of dirty pages (and drops the pages already
    clean), so the disk writes while ingest goes on and the final ``syncfs`` finds little
    left: at fragment-1 size the sync fell from 1.4 s to 0 (``bench_ingest.py``), and trial
    runs from a cold disk were ~10 % faster. The data stay in the page cache until written. A
    hint only: nothing happens where it is not supported.
    """
    if hasattr(os, "posix_fadvise"):
        with contextlib.suppress(OSError):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


@dataclass(frozen=True)
class ChunkWriter:
    """Write whole chunks of a uint16 volume as chunk files of this module's layout.

    The writing twin of :class:`ChunkReader`: each chunk is Blosc-encoded with the array's own
    codec settings and written to :func:`chunk_path`, the file Zarr itself would write, so
    zarr-python (and any Zarr v3 reader) reads the array as usual. A chunk holding only the
    fill value (0) is not written, as Zarr does not write it either. It skips Zarr's general
    codec pipeline, whose per-chunk cost (asyncio tasks, an ``all_equal`` test of every chunk
    against the fill value) exceeded the encoding itself in ingest. Frozen and small, so it
    pickles to dask workers.

    Attributes:
        root: the array's folder (``<fragment>/volume``).
        chunks: chunk shape (cz, cy, cx).
        cname, clevel, shuffle: the Blosc settings of the array's ``blosc`` codec.
        direct: write each file past the page cache (``O_DIRECT``,
            :func:`~inkpipe.pipeline.direct.write_direct`) where the file system allows it;
            otherwise, and with False, write it the ordinary way and start its writeback.
    """

    root: Path
    chunks: tuple[int, int, int]
    cname: str
    clevel: int
    shuffle: str
    direct: bool = False

    @classmethod
    def for_array(cls, volume: zarr.Array, direct: bool = False) -> ChunkWriter | None:
        """Return a writer for ``volume``'s chunk files, or None if they have another format."""
        root = direct_read_dir(volume)
        if root is None:
            return None
        codec: Any = volume.metadata.codecs[1]  # type: ignore[union-attr]
        cz, cy, cx = (int(c) for c in volume.chunks)
        return cls(
            root,
            (cz, cy, cx),
            str(getattr(codec.cname, "value", codec.cname)),
            int(codec.clevel),
            str(getattr(codec.shuffle, "value", codec.shuffle)),
            direct,
        )

    def encode(self, chunk: NDArray[np.uint16], padded: bool = False) -> bytes | None:
        """Return one whole (cz, cy, cx) C-contiguous uint16 chunk's file bytes; None if all 0.

        A ``padded`` chunk (one past the volume's edge, partly fill) is compressed at level 1
        at least, even in an array of level 0: its fill compresses to nearly nothing (at the
        size of fragment 1, padding is 10 % of the chunks' bytes). Any Blosc decoder reads it,
        as a Blosc frame says how it was compressed.
        """
        clevel = max(self.clevel, 1) if padded else self.clevel
        data = blosc.compress(chunk, self.cname.encode(), clevel, BLOSC_SHUFFLES[self.shuffle], 0)
        # Only a chunk that compressed well can be all zeros: test those alone (at level 0
        # nothing compresses, so test all).
        if (clevel == 0 or len(data) < chunk.nbytes // 2) and not chunk.any():
            return None
        return bytes(data)

    def write(self, index: tuple[int, int, int], data: bytes | None) -> None:
        """Write a chunk's encoded bytes (from :meth:`encode`) at grid ``index`` (z, y, x).

        ``None`` (all fill) removes any older file, so the chunk reads as fill.
        """
        path = chunk_path(self.root, index)
        if data is None:
            path.unlink(missing_ok=True)
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        if self.direct and write_direct(path, data):
            return
        with open(path, "wb") as fh:
            fh.write(data)
            start_writeback(fh.fileno())
