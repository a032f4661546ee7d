"""Training benchmarks: loader throughput, training peak RSS, and training quality.

    python benchmarks/bench_train.py [--workdir /tmp/inkbench] [--minutes 6] [--quick]

1. Loader throughput (crops/s) for k = 10, 30, 65 on a real-size synthetic fragment
   (8181 x 6330 x 65; made by bench_ingest.py or here), on the crops the training sampler
   draws, in its order: from the store as training reads it (bounded chunk cache with
   read-ahead; also one thread without it, and normalised tensors as the DataLoader yields
   them), from an in-memory NumPy array (the limit), and from memmapped raw TIFFs (files in
   the page cache).
2. Peak RSS of a short training run at k = 10 and k = 30, on the real-size store and on a
   small one: it must not grow with the fragment.
3. Quality: F0.5 on a held-out synthetic test fragment after a fixed CPU budget, both models.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import tifffile
from _common import RSS_SUFFIX, ensure_fragment, run_measured

from inkpipe.pipeline.ingest import IngestConfig, ingest
from inkpipe.pipeline.layers import LayerRange
from inkpipe.pipeline.store import StoreSettings, open_fragments

LAYER_SETS = {10: LayerRange(28, 38), 30: LayerRange(18, 48), 65: LayerRange(0, 65)}


def loader_rates(store: Path, frag_dir: Path, n: int) -> list[tuple]:
    """Crops/s for each k: the store through the training read path, RAM, memmapped TIFFs.

    Two epochs of ``n`` crops each (the sampler's draws for epochs 0 and 1), read the way
    training reads them: batches of 16 through ``CropDataset.read_raw_batch`` (the block
    cache with its read-ahead thread, told the next batch by the sampler). "1st epoch" starts
    from an empty cache; "next epoch" is epoch 1 on the cache epoch 0 left. The memmapped
    TIFFs read the same crops in the same order, epoch 0 then epoch 1, with the files in the
    page cache. Also: the store read crop by crop in one thread (no read-ahead), and
    normalised float32 samples as the DataLoader receives them.
    """
    from inkpipe.train.data import CropDataset, WindowSampler, WindowSet

    frag = open_fragments(store)[0]
    sets = [WindowSet(0, frag.meta.shape[1:], frag.windows())]
    sampler = WindowSampler(sets, 224, n, 16, seed=0, jitter_px=32)
    epochs = []
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        epochs.append(list(sampler))
    batches = [[keys[i : i + 16] for i in range(0, n, 16)] for keys in epochs]
    rows = []
    for k, layers in LAYER_SETS.items():
        ds = CropDataset([frag], layers, 224, augment=None, cache_mb=1024)
        store_rates = []
        for epoch in (0, 1):
            t0 = time.perf_counter()
            for batch in batches[epoch]:
                for _ in ds.read_raw_batch(batch):
                    pass
            store_rates.append(n / (time.perf_counter() - t0))
        cache_mb = ds.cache.nbytes / 2**20
        t0 = time.perf_counter()
        for key in epochs[0]:  # warm cache from epoch 1, one thread
            ds.read_raw(*key)
        single = n / (time.perf_counter() - t0)
        del ds
        ds2 = CropDataset([frag], layers, 224, augment=None, cache_mb=1024)
        t0 = time.perf_counter()
        for batch in batches[0]:
            ds2.__getitems__(batch)
        items = n / (time.perf_counter() - t0)
        del ds2
        arr = np.asarray(frag.volume[layers.as_slice()])
        t0 = time.perf_counter()
        for _, y, x in epochs[0]:
            arr[:, y : y + 224, x : x + 224].copy()
        ram = n / (time.perf_counter() - t0)
        del arr
        maps = [
            tifffile.memmap(frag_dir / "surface_volume" / f"{z:02d}.tif")
            for z in range(layers.start, layers.stop)
        ]
        mm_rates = []
        for epoch in (0, 1):
            t0 = time.perf_counter()
            for _, y, x in epochs[epoch]:
                np.stack([m[y : y + 224, x : x + 224] for m in maps])
            mm_rates.append(n / (time.perf_counter() - t0))
        del maps
        rows.append((k, *store_rates, single, items, ram, *mm_rates, cache_mb))
        print(
            f"k={k}: store {store_rates[0]:.0f} (next epoch {store_rates[1]:.0f}, one thread "
            f"{single:.0f}), normalised {items:.0f}, RAM {ram:.0f}, memmap TIFF "
            f"{mm_rates[0]:.0f} (next {mm_rates[1]:.0f}) crops/s; cache held {cache_mb:.0f} MB",
            flush=True,
        )
    return rows


def train_rss(store: Path, layers: LayerRange, out: Path) -> tuple[float, float]:
    code = (
        f"""
import shutil
from pathlib import Path
from inkpipe.pipeline.layers import LayerRange
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


def quality(workdir: Path, minutes: float, size: tuple[int, int]) -> list[tuple]:
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
    for name in ("attention-unet", "unet"):
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
    ap.add_argument("--skip", default="", help="comma list of parts to skip: loader,rss,quality")
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
        rows = loader_rates(big, frag_dir, args.crops if not args.quick else 304)
        print(
            f"\n### Loader throughput, {h}x{w} fragment, 2 epochs of {args.crops} crops "
            "(crops/s, 1 GB cache)\n"
        )
        print(
            "| k | store, 1st epoch | store, next epoch | memmapped TIFFs, 1st | memmapped "
            "TIFFs, next | store, one thread, no read-ahead | store, normalised float32 | "
            "in-memory NumPy | cache used MB |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        for k, s0, s1, single, items, ram, m0, m1, cache in rows:
            print(
                f"| {k} | {s0:.0f} | {s1:.0f} | {m0:.0f} | {m1:.0f} | {single:.0f} | "
                f"{items:.0f} | {ram:.0f} | {cache:.0f} |"
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
        rows = quality(args.workdir, minutes, size)
        print(
            f"\n### Quality: held-out synthetic test fragment {size[0]}x{size[1]} (ink contrast 1.2), {minutes:g} CPU min per model, tile 64, layers 22:40, flip TTA\n"
        )
        print("| model | train min | epochs | val F0.5 | test F0.5 | precision | recall |")
        print("|---|---|---|---|---|---|---|")
        for name, secs, ep, vf, tf, p, r in rows:
            print(f"| {name} | {secs / 60:.1f} | {ep} | {vf:.3f} | {tf:.3f} | {p:.3f} | {r:.3f} |")


if __name__ == "__main__":
    main()
