"""Ingest benchmark at real size: throughput vs cp, peak RSS, store size, crop reads/s.

    python benchmarks/bench_ingest.py [--height 8181 --width 6330] [--workdir /tmp/inkbench]
    python benchmarks/bench_ingest.py --ceiling [--store-dir /dev/shm]   # CPU ceiling
    python benchmarks/bench_ingest.py --tile-from DIR ...   # build the fragment by tiling DIR

On one real-size synthetic fragment (8181 x 6330 x 65 uint16, ~6.7 GB of TIFFs), from a cold
page cache: ``cp -r`` + ``sync`` of the TIFFs (this machine's read-and-write limit), then
``inkpipe ingest`` + ``sync`` in a fresh process (throughput, peak RSS), the store's size and
compression ratio, and random 224 x 224 x 10 crop reads per second from the store for the
default chunking next to two alternatives and next to memmapped raw TIFFs, all on the same
crops (region-ordered as the training sampler draws them). Each ingest also prints where its
time went (:attr:`~inkpipe.pipeline.ingest.FragmentResult.stages`: the CPU seconds of the
band stages read, statistics, encode and write, the wall seconds of the rest) and the
process's CPU seconds.

``--ceiling`` measures what ingest can do when the disk is not the limit: the TIFFs read once
into the page cache, the store on a RAM disk (``--store-dir``, default ``/dev/shm``: it holds
the whole store in RAM, so mind its size), no ``cp`` and no crop reads; ingest reads and
writes through the page cache there (``direct_io=False``: ``O_DIRECT`` would read the slices
from the disk again). ``--buffered-io`` runs the other measurements that way too.

``--ceiling-direct`` measures the same ceiling for the default direct I/O: the fragment and the
store on a block device that is itself RAM, so ``O_DIRECT`` reads and writes cost no disk time
(root; the kernel's loop thread that copies into RAM takes CPU from the same two cores, which a
real disk does not, so this ceiling is the lower one)::

    truncate -s 15G /dev/shm/fast.img && mkfs.ext4 -q -F -m 0 /dev/shm/fast.img
    mkdir -p /mnt/fast && mount -o loop /dev/shm/fast.img /mnt/fast
    python benchmarks/bench_ingest.py --ceiling-direct --workdir /mnt/fast --tile-from DIR
    umount /mnt/fast && rm /dev/shm/fast.img

(fragment-1 size: 6.7 GB of TIFFs + 6.8 GB of store in RAM; ``--height 6000 --width 5000``
needs half.)
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import tifffile
from _common import RSS_SUFFIX, ensure_fragment, evict, run_measured, tile_fragment, tree_bytes

from inkpipe.pipeline.layers import LayerRange
from inkpipe.pipeline.store import open_fragments
from inkpipe.pipeline.volume import BlockCache
from inkpipe.train.data import WindowSampler, WindowSet

ALTERNATIVES = [  # (label, chunk_layers, chunk_px, codec, clevel, shuffle)
    ("4x512x512 stored as is, level 0 (default)", 4, 512, "lz4", 0, "shuffle"),
    ("4x512x512 lz4-5 + byte shuffle (the old default)", 4, 512, "lz4", 5, "shuffle"),
    ("4x512x512 lz4-5 + bit-shuffle", 4, 512, "lz4", 5, "bitshuffle"),
    ("8x256x256 zstd-5 + bit-shuffle", 8, 256, "zstd", 5, "bitshuffle"),
]


def store_name(chunk_layers: int, chunk_px: int, codec: str, clevel: int, shuffle: str) -> str:
    """The folder name a store of these settings gets in the work folder."""
    return f"store_{chunk_layers}_{chunk_px}_{codec}{clevel}_{shuffle}.zarr"


def ingest_code(
    root: Path,
    out: Path,
    chunk_layers: int,
    chunk_px: int,
    codec: str,
    clevel: int,
    shuffle: str,
    direct_io: bool = True,
) -> str:
    return (
        f"""
import json, os, resource
from pathlib import Path
import inkpipe.cli.pipeline  # what `inkpipe ingest` imports counts in its start-up and RSS
from inkpipe.pipeline.ingest import IngestConfig, ingest
from inkpipe.pipeline.store import StoreSettings
s = StoreSettings(chunk_layers={chunk_layers}, chunk_px={chunk_px}, codec={codec!r},
                  clevel={clevel}, shuffle={shuffle!r})
r = ingest(IngestConfig(root=Path({str(root)!r}), out=Path({str(out)!r}), settings=s, workers=2,
                        progress=False, direct_io={direct_io!r}), log=lambda m: None)
os.sync()
ru = resource.getrusage(resource.RUSAGE_SELF)
print("STAGES", json.dumps({{**r[0].stages, "process_cpu": ru.ru_utime + ru.ru_stime}}))
"""
        + RSS_SUFFIX
    )


def stages_of(stdout: str) -> dict[str, float]:
    """The stage seconds an ingest run printed (``STAGES {json}``)."""
    for line in stdout.splitlines():
        if line.startswith("STAGES "):
            return dict(json.loads(line[len("STAGES ") :]))
    return {}


BAND_STAGES = ("read", "statistics", "encode", "write")


def format_stages(stages: dict[str, float]) -> str:
    """One line: CPU seconds and shares of the band stages, then the other stages' seconds."""
    band = sum(stages.get(k, 0.0) for k in BAND_STAGES) or 1.0
    parts = [
        f"{k} {stages.get(k, 0):.1f} s CPU ({stages.get(k, 0) / band:.0%})" for k in BAND_STAGES
    ]
    rest = ("volume_wall", "planes", "planes_overlapped", "windows", "fsync", "process_cpu")
    parts += [f"{k} {stages[k]:.1f} s" for k in rest if k in stages]
    return ", ".join(parts)


def ceiling(
    frag: Path, tiffs: list[Path], in_bytes: int, store_dir: Path, direct: bool = False
) -> None:
    """Ingest where the disk is not the limit: the CPU ceiling.

    ``direct=False``: the TIFFs in the page cache, the store on a RAM disk, buffered I/O.
    ``direct=True``: direct I/O with the fragment and ``store_dir`` on a RAM-backed block
    device (see the module's docstring), the TIFFs out of the page cache.
    """
    out = store_dir / "inkbench_ceiling.zarr"
    shutil.rmtree(out, ignore_errors=True)
    if direct:
        evict(tiffs)
    else:
        for p in tiffs:  # into the page cache
            with open(p, "rb") as fh:
                while fh.read(1 << 24):
                    pass
    try:
        # direct=False reads the page cache (O_DIRECT there would read the disk again).
        code = ingest_code(frag.parent.parent, out, *ALTERNATIVES[0][1:], direct_io=direct)
        secs, rss, stdout = run_measured(code)
        size = tree_bytes(out)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    where = (
        f"direct I/O, fragment and store on the RAM-backed device of {store_dir}"
        if direct
        else f"TIFFs in page cache, store in {store_dir}"
    )
    print(
        f"CPU ceiling ({where}), default settings: "
        f"{secs:.1f} s, {in_bytes / 1e6 / secs:.0f} MB/s, peak RSS {rss:.0f} MB, "
        f"store {size / 1e9:.2f} GB\n  stages: {format_stages(stages_of(stdout))}",
        flush=True,
    )


def crop_rates(store: Path, crops: np.ndarray, layers: LayerRange) -> tuple[float, float]:
    """Crops/s through the block cache (1 GB) and naive per-crop Zarr reads."""
    frag = open_fragments(store)[0]
    cache = BlockCache([frag.volume], layers, budget_mb=1024)
    t0 = time.perf_counter()
    for f, y, x in crops:
        cache.read(f, y, x, 224)
    cached = len(crops) / (time.perf_counter() - t0)
    vol = frag.volume
    n = min(len(crops), 300)
    t0 = time.perf_counter()
    for _, y, x in crops[:n]:
        np.asarray(vol[layers.as_slice(), y : y + 224, x : x + 224])
    naive = n / (time.perf_counter() - t0)
    return cached, naive


def memmap_rate(frag_dir: Path, crops: np.ndarray, layers: LayerRange) -> float:
    maps = [
        tifffile.memmap(frag_dir / "surface_volume" / f"{z:02d}.tif")
        for z in range(layers.start, layers.stop)
    ]
    t0 = time.perf_counter()
    for _, y, x in crops:
        np.stack([m[y : y + 224, x : x + 224] for m in maps])
    return len(crops) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--height", type=int, default=8181)
    ap.add_argument("--width", type=int, default=6330)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/inkbench"))
    ap.add_argument("--crops", type=int, default=3000)
    ap.add_argument("--skip-alternatives", action="store_true")
    ap.add_argument("--rows", type=int, default=len(ALTERNATIVES), help="first N settings only")
    ap.add_argument("--ceiling", action="store_true", help="only the CPU ceiling (see above)")
    ap.add_argument(
        "--ceiling-direct",
        action="store_true",
        help="only the CPU ceiling of direct I/O, --workdir on a RAM-backed block device",
    )
    ap.add_argument("--store-dir", type=Path, default=Path("/dev/shm"))
    ap.add_argument(
        "--buffered-io",
        action="store_true",
        help="ingest through the page cache (IngestConfig.direct_io=False), for comparison",
    )
    ap.add_argument(
        "--tile-from", type=Path, help="build the fragment by tiling this smaller fragment"
    )
    args = ap.parse_args()
    root = args.workdir / f"frag_{args.height}x{args.width}"
    if args.tile_from:
        frag = tile_fragment(args.tile_from, root, args.height, args.width)
    else:
        frag = ensure_fragment(root, args.height, args.width)
    tiffs = sorted((frag / "surface_volume").glob("*.tif"))
    in_bytes = sum(p.stat().st_size for p in tiffs)
    print(f"\ninput: {len(tiffs)} slices, {in_bytes / 1e9:.2f} GB")
    if args.ceiling:
        ceiling(frag, tiffs, in_bytes, args.store_dir)
        return
    if args.ceiling_direct:
        ceiling(frag, tiffs, in_bytes, args.workdir, direct=True)
        return

    dst = args.workdir / "cp_copy"
    shutil.rmtree(dst, ignore_errors=True)
    evict(tiffs)
    t0 = time.perf_counter()
    subprocess.run(["cp", "-r", str(frag / "surface_volume"), str(dst)], check=True)
    subprocess.run(["sync"], check=True)
    cp_s = time.perf_counter() - t0
    shutil.rmtree(dst)
    cp_rate = in_bytes / 1e6 / cp_s
    print(f"cp -r + sync (cold): {cp_s:.1f} s, {cp_rate:.0f} MB/s")

    rows = []
    layers = LayerRange(28, 38)
    h, w = args.height, args.width
    ys, xs = np.meshgrid(np.arange(0, h - 224, 112), np.arange(0, w - 224, 112), indexing="ij")
    win = np.column_stack([ys.ravel(), xs.ravel(), np.ones(ys.size), np.ones(ys.size)]).astype(
        np.int32
    )
    crops = WindowSampler([WindowSet(0, (h, w), win)], 224, args.crops, 16, seed=0).draw(0)
    for i, (label, cl, cp_, codec, clevel, shuffle) in enumerate(ALTERNATIVES):
        if (i and args.skip_alternatives) or i >= args.rows:
            break
        out = args.workdir / store_name(cl, cp_, codec, clevel, shuffle)
        shutil.rmtree(out, ignore_errors=True)
        evict(tiffs)
        secs, rss, stdout = run_measured(
            ingest_code(
                frag.parent.parent, out, cl, cp_, codec, clevel, shuffle, not args.buffered_io
            )
        )
        vol_bytes = tree_bytes(out / "1" / "volume")
        cached, naive = crop_rates(out, crops, layers)
        rows.append(
            (
                label,
                secs,
                in_bytes / 1e6 / secs,
                rss,
                tree_bytes(out),
                in_bytes / vol_bytes,
                cached,
                naive,
            )
        )
        print(
            f"{label}: ingest {secs:.1f} s ({in_bytes / 1e6 / secs:.0f} MB/s, {in_bytes / 1e6 / secs / cp_rate:.2f}x cp), "
            f"peak RSS {rss:.0f} MB, store {tree_bytes(out) / 1e9:.2f} GB, ratio {in_bytes / vol_bytes:.3f}, "
            f"crops/s cached {cached:.0f}, naive {naive:.0f}\n  stages: "
            f"{format_stages(stages_of(stdout))}",
            flush=True,
        )
        if i:
            shutil.rmtree(out)
    mm_warm = memmap_rate(frag, crops, layers)
    evict(tiffs)
    mm_cold = memmap_rate(frag, crops[:500], layers)

    print(
        f"\n### Ingest, {args.height}x{args.width}x65 synthetic fragment ({in_bytes / 1e9:.2f} GB of TIFFs), 2 cores"
    )
    print(f"\ncp -r + sync, cold cache: {cp_rate:.0f} MB/s\n")
    print(
        "| chunks, codec | ingest s | MB/s | x cp | peak RSS MB | store GB | ratio | crops/s (cache) | crops/s (naive zarr) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for label, secs, rate, rss, size, ratio, cached, naive in rows:
        print(
            f"| {label} | {secs:.1f} | {rate:.0f} | {rate / cp_rate:.2f} | {rss:.0f} | {size / 1e9:.2f} | {ratio:.3f} | {cached:.0f} | {naive:.0f} |"
        )
    print(
        f"\nmemmapped raw TIFFs, same {len(crops)} crops of 10 layers: {mm_warm:.0f} crops/s warm, "
        f"{mm_cold:.0f} crops/s cold (first 500)"
    )


if __name__ == "__main__":
    main()
