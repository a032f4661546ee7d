"""What the page cache costs ingest: CPU seconds a GB of cold reads and of chunk-file writes.

    python benchmarks/bench_direct_io.py SLICES_DIR [--slices 16] [--write-gb 4.5]
        [--workdir DIR]

Reads: the first ``--slices`` TIFF slices of SLICES_DIR (a fragment's ``surface_volume``, on
the disk under test), dropped from the page cache first, read as ingest reads them (bands of
512 rows, four slices side by side, one ``preadv`` each): ordinary reads, the same with
``POSIX_FADV_WILLNEED`` for the next band, and ``O_DIRECT`` reads
(:func:`inkpipe.pipeline.direct.read_direct`). Writes: ``--write-gb`` of 2 MB chunk files (the
default chunk, stored as is) in ``--workdir`` (default: beside SLICES_DIR), ``sync`` included:
ordinary writes, the same with the writeback started per file (``POSIX_FADV_DONTNEED``, as
ingest did), and ``O_DIRECT`` writes (:func:`inkpipe.pipeline.direct.write_direct`). Prints
wall-clock MB/s and the process's CPU seconds a GB for each.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

import numpy as np
from _common import evict

from inkpipe.pipeline.direct import read_direct, write_direct
from inkpipe.pipeline.tiff import inspect_slice

BAND_ROWS = 512
BAND_LAYERS = 4
CHUNK_BYTES = 2 * 1024 * 1024 + 16  # a 4 x 512 x 512 uint16 chunk in a Blosc frame


def read_all(paths: list[Path], mode: str) -> tuple[float, float, int]:
    """Read the slices band by band; return (wall s, CPU s, bytes)."""
    infos = [inspect_slice(p) for p in paths]
    height, width = infos[0].shape
    row_bytes = width * 2
    out = np.empty(BAND_ROWS * row_bytes, np.uint8)
    total = 0
    t0, c0 = time.perf_counter(), time.process_time()
    fds = {} if mode == "direct" else {i.path: os.open(i.path, os.O_RDONLY) for i in infos}
    try:
        for g in range(0, len(infos), BAND_LAYERS):
            for y0 in range(0, height, BAND_ROWS):
                y1 = min(y0 + BAND_ROWS, height)
                for info in infos[g : g + BAND_LAYERS]:
                    start, view = info.offset + y0 * row_bytes, out.data[: (y1 - y0) * row_bytes]
                    if mode == "direct":
                        got = read_direct(info.path, start, view)
                        assert got is not None, "this file system refuses O_DIRECT"
                    else:
                        fd = fds[info.path]
                        if mode == "willneed" and y1 < height:
                            os.posix_fadvise(
                                fd, start + len(view), BAND_ROWS * row_bytes, os.POSIX_FADV_WILLNEED
                            )
                        got = os.preadv(fd, [view], start)
                    total += got
    finally:
        for fd in fds.values():
            os.close(fd)
    return time.perf_counter() - t0, time.process_time() - c0, total


def write_all(folder: Path, gb: float, mode: str) -> tuple[float, float, int]:
    """Write ``gb`` of chunk files into ``folder``, then sync; return (wall s, CPU s, bytes)."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    data = np.random.default_rng(0).integers(0, 256, CHUNK_BYTES, dtype=np.uint8).tobytes()
    n = int(gb * 1e9 / CHUNK_BYTES)
    os.sync()
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(n):
        path = folder / str(i)
        if mode == "direct":
            assert write_direct(path, data), "this file system refuses O_DIRECT"
            continue
        with open(path, "wb") as fh:
            fh.write(data)
            if mode == "dontneed":
                os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    os.sync()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    shutil.rmtree(folder)
    return wall, cpu, n * CHUNK_BYTES


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("slices_dir", type=Path, help="a surface_volume folder of TIFF slices")
    ap.add_argument("--slices", type=int, default=16, help="slices to read")
    ap.add_argument("--write-gb", type=float, default=4.5, help="GB of chunk files to write")
    ap.add_argument("--workdir", type=Path, help="where to write (default: beside the slices)")
    args = ap.parse_args()
    paths = sorted(args.slices_dir.glob("*.tif"))[: args.slices]
    if not paths:
        raise SystemExit(f"no *.tif in {args.slices_dir}; pass a fragment's surface_volume")
    folder = (args.workdir or args.slices_dir.parent) / "bench_direct_io_files"
    print("| what | mode | GB | wall s | MB/s | CPU s a GB |")
    print("|---|---|---|---|---|---|")
    for mode in ("buffered", "willneed", "direct"):
        evict(paths)
        wall, cpu, nbytes = read_all(paths, mode)
        print(
            f"| read cold slices | {mode} | {nbytes / 1e9:.2f} | {wall:.1f} | "
            f"{nbytes / 1e6 / wall:.0f} | {cpu / nbytes * 1e9:.2f} |",
            flush=True,
        )
    for mode in ("buffered", "dontneed", "direct"):
        wall, cpu, nbytes = write_all(folder, args.write_gb, mode)
        print(
            f"| write 2 MB chunk files + sync | {mode} | {nbytes / 1e9:.2f} | {wall:.1f} | "
            f"{nbytes / 1e6 / wall:.0f} | {cpu / nbytes * 1e9:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
