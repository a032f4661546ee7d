"""Write (and read back) one fragment's volume with each Zarr engine on the same work.

    python benchmarks/bench_engines.py FRAGMENTS ENGINE OUT.zarr
    # ENGINE: direct (inkpipe's ChunkWriter/ChunkReader), zarr (zarr-python), tensorstore
    # (its zarr3 driver), zarrs (zarr-python with the zarrs codec pipeline)

Each engine reads the fragment's slices in bands of 4 layers x 512 rows (``os.preadv``, as
ingest does) and writes a Zarr v3 volume of 4 x 512 x 512 chunks with Blosc LZ4-5 + byte
shuffle, two threads; then reads every chunk back. It prints wall and CPU seconds of both,
and checks a crop against the TIFFs. ``tensorstore`` and ``zarrs`` are not dependencies of
inkpipe: install them in another environment (or ``pip install --target DIR`` and
``PYTHONPATH=DIR``) to measure them.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import zarr

from inkpipe.pipeline.chunks import ChunkReader, ChunkWriter
from inkpipe.pipeline.fragments import check_fragment, discover_fragments
from inkpipe.pipeline.ingest import band_chunks
from inkpipe.pipeline.store import FragmentMeta, StoreSettings, begin_fragment, create_store
from inkpipe.pipeline.tiff import read_rows, read_rows_into


def main() -> None:
    frag = check_fragment(discover_fragments(Path(sys.argv[1]))[0])
    engine, out = sys.argv[2], Path(sys.argv[3])
    shutil.rmtree(out, ignore_errors=True)
    z, h, w = frag.shape
    settings = StoreSettings(clevel=5)
    meta = FragmentMeta("1", "train", frag.shape, False, False, {}, {})
    volume = begin_fragment(create_store(out), meta, settings)["volume"]
    assert isinstance(volume, zarr.Array)
    bands = [
        (z0, min(z0 + 4, z), y0, min(y0 + 512, h))
        for y0 in range(0, h, 512)
        for z0 in range(0, z, 4)
    ]

    def read(b: tuple[int, int, int, int]) -> np.ndarray:
        data = np.empty((b[1] - b[0], b[3] - b[2], w), np.uint16)
        for i in range(b[0], b[1]):
            read_rows_into(frag.slices[i], b[2], b[3], data[i - b[0]])
        return data

    t0, c0 = time.perf_counter(), time.process_time()
    if engine == "tensorstore":
        import tensorstore as ts

        ctx = ts.Context(
            {"data_copy_concurrency": {"limit": 2}, "file_io_concurrency": {"limit": 2}}
        )
        spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(out / "1" / "volume")}}
        arr = ts.open(spec, open=True, context=ctx).result()
        pending = []
        for b in bands:
            pending.append(arr[b[0] : b[1], b[2] : b[3], :].write(read(b)))
            if len(pending) > 4:
                pending.pop(0).result()
        for p in pending:
            p.result()
    elif engine == "direct":
        writer = ChunkWriter.for_array(volume)
        assert writer is not None

        def one(b: tuple[int, int, int, int]) -> None:
            for index, chunk, padded in band_chunks(writer.chunks, read(b), b):
                writer.write(index, writer.encode(chunk, padded))

        with ThreadPoolExecutor(2) as ex:
            list(ex.map(one, bands))
    elif engine in ("zarr", "zarrs"):
        if engine == "zarrs":
            import zarrs  # noqa: F401

            zarr.config.set({"codec_pipeline.path": "zarrs.ZarrsCodecPipeline"})
        target = zarr.open_array(out / "1" / "volume", mode="r+")

        def put(b: tuple[int, int, int, int]) -> None:
            target[b[0] : b[1], b[2] : b[3], :] = read(b)

        with ThreadPoolExecutor(2) as ex:
            list(ex.map(put, bands))
    else:
        raise SystemExit(f"unknown engine {engine!r}: direct, zarr, tensorstore or zarrs")
    mb = z * h * w * 2 / 1e6
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    print(
        json.dumps(
            {
                "engine": engine,
                "write_s": round(wall, 2),
                "write_cpu_s": round(cpu, 2),
                "write_MB/s": round(mb / wall),
            }
        )
    )

    t0, c0 = time.perf_counter(), time.process_time()
    if engine == "tensorstore":
        for y0 in range(0, h, 512):
            arr[:, y0 : y0 + 512, :].read().result()
    elif engine in ("zarr", "zarrs"):
        for y0 in range(0, h, 512):
            np.asarray(target[:, y0 : y0 + 512, :])
    else:
        reader = ChunkReader(zarr.open_array(out / "1" / "volume", mode="r"))
        block = None
        for by in range(-(-h // 512)):
            for bx in range(-(-w // 512)):
                block = reader.read_block(slice(0, z), by, bx, block)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    print(
        json.dumps(
            {
                "engine": engine,
                "read_s": round(wall, 2),
                "read_cpu_s": round(cpu, 2),
                "read_MB/s": round(mb / wall),
            }
        )
    )
    ref = zarr.open_array(out / "1" / "volume", mode="r")
    want = np.stack([read_rows(s, 100, 200)[:, 50:250] for s in frag.slices])
    assert np.array_equal(ref[:, 100:200, 50:250], want), "the volume differs from the TIFFs"
    shutil.rmtree(out)


if __name__ == "__main__":
    main()
