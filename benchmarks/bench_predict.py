"""Prediction benchmark: keeping the model busy, throughput per model and TTA, peak RSS.

    python benchmarks/bench_predict.py [--quick] [--workdir /tmp/inkbench-predict] [--threads 1]
                                       [--size 768] [--skip-rss] [--skip-throughput]
                                       [--skip-ratio] [--ratio-size 2048] [--ratio-tta none,flips]
                                       [--ratio-models M,...] [--reps 3] [--precision P] [--compile]
                                       [--ratio-store STORE] [--accelerator-ms 8,32]

    # the README's figures: one torch thread, pinned to core 1 of the shared machine
    taskset -c 1 env OMP_NUM_THREADS=1 python benchmarks/bench_predict.py --skip-rss \
        --skip-throughput

Keeping the model busy (in this process, first): a RATIO-SIZE x RATIO-SIZE x 65 fragment from
``inkpipe synth``, ingested, layers 28:38, 64 px tiles (the CPU recipe's) at overlap 0.5,
batch 16, for the CPU recipe's model (``stem3d``, small 2-D U-Net, output stride 4) and a 2-D
model (``attention-unet`` at widths 16/32/64), untrained, each TTA mode. Three things are
timed, interleaved REPS times and summed: the bare forward (``model(batch)`` alone, on the
same windows held in memory as one tensor, the TTA batches made beforehand), the tiled
prediction of the whole fragment as ``predict`` runs it (``sliding_window_predict`` on a
``VolumeView`` with the fragment's papyrus mask, through ``build_predictor``), and the whole
``predict()`` for the fragment. Their ratios (bare forward / the others) say how busy the
model is kept. Times are CPU times of the process (every thread), since other people's work
shares the core; wall-clock ratios are printed too. On one core reading and the model take
turns, so these ratios count every cycle spent besides the model; what reading in a
background thread buys shows with a device that leaves the CPU idle while it computes: the
accelerator stand-in (``--accelerator-ms``: a "model" that sleeps that long a batch and
returns stem3d-shaped zero logits) is timed against its sleeps alone, in wall-clock time.

The other measurements:

They run ``inkpipe.infer.predict.predict`` end to end (model load, windows,
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
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from _common import REAL_H, REAL_W, RSS_SUFFIX, run_measured

from inkpipe.infer import predict as predict_module
from inkpipe.infer.predict import (
    PredictConfig,
    build_predictor,
    count_windows,
    load_models,
    predict,
    stride_for,
)
from inkpipe.numerics.blending import sliding_window_predict
from inkpipe.pipeline.ingest import IngestConfig, ingest
from inkpipe.pipeline.layers import LayerRange
from inkpipe.pipeline.memory import retain_freed_memory
from inkpipe.pipeline.store import (
    Fragment,
    FragmentMeta,
    StoreSettings,
    begin_fragment,
    create_store,
    finish_fragment,
    open_fragment,
    open_store,
    write_plane,
    write_table,
    write_windows,
)
from inkpipe.pipeline.synth import synthesize_fragment
from inkpipe.pipeline.volume import Normalizer, VolumeView
from inkpipe.pipeline.windows import grid_windows, holds_valid_pixel
from inkpipe.train.checkpoint import checkpoint_payload, model_from_checkpoint, save_checkpoint
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


# --------------------------------------------------------------------------- keeping the model busy

RATIO_MODELS = {
    "stem3d-small-s4": ModelSpec(
        name="stem3d", in_channels=LAYERS.k, encoder="small", output_stride=4
    ),
    "attention-unet-16-32-64": ModelSpec(
        name="attention-unet", in_channels=LAYERS.k, widths=(16, 32, 64)
    ),
}
RATIO_TILE = 64  # the CPU recipe's tile (train/recipe.py)
RATIO_BATCH = 16  # predict's default --batch-size


def make_ratio_store(workdir: Path, size: int) -> Path:
    """Synthesize a SIZE x SIZE x 65 fragment (``inkpipe synth``) and ingest it; reused."""
    folder = workdir / f"synth{size}" / "f"
    synthesize_fragment(
        folder, height_px=size, width_px=size, layers=N_LAYERS, seed=0, labels=False
    )
    store = workdir / f"synth{size}.zarr"
    ingest(IngestConfig(root=folder, out=store, workers=1, progress=False), log=lambda s: None)
    return store


def tta_transforms(tta: str) -> list[Callable[[torch.Tensor], torch.Tensor]]:
    """The flips (and rotations) TTA applies to a batch before the model sees it."""
    flips = [
        lambda x: x.clone(),
        lambda x: x.flip(-1),
        lambda x: x.flip(-2),
        lambda x: x.flip(-2, -1),
    ]
    if tta == "none":
        return flips[:1]
    if tta == "flips":
        return flips
    return flips + [lambda x, f=f: torch.rot90(f(x), 1, dims=(-2, -1)) for f in flips]


def bare_forward_seconds(
    model: torch.nn.Module, tiles: torch.Tensor, tta: str
) -> tuple[float, float]:
    """(wall, CPU) seconds of ``model(batch)`` alone over ``tiles`` (in memory), as predict batches.

    Only the forward calls are timed: each input (a fresh copy of the batch, or its flip) is
    made just before, untimed, so it is as warm in the cache as in the pipeline; no
    upsampling, no sigmoid, no copies to or from the host.
    """
    wall = cpu = 0.0
    transforms = tta_transforms(tta)
    with torch.inference_mode():
        for lo in range(0, len(tiles), RATIO_BATCH):
            batch = tiles[lo : lo + RATIO_BATCH]
            for transform in transforms:
                x = transform(batch)
                t0, c0 = time.perf_counter(), time.process_time()
                model(x)
                wall += time.perf_counter() - t0
                cpu += time.process_time() - c0
    return wall, cpu


class TimedModel(torch.nn.Module):
    """A model that adds up the CPU time of this thread spent in its forward calls."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.cpu = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t0 = time.thread_time()
        y = self.model(x)
        self.cpu += time.thread_time() - t0
        return y


def timed_predictor(loaded, tta: str, options: dict) -> tuple[Callable, list[TimedModel]]:
    """``build_predictor``, with each model wrapped in a :class:`TimedModel`."""
    made: list[TimedModel] = []
    original = predict_module.model_from_checkpoint

    def timed(ck):
        made.append(TimedModel(original(ck)))
        return made[-1]

    predict_module.model_from_checkpoint = timed
    try:
        return build_predictor(loaded, "cpu", tta, **options), made
    finally:
        predict_module.model_from_checkpoint = original


def pipeline_seconds(
    frag: Fragment, predictor: Callable, tile: int, stride: int
) -> tuple[float, float]:
    """(wall, CPU) seconds of the tiled prediction of the whole fragment, as ``predict`` runs it.

    Store -> chunk cache -> windows -> predictor (model, TTA) -> Gaussian blending, i.e.
    ``sliding_window_predict`` on a fresh ``VolumeView`` with the papyrus mask. CPU time counts
    every thread of this process (all on one core when pinned).
    """
    mask = frag.mask()
    t0, c0 = time.perf_counter(), time.process_time()
    view = VolumeView(frag.volume, LAYERS, Normalizer(frag.layer_stats()[LAYERS.as_slice()]))
    sliding_window_predict(view, predictor, tile, stride, RATIO_BATCH, valid=mask)
    return time.perf_counter() - t0, time.process_time() - c0


def run_ratio(
    workdir: Path,
    size: int,
    reps: int,
    ttas: list[str],
    models: list[str],
    options: dict,
    store: Path | None = None,
) -> list[dict]:
    """Measure whole-fragment prediction against the bare forward, in this process.

    ``options`` go to ``build_predictor`` and ``PredictConfig`` (e.g. ``precision``,
    ``compile``); the bare forward runs under the same autocast.
    """
    retain_freed_memory()  # as predict() does: every run below allocates the same way
    t0 = time.perf_counter()
    store = store or make_ratio_store(workdir, size)
    frag = open_fragment(open_store(store), "f")
    size = int(frag.mask().shape[0])
    mask = frag.mask()
    stride = stride_for(RATIO_TILE, 0.5)
    origins = grid_windows(size, size, RATIO_TILE, stride)
    origins = origins[holds_valid_pixel(mask != 0, origins, RATIO_TILE)]
    view = VolumeView(frag.volume, LAYERS, Normalizer(frag.layer_stats()[LAYERS.as_slice()]))
    tiles = torch.from_numpy(view.read_windows(origins, RATIO_TILE))
    del view
    print(
        f"{size} x {size} fragment ready, {len(origins)} windows of {RATIO_TILE} px in memory "
        f"({tiles.nbytes / 2**20:.0f} MB) after {time.perf_counter() - t0:.0f} s",
        flush=True,
    )
    autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(options.get("precision", ""))
    rows = []
    for name in models:
        spec = RATIO_MODELS[name]
        torch.manual_seed(0)
        ckpt = workdir / f"ratio_{name}.pt"
        payload = checkpoint_payload(
            build_model(spec).eval(), spec, LAYERS, RATIO_TILE, 0.5, {}, {}
        )
        save_checkpoint(ckpt, payload)
        loaded = load_models([ckpt])
        model = model_from_checkpoint(loaded.checkpoints[0])
        if options.get("compile"):
            model = torch.compile(model)

        def bare_run(x: torch.Tensor, tta: str, model=model) -> tuple[float, float]:
            with torch.autocast("cpu", dtype=autocast or torch.float32, enabled=bool(autocast)):
                return bare_forward_seconds(model, x, tta)

        for tta in ttas:
            predictor, timed = timed_predictor(loaded, tta, options)
            for n in (RATIO_BATCH, len(tiles) % RATIO_BATCH or RATIO_BATCH):
                predictor(tiles[:n].numpy())  # warm up (compile): full and last batch shapes
                bare_run(tiles[:n], tta)
            cfg = PredictConfig(
                checkpoints=(ckpt,),
                fragments=("f",),
                out=workdir / "out_ratio",
                store=store,
                tta=tta,
                batch_size=RATIO_BATCH,
                device="cpu",
                progress=False,
                **options,
            )
            pipe, bare, whole, busy = [], [], [], []
            for _ in range(reps):  # interleaved, so a busy spell on the machine hits all
                timed[0].cpu = 0.0
                pipe.append(pipeline_seconds(frag, predictor, RATIO_TILE, stride))
                busy.append(timed[0].cpu / pipe[-1][1])
                bare.append(bare_run(tiles, tta))
                w0, c0 = time.perf_counter(), time.process_time()
                predict(cfg, log=lambda s: None)
                whole.append((time.perf_counter() - w0, time.process_time() - c0))
            mpx = size * size / 1e6
            # sums over the interleaved runs: a busy spell of the machine weighs on all three
            bare_wall, bare_cpu = (sum(b[i] for b in bare) / reps for i in (0, 1))
            pipe_wall, pipe_cpu = (sum(p[i] for p in pipe) / reps for i in (0, 1))
            whole_wall, whole_cpu = (sum(p[i] for p in whole) / reps for i in (0, 1))
            row = {
                "model": name,
                "tta": tta,
                "windows": len(origins),
                "bare": mpx / bare_cpu,
                "pipe": mpx / pipe_cpu,
                "ratio": bare_cpu / pipe_cpu,
                "ratio_wall": bare_wall / pipe_wall,
                "e2e": mpx / whole_cpu,
                "ratio_e2e": bare_cpu / whole_cpu,
                "ratio_e2e_wall": bare_wall / whole_wall,
                "busy": sum(busy) / reps,
            }
            rows.append(row)
            runs = ", ".join(
                f"{label} {[(round(a, 1), round(b, 1)) for a, b in runs]}"
                for label, runs in (("tiled", pipe), ("bare", bare), ("predict()", whole))
            )
            print(
                f"{name}, TTA {tta}: CPU s bare {bare_cpu:.1f}, tiled {pipe_cpu:.1f} (ratio "
                f"{row['ratio']:.3f}, model busy {row['busy']:.3f}), predict() {whole_cpu:.1f} "
                f"(ratio {row['ratio_e2e']:.3f}); "
                f"wall ratios {row['ratio_wall']:.3f}, {row['ratio_e2e_wall']:.3f}; runs (wall, "
                f"CPU): {runs}",
                flush=True,
            )
    return rows


class SleepModel(torch.nn.Module):
    """A stand-in for a model on an accelerator: the CPU idles ``seconds`` per call.

    Returns zero logits at 1/4 resolution (the CPU recipe's output stride), so the rest of
    the pipeline (upsampling, sigmoid, TTA, blending) runs as for the real model. ``busy``
    adds up how long the sleeps really took (the kernel wakes a thread a little late, about
    0.2 ms here): the time the "device" was busy.
    """

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds
        self.busy = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        time.sleep(self.seconds)
        self.busy += time.perf_counter() - t0
        return torch.zeros(x.shape[0], 1, x.shape[-2] // 4, x.shape[-1] // 4)


def run_accelerated(
    workdir: Path, store: Path, reps: int, ttas: list[str], ms_per_batch: float
) -> list[dict]:
    """Tiled prediction with a model that leaves the CPU idle while it runs, as a GPU does.

    The ideal time is the model's alone (the sleeps, as long as they really took: calls x
    ``ms_per_batch`` and the kernel's late wake-ups); the ratio ideal / wall time says how much
    of the reading, blending and TTA work hides behind the model. Wall clock, since the point
    is the CPU's idle time.
    """
    frag = open_fragment(open_store(store), "f")
    spec = RATIO_MODELS["stem3d-small-s4"]
    ckpt = workdir / "ratio_accelerated.pt"
    save_checkpoint(
        ckpt, checkpoint_payload(build_model(spec), spec, LAYERS, RATIO_TILE, 0.5, {}, {})
    )
    loaded = load_models([ckpt])
    stride = stride_for(RATIO_TILE, 0.5)
    mask = frag.mask()
    origins = grid_windows(*mask.shape, RATIO_TILE, stride)
    n_batches = -(-int(holds_valid_pixel(mask != 0, origins, RATIO_TILE).sum()) // RATIO_BATCH)
    original = predict_module.model_from_checkpoint
    stand_in = SleepModel(ms_per_batch / 1000)
    predict_module.model_from_checkpoint = lambda ck: stand_in
    rows = []
    try:
        for tta in ttas:
            predictor = build_predictor(loaded, "cpu", tta)
            nominal = n_batches * len(tta_transforms(tta)) * ms_per_batch / 1000
            stand_in.busy = 0.0
            walls = [pipeline_seconds(frag, predictor, RATIO_TILE, stride)[0] for _ in range(reps)]
            wall, ideal = sum(walls) / reps, stand_in.busy / reps
            rows.append({"tta": tta, "ideal": ideal, "wall": wall, "ratio": ideal / wall})
            print(
                f"accelerator stand-in, {ms_per_batch} ms a batch, TTA {tta}: model alone "
                f"{ideal:.2f} s ({nominal:.2f} s nominal), tiled prediction {wall:.2f} s (ratio "
                f"{ideal / wall:.3f}); runs {[round(w, 2) for w in walls]}",
                flush=True,
            )
    finally:
        predict_module.model_from_checkpoint = original
    return rows


def print_ratio(rows: list[dict], size: int, threads: int, options: dict) -> None:
    print(
        f"\n### Keeping the model busy: {size} x {size} px synthetic fragment (inkpipe synth), "
        f"layers {LAYERS}, {RATIO_TILE} px tiles, stride {stride_for(RATIO_TILE, 0.5)} px, batch "
        f"{RATIO_BATCH}, CPU, {threads} torch thread(s), {options or 'default options'}; means "
        "of the interleaved runs, Mpx/s of CPU time\n"
    )
    print(
        "| model | TTA | windows | bare forward Mpx/s | tiled prediction Mpx/s | ratio | "
        "model busy | predict() Mpx/s | ratio | wall-clock ratios |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['tta']} | {r['windows']} | {r['bare']:.3f} | {r['pipe']:.3f} | "
            f"{r['ratio']:.3f} | {r['busy']:.3f} | {r['e2e']:.3f} | {r['ratio_e2e']:.3f} | "
            f"{r['ratio_wall']:.3f}, {r['ratio_e2e_wall']:.3f} |"
        )
    print(
        "\nbare forward = model(batch) alone on the same windows held in memory as a tensor (the "
        "TTA batches made beforehand); tiled prediction = store -> chunk cache -> windows -> "
        "model, TTA, upsampling, sigmoid -> Gaussian blending; predict() = the whole command "
        "for this fragment (also loading the checkpoint, post-processing, pictures, RLE); model "
        "busy = the CPU time of the model's forward calls inside the tiled prediction / the "
        "CPU time of that run (measured in the same run, so immune to others' load). CPU "
        "time counts every thread of the process (one core when pinned), so other processes "
        "on the core do not count; wall-clock ratios follow."
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a 448 x 448 throughput region")
    ap.add_argument("--size", type=int, default=768, help="throughput region side, px")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/inkbench-predict"))
    ap.add_argument("--skip-rss", action="store_true")
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--skip-ratio", action="store_true", help="skip keeping-the-model-busy")
    ap.add_argument("--ratio-size", type=int, default=2048, help="its fragment side, px")
    ap.add_argument("--ratio-tta", default="none,flips", help="its TTA modes, comma-separated")
    ap.add_argument(
        "--ratio-models",
        default=",".join(RATIO_MODELS),
        help="its models, comma-separated ('': only the accelerator stand-in)",
    )
    ap.add_argument("--reps", type=int, default=3, help="its interleaved runs per case")
    ap.add_argument(
        "--ratio-store", type=Path, help="use fragment 'f' (square) of this store, read only"
    )
    ap.add_argument("--precision", default=None, help="predict --precision (default: auto)")
    ap.add_argument("--compile", action="store_true", help="predict --compile")
    ap.add_argument(
        "--accelerator-ms",
        default="8,32",
        help="per-batch times of a model stand-in that leaves the CPU idle, as a GPU does, "
        "comma-separated (0: skip)",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    size = 448 if args.quick else args.size
    args.workdir.mkdir(parents=True, exist_ok=True)
    print(
        f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores; torch threads {args.threads}"
    )
    ratio_rows = []
    if not args.skip_ratio:
        options: dict = {}  # only what is asked for, so the script also runs older inkpipes
        if args.precision:
            options["precision"] = args.precision
        if args.compile:
            options["compile"] = True
        ratio_rows = run_ratio(
            args.workdir,
            args.ratio_size,
            args.reps,
            args.ratio_tta.split(","),
            [m for m in args.ratio_models.split(",") if m],
            options,
            args.ratio_store,
        )
        if ratio_rows:
            print_ratio(ratio_rows, args.ratio_size, args.threads, options)
        stand_ins = [float(ms) for ms in args.accelerator_ms.split(",") if float(ms) > 0]
        if stand_ins:
            store = args.ratio_store or make_ratio_store(args.workdir, args.ratio_size)
            acc_rows = [
                {"ms": ms, **row}
                for ms in stand_ins
                for row in run_accelerated(
                    args.workdir, store, args.reps, args.ratio_tta.split(","), ms
                )
            ]
            print(
                "\n### With an accelerator stand-in (the CPU idle while it runs), stem3d's "
                "output shape, wall clock\n"
            )
            print("| ms a batch | TTA | model alone s | tiled prediction s | ratio |")
            print("|---|---|---|---|---|")
            for r in acc_rows:
                print(
                    f"| {r['ms']:g} | {r['tta']} | {r['ideal']:.2f} | {r['wall']:.2f} | "
                    f"{r['ratio']:.3f} |"
                )
    if args.skip_rss and args.skip_throughput:
        return
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
