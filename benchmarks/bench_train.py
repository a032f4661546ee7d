"""Training benchmarks: loader throughput, training peak RSS, and training quality.

    python benchmarks/bench_train.py [--workdir /tmp/inkbench] [--minutes 6] [--quick]

1. Loader throughput (crops/s) for k = 10, 30, 65 on a real-size synthetic fragment
   (8181 x 6330 x 65; made by bench_ingest.py or here), on the crops the training sampler
   draws, in its order, raw (uint16) and normalised (float32, what training consumes): from
   the store as training reads it (bounded chunk cache, two threads), and from memmapped raw
   TIFFs (files in the page cache). Also the store in one thread and an in-memory NumPy
   array (the limit for one thread). glibc is told to keep freed memory, as training does.
2. Peak RSS of a short training run at k = 10 and k = 30, on the real-size store and on a
   small one: it must not grow with the fragment.
3. Quality: F0.5 on a held-out synthetic test fragment after a fixed CPU budget, both models.
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial
from pathlib import Path

import numpy as np
import tifffile
from _common import RSS_SUFFIX, ensure_fragment, run_measured

from inkpipe.pipeline.ingest import IngestConfig, ingest
from inkpipe.pipeline.layers import LayerRange
from inkpipe.pipeline.memory import retain_freed_memory
from inkpipe.pipeline.store import StoreSettings, open_fragments

LAYER_SETS = {10: LayerRange(28, 38), 30: LayerRange(18, 48), 65: LayerRange(0, 65)}


def _epochs(read, batches: list[list[list]]) -> list[float]:
    """Crops/s of ``read(batch)`` (an iterable of crops) over each epoch's batches."""
    rates = []
    for epoch in batches:
        n = sum(len(b) for b in epoch)
        t0 = time.perf_counter()
        for batch in epoch:
            for _ in read(batch):
                pass
        rates.append(n / (time.perf_counter() - t0))
    return rates


def loader_pass(store: Path, frag_dir: Path, k: int, mode: str, n: int, extras: bool) -> dict:
    """One process's measurement: the store, then memmapped TIFFs, on the same two epochs.

    Two epochs of ``n`` crops (the sampler's draws for epochs 0 and 1), read the way training
    reads them: batches of 16 through ``CropDataset.read_raw_batch`` (two threads share
    decoding, cutting and, for ``mode == "normalised"``, normalising; the sampler tells the
    cache the next batch to read ahead). Epoch 0 starts from an empty cache in a new
    process, as a training run does; epoch 1 uses the cache epoch 0 left. The memmapped
    TIFFs read the same crops in the same order (files in the page cache), stacked and, when
    normalised, normalised in this thread. With ``extras``: the store read crop by crop in
    one thread (warm cache) and the crops cut from the volume in RAM.
    """
    from inkpipe.pipeline.volume import Normalizer
    from inkpipe.train.data import CropDataset, WindowSampler, WindowSet

    retain_freed_memory()  # as train and predict do; for every reader measured here
    layers = LAYER_SETS[k]
    frag = open_fragments(store)[0]
    sets = [WindowSet(0, frag.meta.shape[1:], frag.windows())]
    sampler = WindowSampler(sets, 224, n, 16, seed=0, jitter_px=32)
    batches = []  # each epoch's CropBatch values, as the sampler yields them (with read_ahead)
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        batches.append(list(sampler))
    epochs = [[key for batch in epoch for key in batch] for epoch in batches]
    ds = CropDataset([frag], layers, 224, augment=None, cache_mb=1024)
    transform = ds._normalise if mode == "normalised" else None
    out = {"store": _epochs(partial(ds.read_raw_batch, transform=transform), batches)}
    out["cache_mb"] = ds.cache.nbytes / 2**20
    normalise = Normalizer(frag.layer_stats()[layers.as_slice()])
    maps = [
        tifffile.memmap(frag_dir / "surface_volume" / f"{z:02d}.tif")
        for z in range(layers.start, layers.stop)
    ]

    def read_tiffs(batch):
        for _, y, x in batch:
            crop = np.stack([m[y : y + 224, x : x + 224] for m in maps])
            yield crop if mode == "raw" else normalise(crop)

    out["memmap"] = _epochs(read_tiffs, batches)
    if extras:
        t0 = time.perf_counter()
        for key in epochs[0]:
            ds.read_raw(*key)
        out["one_thread"] = n / (time.perf_counter() - t0)
        del ds
        arr = np.asarray(frag.volume[layers.as_slice()])
        t0 = time.perf_counter()
        for _, y, x in epochs[0]:
            arr[:, y : y + 224, x : x + 224].copy()
        out["ram"] = n / (time.perf_counter() - t0)
    return out


FRESH_MEMORY_PROBE = """
import time
from inkpipe.pipeline.volume import mapped_empty
for _ in range(2):
    t0 = time.perf_counter()
    block = mapped_empty((1 << 30,), "uint8")  # 1 GiB
    block[::4096] = 1  # first touch of every page, as decoding into the cache does
    print(time.perf_counter() - t0)
    del block
"""


def fresh_memory_seconds() -> tuple[float, float]:
    """Seconds to map in 1 GiB of new memory in a new process: the first time, and again.

    What a first epoch pays to fill its block cache. Virtual machines that hand freed guest
    memory back to the host make the first figure several times the second.
    """
    _, _, out = run_measured(FRESH_MEMORY_PROBE)
    first, again = (float(v) for v in out.split())
    return first, again


def stored_raw_fraction(store: Path) -> float:
    """Fraction of the store's volume chunk files Blosc kept uncompressed (did not compress).

    Those are read straight into the block cache (one copy); the others are decoded.
    """
    from inkpipe.pipeline.chunks import BLOSC_HEADER_BYTES, BloscHeader

    files = [p for p in store.glob("*/volume/c/*/*/*") if p.is_file()]
    raw = 0
    for path in files:
        with open(path, "rb") as fh:
            header = BloscHeader.parse(fh.read(BLOSC_HEADER_BYTES))
        raw += header is not None and header.stored_raw
    return raw / max(len(files), 1)


def loader_rates(store: Path, frag_dir: Path, n: int, repeats: int) -> list[tuple]:
    """Median crops/s over ``repeats`` new processes for each k and mode (see loader_pass)."""
    here = Path(__file__).resolve().parent
    rows = []
    for k in LAYER_SETS:
        cells: dict[str, list[float]] = {}
        for rep in range(repeats):
            for mode in ("raw", "normalised"):
                extras = mode == "raw" and rep == 0
                code = (
                    f"import json, sys; sys.path.insert(0, {str(here)!r})\n"
                    "from bench_train import loader_pass\n"
                    f"print(json.dumps(loader_pass(Path({str(store)!r}), "
                    f"Path({str(frag_dir)!r}), {k}, {mode!r}, {n}, {extras})))"
                )
                _, _, text = run_measured("from pathlib import Path\n" + code)
                res = json.loads(text.strip().splitlines()[-1])
                for reader in ("store", "memmap"):
                    for epoch, rate in enumerate(res[reader]):
                        cells.setdefault(f"{mode} {reader} {epoch}", []).append(rate)
                for key in ("one_thread", "ram", "cache_mb"):
                    if key in res:
                        cells.setdefault(key, []).append(res[key])
                print(f"k={k} {mode} run {rep + 1}: {res}", flush=True)
        rows.append((k, {key: float(np.median(v)) for key, v in cells.items()}))
    return rows


def train_rss(store: Path, layers: LayerRange, out: Path) -> tuple[float, float]:
    code = (
        f"""
import shutil
from pathlib import Path
from inkpipe.pipeline.layers import LayerRange
from inkpipe.pipeline.memory import retain_freed_memory
from inkpipe.train.config import TrainConfig, parse_validation
from inkpipe.train.loop import train
out = Path({str(out)!r}); shutil.rmtree(out, ignore_errors=True)
train(TrainConfig(store=Path({str(store)!r}), out=out, layers=LayerRange({layers.start}, {layers.stop}),
                  epochs=1, steps_per_epoch=4, batch_size=4, warmup_steps=1, progress=False,
                  val=parse_validation("patches:8")), log=lambda m: None)
"""
        + RSS_SUFFIX
    )
    secs, rss, _ = run_measured(code)
    return secs, rss


def quality(
    workdir: Path, minutes: float, size: tuple[int, int], models: tuple[str, ...]
) -> list[tuple]:
    from inkpipe.infer.evaluate import EvaluateConfig, evaluate
    from inkpipe.infer.predict import PredictConfig, predict
    from inkpipe.pipeline.synth import SynthConfig, synthesize
    from inkpipe.train.config import TrainConfig, parse_validation
    from inkpipe.train.loop import train
    from inkpipe.train.models import ModelSpec

    data = workdir / f"quality_{size[0]}x{size[1]}"
    synthesize(
        SynthConfig(
            out=data,
            n_train=2,
            n_test=1,
            height_px=size[0],
            width_px=size[1],
            seed=1,
            ink_contrast=1.2,
        )
    )
    store = data / "store.zarr"
    ingest(
        IngestConfig(
            root=data, out=store, progress=False, settings=StoreSettings(tile_px=64, stride_px=32)
        ),
        log=lambda m: None,
    )
    layers = LayerRange(22, 40)
    rows = []
    for name in models:
        run = data / f"run_{name}"
        import shutil

        shutil.rmtree(run, ignore_errors=True)
        t0 = time.perf_counter()
        (res,) = train(
            TrainConfig(
                store=store,
                out=run,
                layers=layers,
                model=ModelSpec(name=name, in_channels=layers.k),
                epochs=1000,
                steps_per_epoch=20,
                batch_size=16,
                lr=2e-3,
                warmup_steps=20,
                restart_epochs=1000,
                aug="light",
                jitter_px=16,
                val=parse_validation("patches:24"),
                max_minutes=minutes,
                progress=False,
            ),
            log=lambda m: None,
        )
        train_s = time.perf_counter() - t0
        pred = data / f"pred_{name}"
        predict(
            PredictConfig(
                checkpoints=(res.best_path,),
                fragments=("a",),
                out=pred,
                store=store,
                tta="flips",
                progress=False,
            ),
            log=lambda m: None,
        )
        rep = evaluate(EvaluateConfig(submission=pred / "submission.csv", labels=data / "truth"))
        rows.append(
            (
                name,
                train_s,
                res.epochs_run,
                res.best_f05,
                rep.mean_fbeta,
                rep.mean_precision,
                rep.mean_recall,
            )
        )
        print(
            f"{name}: {train_s / 60:.1f} min, {res.epochs_run} epochs, val F0.5 {res.best_f05:.3f}, "
            f"test F0.5 {rep.mean_fbeta:.3f} (P {rep.mean_precision:.3f}, R {rep.mean_recall:.3f})",
            flush=True,
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/inkbench"))
    ap.add_argument("--crops", type=int, default=2000)
    ap.add_argument("--minutes", type=float, default=6.0, help="CPU training budget per model")
    ap.add_argument("--quick", action="store_true", help="small fragment, short runs")
    ap.add_argument("--repeats", type=int, default=3, help="loader runs (median reported)")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: loader,rss,quality")
    ap.add_argument("--models", default="attention-unet,unet", help="quality: models to train")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    h, w = (1024, 1024) if args.quick else (8181, 6330)
    big_root = args.workdir / f"frag_{h}x{w}"
    frag_dir = ensure_fragment(big_root, h, w)
    big = (
        args.workdir / "store_4_512_lz4_shuffle.zarr"
        if not args.quick
        else args.workdir / "quick.zarr"
    )
    if not big.exists():
        ingest(IngestConfig(root=big_root, out=big, progress=False), log=print)
    small_root = args.workdir / "frag_1024x1024"
    ensure_fragment(small_root, 1024, 1024)
    small = args.workdir / "small.zarr"
    if not small.exists():
        ingest(IngestConfig(root=small_root, out=small, progress=False), log=print)

    if "loader" not in skip:
        first, again = fresh_memory_seconds()
        rows = loader_rates(big, frag_dir, args.crops if not args.quick else 304, args.repeats)
        print(
            f"\n### Loader throughput, {h}x{w} fragment, 2 epochs of {args.crops} crops "
            f"(crops/s, 1 GB cache; 1st / next epoch; median of {args.repeats} processes)\n"
        )
        print(
            "| k | store raw | memmapped TIFFs raw | store normalised | memmapped TIFFs "
            "normalised | store, one thread, warm | in-memory NumPy | cache used MB |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for k, c in rows:
            pair = [
                f"{c[f'{m} {r} 0']:.0f} / {c[f'{m} {r} 1']:.0f}"
                for m in ("raw", "normalised")
                for r in ("store", "memmap")
            ]
            print(
                f"| {k} | {' | '.join(pair)} | {c['one_thread']:.0f} | {c['ram']:.0f} | "
                f"{c['cache_mb']:.0f} |"
            )
        print(
            f"\n{stored_raw_fraction(big):.0%} of the store's chunk files did not compress "
            "(Blosc stored them as they are: read straight into the cache)."
        )
        print(
            f"\nMapping in 1 GiB of new memory took {first:.2f} s in a new process "
            f"({again:.2f} s for a second GiB right after): the 1st epoch pays this to fill "
            "the cache."
        )
    if "rss" not in skip:
        print(
            "\n### Peak RSS of a short training run (attention-unet, batch 4, 4 steps, tile 224)\n"
        )
        print("| fragment | k | seconds | peak RSS MB |")
        print("|---|---|---|---|")
        for label, store in ((f"{h}x{w}", big), ("1024x1024", small)):
            for k in (10, 30):
                secs, rss = train_rss(store, LAYER_SETS[k], args.workdir / "rss_run")
                print(f"| {label} | {k} | {secs:.0f} | {rss:.0f} |", flush=True)
    if "quality" not in skip:
        size = (384, 320) if args.quick else (768, 576)
        minutes = 0.5 if args.quick else args.minutes
        rows = quality(args.workdir, minutes, size, tuple(args.models.split(",")))
        print(
            f"\n### Quality: held-out synthetic test fragment {size[0]}x{size[1]} (ink contrast 1.2), {minutes:g} CPU min per model, tile 64, layers 22:40, flip TTA\n"
        )
        print("| model | train min | epochs | val F0.5 | test F0.5 | precision | recall |")
        print("|---|---|---|---|---|---|---|")
        for name, secs, ep, vf, tf, p, r in rows:
            print(f"| {name} | {secs / 60:.1f} | {ep} | {vf:.3f} | {tf:.3f} | {p:.3f} | {r:.3f} |")


if __name__ == "__main__":
    main()
