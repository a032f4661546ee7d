"""Model x output-stride quality on a held-out test fragment after a fixed CPU budget.

    python benchmarks/bench_models.py --data semireal --minutes 4 --seeds 0
        [--runs stem3d:4,stem3d:1,attention-unet:1,attention-unet:4,unet:4,resnet3d:4]
        [--layers 26:36] [--workdir /tmp/inkmodels]

Data (written once into the work folder):

* ``semireal``: ``inkpipe.pipeline.semireal`` (real CT texture from ../shared/realdata, real
  Scroll 1 ink-label geometry, an injected ink signal; the test fragment's labels come from a
  label image no training fragment uses), 2 train + 1 test fragment of 1024 x 768,
  ``--ink-contrast`` (default 1.5);
* ``synth``: ``inkpipe synth`` fragments, 2 train of 768 x 576 and a test fragment from
  another seed and size (640 x 512), so the test layout differs from the training ones.

Every run trains with ``inkpipe train``'s defaults except the model and the output stride
(``--model NAME --output-stride S``, tile from the CPU recipe: 64 px), for ``--minutes`` of
wall-clock time, then predicts the test fragment with flip TTA and scores it like the
competition. Printed per run: epochs and steps done, train crops/s, prediction Mpx/s, best
validation F0.5 and test F0.5 / precision / recall; then the median test F0.5 over seeds beside
two baselines on the same fragment: predicting ink everywhere and the best single-layer
per-pixel threshold. Run on a quiet machine: torch on 2 cores slows down several times when
another process competes.
"""

from __future__ import annotations

import argparse
import csv
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from make_semireal import best_layer_fbeta  # noqa: E402

from inkpipe.infer.evaluate import EvaluateConfig, evaluate  # noqa: E402
from inkpipe.infer.predict import PredictConfig, predict  # noqa: E402
from inkpipe.numerics.metrics import fbeta_score  # noqa: E402
from inkpipe.pipeline.images import read_binary  # noqa: E402
from inkpipe.pipeline.ingest import IngestConfig, ingest  # noqa: E402
from inkpipe.pipeline.layers import parse_layers  # noqa: E402
from inkpipe.train.config import TrainConfig  # noqa: E402
from inkpipe.train.loop import train  # noqa: E402
from inkpipe.train.models import ModelSpec  # noqa: E402


def make_data(kind: str, root: Path, contrast: float) -> Path:
    """Write the fragments (once) and ingest them; return the data folder."""
    data = root / f"{kind}_{contrast:g}"
    if not (data / "store.zarr").exists():
        if kind == "semireal":
            from inkpipe.pipeline.semireal import SemiRealConfig, synthesize_semireal

            synthesize_semireal(SemiRealConfig(out=data / "frags", seed=1, ink_contrast=contrast))
        else:
            from inkpipe.pipeline.synth import SynthConfig, synthesize

            frags = data / "frags"
            synthesize(SynthConfig(frags, 2, 0, 768, 576, seed=1, ink_contrast=contrast))
            other = root / f"synth_test_{contrast:g}"
            synthesize(SynthConfig(other, 0, 1, 640, 512, seed=7, ink_contrast=contrast))
            shutil.copytree(other / "test", frags / "test", dirs_exist_ok=True)
            shutil.copytree(other / "truth", frags / "truth", dirs_exist_ok=True)
        ingest(IngestConfig(root=data / "frags", out=data / "store.zarr", progress=False), print)
    return data


def baselines(data: Path) -> tuple[float, float]:
    """Return (all-ink F0.5, best single-layer threshold F0.5) on test fragment ``a``."""
    frag = data / "frags" / "test" / "a"
    truth = read_binary(data / "frags" / "truth" / "a.png", "ink labels").astype(bool)
    valid = read_binary(frag / "mask.png", "mask").astype(bool)
    best, _, _ = best_layer_fbeta(frag / "surface_volume", truth, valid)
    return fbeta_score(valid, truth, valid=valid), best


def run_one(data: Path, name: str, stride: int, seed: int, minutes: float, layers: str) -> dict:
    """Train one model for the budget, predict the test fragment, score it."""
    run = data / f"run_{name}_s{stride}_seed{seed}"
    shutil.rmtree(run, ignore_errors=True)
    lr = parse_layers(layers)
    cfg = TrainConfig(
        store=data / "store.zarr",
        out=run,
        layers=lr,
        model=ModelSpec(name=name, in_channels=lr.k),
        output_stride=stride,
        tile_px=64,
        seed=seed,
        max_minutes=minutes,
        progress=False,
    )
    t0 = time.perf_counter()
    (res,) = train(cfg, log=lambda m: None)
    train_s = time.perf_counter() - t0
    with (run / "metrics.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    crops = sum(float(r["crops_per_s"]) * float(r["seconds"]) for r in rows)
    seconds = sum(float(r["seconds"]) for r in rows)
    t1 = time.perf_counter()
    (pred,) = predict(
        PredictConfig(
            checkpoints=(res.best_path,),
            fragments=("a",),
            out=run / "pred",
            store=data / "store.zarr",
            tta="flips",
            progress=False,
        ),
        log=lambda m: None,
    )
    pred_s = time.perf_counter() - t1
    rep = evaluate(
        EvaluateConfig(submission=run / "pred" / "submission.csv", labels=data / "frags" / "truth")
    )
    out = {
        "run": f"{name}:{stride}",
        "seed": seed,
        "epochs": res.epochs_run,
        "steps": int(rows[-1]["steps"]) if rows else 0,
        "crops_s": crops / max(seconds, 1e-9),
        "mpx_s": pred.shape[0] * pred.shape[1] / 1e6 / max(pred_s, 1e-9),
        "val": res.best_f05,
        "test": rep.mean_fbeta,
        "p": rep.mean_precision,
        "r": rep.mean_recall,
        "train_min": train_s / 60,
    }
    print(
        f"{out['run']:18s} seed {seed}: {out['epochs']} epochs / {out['steps']} steps in "
        f"{out['train_min']:.1f} min, {out['crops_s']:.0f} crops/s, predict {out['mpx_s']:.3f} "
        f"Mpx/s (flip TTA), val F0.5 {out['val']:.3f}, test F0.5 {out['test']:.3f} "
        f"(P {out['p']:.3f}, R {out['r']:.3f})",
        flush=True,
    )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", choices=("semireal", "synth"), default="semireal")
    ap.add_argument("--ink-contrast", type=float, default=None, help="[semireal 1.5, synth 1.2]")
    ap.add_argument("--minutes", type=float, default=4.0, help="training budget per run")
    ap.add_argument("--seeds", default="0", help="comma list")
    ap.add_argument(
        "--runs",
        default="stem3d:4,stem3d:1,attention-unet:1,attention-unet:4,unet:4,resnet3d:4",
        help="comma list of MODEL:OUTPUT_STRIDE",
    )
    ap.add_argument("--layers", default="26:36")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/inkmodels"))
    args = ap.parse_args()
    contrast = args.ink_contrast or (1.5 if args.data == "semireal" else 1.2)
    data = make_data(args.data, args.workdir, contrast)
    all_ink, best_layer = baselines(data)
    print(
        f"{args.data} (ink contrast {contrast:g}), test fragment a: all ink F0.5 {all_ink:.3f}, "
        f"best single-layer threshold {best_layer:.3f}",
        flush=True,
    )
    seeds = [int(s) for s in args.seeds.split(",")]
    results = []
    for spec in args.runs.split(","):
        name, stride = spec.split(":")
        for seed in seeds:
            results.append(run_one(data, name, int(stride), seed, args.minutes, args.layers))
    print(
        f"\n| model:stride | test F0.5 (median of {len(seeds)}) | val F0.5 | steps | train crops/s | predict Mpx/s |"
    )
    print("|---|---|---|---|---|---|")
    for spec in args.runs.split(","):
        rs = [r for r in results if r["run"] == spec.replace(" ", "")]

        def med(key: str, rs: list[dict] = rs) -> float:
            return statistics.median(r[key] for r in rs)

        print(
            f"| {spec} | {med('test'):.3f} | {med('val'):.3f} | {med('steps'):.0f} | "
            f"{med('crops_s'):.0f} | {med('mpx_s'):.3f} |"
        )
    print(f"| predict ink everywhere | {all_ink:.3f} | | | | |")
    print(f"| best single-layer threshold | {best_layer:.3f} | | | | |")


if __name__ == "__main__":
    main()
