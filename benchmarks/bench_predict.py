"""Prediction benchmark: throughput per model and TTA mode, and peak RSS on a real-size fragment.

    python benchmarks/bench_predict.py [--quick] [--workdir /tmp/inkbench-predict] [--threads 1]
                                       [--size 768] [--skip-rss] [--skip-throughput]

Every measurement runs ``inkpipe.infer.predict.predict`` end to end (model load, windows,
blending, post-processing, PNGs, RLE) in a fresh process, on stores written directly with the
``pipeline.store`` functions (no TIFFs, no ingest):

* throughput: a SIZE x SIZE fragment of random CT values, all papyrus, layers 28:38, 224 px
  tiles at overlap 0.5, batch 16, for both models (attention-unet at its default widths, and
  the smp ``unet`` with an efficientnet-b0 encoder, ``encoder_weights none``), untrained (the
  speed does not depend on the weights), with ``--tta none`` and ``flips``. Besides the
  fragment's Mpx/s it prints the rate a large fragment would see, ``windows/s x stride^2``
  (a small region has relatively more edge windows and fewer windows per pixel);
* peak RSS at real size (8181 x 6330 x 65): the volume is created at full size but only a
  band of it is written (every other chunk is the fill value, never stored), so few windows
  run and the measurement is about the memory of the real-size canvases, mask, probability map,
  post-processing and pictures, not about the model:
    - ``band``: the papyrus mask is a band of 2 x ~9 tiles, the default attention-unet;
    - ``full``: the mask covers the whole fragment and windows do not overlap, so every pixel
      of the blend canvases is written (untouched pages of zeroed memory are not resident, so
      a band alone under-counts the canvases), with a tiny attention-unet (widths 4, 8, 16)
      so that it runs in about a minute; once with the canvases in RAM, once memory-mapped;
    - ``baseline``: a process that imports inkpipe and loads the checkpoint, nothing else.

The machine is shared: torch runs with ``--threads`` threads (default 1: on 2 shared cores two
OpenMP threads contending with another busy process were up to 100x slower on small models).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from _common import REAL_H, REAL_W, RSS_SUFFIX, run_measured

from inkpipe.infer.predict import count_windows, stride_for
from inkpipe.pipeline.layers import LayerRange
from inkpipe.pipeline.store import (
    FragmentMeta,
    StoreSettings,
    begin_fragment,
    create_store,
    finish_fragment,
    write_plane,
    write_table,
    write_windows,
)
from inkpipe.train.checkpoint import checkpoint_payload, save_checkpoint
from inkpipe.train.models import ModelSpec, build_model, count_parameters

LAYERS = LayerRange(28, 38)
N_LAYERS = 65
TILE = 224
# Random CT values are uniform in [20000, 40000): these are their stats (mean, std, p01, p99).
STATS = (30000.0, 5773.5, 20200.0, 39800.0)

MODELS = {
    "attention-unet": ModelSpec(name="attention-unet", in_channels=LAYERS.k),
    "unet effnet-b0": ModelSpec(
        name="unet", in_channels=LAYERS.k, encoder="efficientnet-b0", encoder_weights="none"
    ),
    "attention-unet tiny": ModelSpec(
        name="attention-unet", in_channels=LAYERS.k, widths=(4, 8, 16)
    ),
}


def write_fragment(
    root, fragment_id: str, height: int, width: int, mask: np.ndarray, region: tuple[slice, slice]
) -> None:
    """Write a fragment group with a full-size volume of which only ``region`` is stored."""
    settings = StoreSettings()
    meta = FragmentMeta(
        id=fragment_id,
        split="test",
        shape=(N_LAYERS, height, width),
        has_labels=False,
        has_ir=False,
        sources={},
        settings=asdict(settings),
        extra={"benchmark": "bench_predict.py"},
    )
    group = begin_fragment(root, meta, settings)
    ys, xs = region
    rng = np.random.default_rng(0)
    band = rng.integers(20000, 40000, (LAYERS.k, ys.stop - ys.start, xs.stop - xs.start), np.uint16)
    group["volume"][LAYERS.as_slice(), ys, xs] = band
    write_plane(group, "mask", mask, settings.chunk_px)
    write_windows(group, np.zeros((0, 4), np.int32), settings)
    stats = np.tile(np.asarray(STATS), (N_LAYERS, 1))
    write_table(group, "layer_stats", stats, {"columns": ["mean", "std", "p01", "p99"]})
    finish_fragment(root, group, meta)


def make_stores(workdir: Path, size: int) -> tuple[Path, Path, dict[str, np.ndarray]]:
    """Return (throughput store, real-size store, masks by fragment id)."""
    small = workdir / "small.zarr"
    real = workdir / "real.zarr"
    masks = {}
    shutil.rmtree(small, ignore_errors=True)
    root = create_store(small)
    masks["region"] = np.ones((size, size), np.uint8)
    write_fragment(root, "region", size, size, masks["region"], (slice(0, size), slice(0, size)))
    shutil.rmtree(real, ignore_errors=True)
    root = create_store(real)
    y0, x0 = 4000, 1000
    band = (slice(y0, y0 + 2 * TILE), slice(x0, x0 + 2048))
    masks["band"] = np.zeros((REAL_H, REAL_W), np.uint8)
    masks["band"][band] = 1
    write_fragment(root, "band", REAL_H, REAL_W, masks["band"], band)
    masks["full"] = np.ones((REAL_H, REAL_W), np.uint8)
    write_fragment(root, "full", REAL_H, REAL_W, masks["full"], band)
    return small, real, masks


def make_checkpoints(workdir: Path) -> dict[str, Path]:
    paths = {}
    for name, spec in MODELS.items():
        torch.manual_seed(0)
        model = build_model(spec).eval()
        path = workdir / f"{name.replace(' ', '_')}.pt"
        save_checkpoint(path, checkpoint_payload(model, spec, LAYERS, TILE, 0.5, {}, {}))
        paths[name] = path
        print(f"checkpoint {name}: {count_parameters(model) / 1e6:.2f} M parameters", flush=True)
    return paths


def predict_code(
    ckpt: Path,
    store: Path,
    fragment_id: str,
    out: Path,
    tta: str,
    overlap: float,
    threads: int,
    canvas_budget_mb: float = 1024,
) -> str:
    return (
        f"""
import json, threading, time, torch
torch.set_num_threads({threads})
from pathlib import Path
from inkpipe.infer.predict import PredictConfig, predict
peak_anon_kb = [0]
def watch():  # sample anonymous (not file-backed) resident memory every 50 ms
    while True:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    peak_anon_kb[0] = max(peak_anon_kb[0], int(line.split()[1]))
        time.sleep(0.05)
threading.Thread(target=watch, daemon=True).start()
cfg = PredictConfig(checkpoints=(Path({str(ckpt)!r}),), fragments=({fragment_id!r},),
                    out=Path({str(out)!r}), store=Path({str(store)!r}), tta={tta!r},
                    overlap={overlap}, canvas_budget_mb={canvas_budget_mb}, progress=False)
t0 = time.perf_counter()
(r,) = predict(cfg, log=lambda s: None)
print("RESULT", json.dumps({{"seconds": time.perf_counter() - t0, "anon_mb": peak_anon_kb[0] / 1024}}))
"""
        + RSS_SUFFIX
    )


def baseline_code(ckpt: Path, threads: int) -> str:
    return (
        f"""
import torch
torch.set_num_threads({threads})
from pathlib import Path
from inkpipe.infer.predict import load_models, build_predictor
build_predictor(load_models([Path({str(ckpt)!r})]), "cpu", "none")
"""
        + RSS_SUFFIX
    )


def run(code: str) -> tuple[float, float, float]:
    """Return (seconds of predict(), peak RSS MB, peak anonymous RSS MB sampled)."""
    wall, rss, out = run_measured(code)
    result = {"seconds": wall, "anon_mb": math.nan}
    for line in out.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line.split(" ", 1)[1])
    return result["seconds"], rss, result["anon_mb"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a 448 x 448 throughput region")
    ap.add_argument("--size", type=int, default=768, help="throughput region side, px")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/inkbench-predict"))
    ap.add_argument("--skip-rss", action="store_true")
    ap.add_argument("--skip-throughput", action="store_true")
    args = ap.parse_args()
    size = 448 if args.quick else args.size
    args.workdir.mkdir(parents=True, exist_ok=True)
    print(
        f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores; torch threads {args.threads}"
    )
    t0 = time.perf_counter()
    small, real, masks = make_stores(args.workdir, size)
    ckpts = make_checkpoints(args.workdir)
    print(f"stores and checkpoints written in {time.perf_counter() - t0:.1f} s", flush=True)
    stride = stride_for(TILE, 0.5)

    rows = []
    if not args.skip_throughput:
        n_win = count_windows(masks["region"], TILE, stride)
        for name in ("attention-unet", "unet effnet-b0"):
            for tta in ("none", "flips"):
                out = args.workdir / "out_small"
                secs, rss, _ = run(
                    predict_code(ckpts[name], small, "region", out, tta, 0.5, args.threads)
                )
                mpx = size * size / 1e6
                rows.append(
                    (
                        name,
                        tta,
                        n_win,
                        secs,
                        mpx / secs,
                        n_win / secs * stride**2 / 1e6,
                        secs / (n_win / 16),
                        rss,
                    )
                )
                print(
                    f"{name}, tta {tta}: {secs:.1f} s, {mpx / secs:.3f} Mpx/s, peak RSS {rss:.0f} MB",
                    flush=True,
                )

    rss_rows = []
    if not args.skip_rss:
        out = args.workdir / "out_real"
        cases = [
            (
                "band",
                "attention-unet",
                0.5,
                1024,
                "band mask, default attention-unet, canvases in RAM",
            ),
            (
                "full",
                "attention-unet tiny",
                0.0,
                1024,
                "full mask, tiny model, overlap 0, canvases in RAM",
            ),
            (
                "full",
                "attention-unet tiny",
                0.0,
                0,
                "full mask, tiny model, overlap 0, canvases memory-mapped",
            ),
        ]
        for frag, model, overlap, budget, label in cases:
            n_win = count_windows(masks[frag], TILE, stride_for(TILE, overlap))
            secs, rss, anon = run(
                predict_code(ckpts[model], real, frag, out, "none", overlap, args.threads, budget)
            )
            rss_rows.append((label, n_win, secs, rss, anon))
            print(
                f"{label}: {n_win} windows, {secs:.1f} s, peak RSS {rss:.0f} MB, "
                f"peak anonymous {anon:.0f} MB",
                flush=True,
            )
        _, rss, _ = run(baseline_code(ckpts["attention-unet"], args.threads))
        rss_rows.append(
            ("baseline: import inkpipe + load the checkpoint, no prediction", 0, 0.0, rss, math.nan)
        )
        sizes = {p.name: p.stat().st_size for p in sorted(out.glob("full_*.png"))}
        print("real-size outputs: " + ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in sizes.items()))

    if rows:
        print(
            f"\n### Prediction throughput, {size} x {size} px all-papyrus fragment, layers {LAYERS}, "
            f"{TILE} px tiles, stride {stride} px, batch 16, CPU, {args.threads} torch thread(s)\n"
        )
        print(
            "| model | TTA | windows | seconds | Mpx/s (this fragment) | Mpx/s (large fragment) | s per 16 windows | peak RSS MB |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for name, tta, n, secs, rate, big, per_batch, rss in rows:
            print(
                f"| {name} | {tta} | {n} | {secs:.1f} | {rate:.4f} | {big:.4f} | {per_batch:.2f} | {rss:.0f} |"
            )
        print(
            "\nlarge fragment = windows/s x stride^2: interior pixels are covered by (tile/stride)^2 = 4 windows; "
            f"a real {REAL_H} x {REAL_W} fragment at the large-fragment rate takes "
            + ", ".join(
                f"{name} {tta}: {REAL_H * REAL_W / 1e6 / big / 60:.0f} min"
                for name, tta, _, _, _, big, _, _ in rows
            )
            + " (all papyrus; only windows touching the mask run)"
        )
    if rss_rows:
        print(
            f"\n### Peak RSS predicting a real-size {REAL_H} x {REAL_W} x {N_LAYERS} fragment (TTA none, default budgets)\n"
        )
        print(
            "The volume is full size but stored only in a band (other chunks are the fill value), so only a few "
            "windows read data; what is measured is the real-size canvases (3 x 207 MB float32), mask, probability "
            "map, post-processing, RLE and pictures.\n"
        )
        print("| case | windows | seconds | peak RSS MB | peak anonymous MB |")
        print("|---|---|---|---|---|")
        for label, n, secs, rss, anon in rss_rows:
            print(f"| {label} | {n} | {secs:.1f} | {rss:.0f} | {anon:.0f} |")
        print(
            "\npeak RSS (getrusage ru_maxrss) counts resident pages of memory-mapped files too; peak anonymous "
            "(RssAnon sampled every 50 ms) is the memory the kernel cannot page out without swap: memory-mapped "
            "canvases are written back and dropped under memory pressure, anonymous ones are not."
        )


if __name__ == "__main__":
    main()
