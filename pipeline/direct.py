"""Direct I/O (``O_DIRECT``): read and write files past the page cache.

Ingest reads every byte of a CT slice once and writes every chunk once, so the page cache only
costs it: the kernel allocates, fills, reclaims and writes back a page for each 4 KiB. On the
benchmark machine that was most of ingest's CPU at fragment-2 size: reading cold slices cost
1.0-2.7 s of CPU a GB buffered and 0.14-0.19 s with ``O_DIRECT``; writing 2 MB chunk files
1.5-3.6 s a GB buffered, 0.65-0.94 s with ``O_DIRECT`` (``python
benchmarks/bench_direct_io.py``; the README has the figures).

``O_DIRECT`` wants the file offset, the length and the memory address aligned to the device's
block (:data:`ALIGN` covers 512 B and 4 KiB devices): reads take the aligned span around the
wanted bytes into an aligned scratch buffer and copy them out; writes pad the file's bytes to
the block in a scratch buffer and cut the file back to its size. Where the file system refuses
``O_DIRECT`` (tmpfs on older kernels, some FUSE or network mounts, any OS without it) the
functions say so (None / False) and the caller uses ordinary I/O: the bytes are the same.
"""

from __future__ import annotations

import errno
import mmap
import os
import threading
from pathlib import Path

__all__ = ["ALIGN", "open_direct", "read_direct", "write_direct"]

ALIGN = 4096  # bytes: offsets, lengths and addresses of direct I/O are multiples of this

_SCRATCH = threading.local()  # one aligned buffer per thread, grown as needed


def _scratch(nbytes: int) -> memoryview:
    """Return this thread's page-aligned scratch buffer of at least ``nbytes`` bytes."""
    buf: mmap.mmap | None = getattr(_SCRATCH, "buf", None)
    if buf is None or len(buf) < nbytes:
        buf = mmap.mmap(-1, _round_up(nbytes))  # anonymous mappings start on a page
        _SCRATCH.buf = buf
    return memoryview(buf)


def _round_up(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def open_direct(path: Path, flags: int, mode: int = 0o644) -> int | None:
    """Open ``path`` with ``flags | O_DIRECT``; None where the OS or file system refuses it.

    Other errors (a missing file, no permission, a full disk) are raised as by ``os.open``.
    """
    direct = getattr(os, "O_DIRECT", 0)
    if not direct:
        return None
    try:
        return os.open(path, flags | direct, mode)
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
            return None
        raise


def read_direct(path: Path, offset: int, out: memoryview) -> int | None:
    """Read ``len(out)`` bytes of ``path`` from ``offset`` into ``out`` with ``O_DIRECT``.

    Args:
        path: the file.
        offset: byte offset of the first byte wanted (any alignment).
        out: writable byte buffer (``memoryview`` cast to ``"B"``), any alignment.

    Returns:
        bytes copied into ``out`` (fewer than ``len(out)`` only at the end of the file), or
        None if direct I/O is not possible here: the caller reads the ordinary way.
    """
    fd = open_direct(path, os.O_RDONLY)
    if fd is None:
        return None
    try:
        start = offset - offset % ALIGN
        span = _round_up(offset + len(out)) - start
        buf = _scratch(span)
        try:
            got = os.preadv(fd, [buf[:span]], start)
        except OSError as exc:
            if exc.errno == errno.EINVAL:  # opened, but this file system wants other sizes
                return None
            raise
    finally:
        os.close(fd)
    n = max(0, min(len(out), got - (offset - start)))
    out[:n] = buf[offset - start : offset - start + n]
    return n


def write_direct(path: Path, data: bytes | memoryview) -> bool:
    """Write ``data`` as the whole content of ``path`` with ``O_DIRECT``; False if not possible.

    The bytes go to the disk as this call returns (not to the page cache), padded to
    :data:`ALIGN`, and the file is cut back to ``len(data)``. On False nothing useful was
    written: the caller writes the file the ordinary way (which truncates it again).
    """
    fd = open_direct(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    if fd is None:
        return False
    try:
        n = len(data)
        padded = _round_up(n)
        buf = _scratch(padded)
        buf[:n] = data
        buf[n:padded] = bytes(padded - n)
        done = 0
        try:
            while done < padded:
                done += os.write(fd, buf[done:padded])
        except OSError as exc:
            if exc.errno == errno.EINVAL and done == 0:
                return False
            raise
        os.ftruncate(fd, n)
        return True
    finally:
        os.close(fd)
