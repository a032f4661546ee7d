"""Write a semi-real fragment set (real CT texture + real ink labels + injected ink) and check it.

    python benchmarks/make_semireal.py OUT [--height 1024 --width 768 --seed 0]
        [--n-train 2 --n-test 1] [--ink-contrast 0.8] [--label-scale 0.25]
        [--texture DIR --labels DIR]

Writes OUT/train, OUT/test and OUT/truth like ``inkpipe synth`` (see
``inkpipe.pipeline.semireal``), then prints per fragment its label source image, its ink
fraction (of the papyrus) and two sanity figures, F0.5 inside the mask of

* the best single-layer per-pixel threshold: every slice, both polarities (ink brighter or
  darker), 99 thresholds at the slice's 1 %…99 % quantiles, best of all: a baseline that no
  model looking at one voxel at a time beats;
* predicting ink everywhere: the chance level.

A model is only learning something if it clearly beats both on the test fragment.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import tifffile
from numpy.typing import NDArray

from inkpipe.numerics.metrics import fbeta_score, search_threshold
from inkpipe.pipeline.errors import InkpipeError
from inkpipe.pipeline.images import read_binary
from inkpipe.pipeline.semireal import (
    DEFAULT_INK_CONTRAST,
    DEFAULT_LABEL_SCALE,
    SemiRealConfig,
    read_params,
    synthesize_semireal,
)
from inkpipe.pipeline.synth import SynthFragment

QUANTILES = np.round(np.arange(0.01, 1.0, 0.01), 2)


def best_layer_fbeta(
    volume_dir: Path, truth: NDArray[np.bool_], valid: NDArray[np.bool_]
) -> tuple[float, int, str]:
    """Return (F0.5, layer, polarity) of the best per-pixel threshold on any one slice."""
    best = (-1.0, -1, "")
    for z, path in enumerate(sorted(volume_dir.glob("*.tif"))):
        layer = tifffile.imread(path).astype(np.float32)
        for sign, polarity in ((1.0, "brighter"), (-1.0, "darker")):
            score = layer * np.float32(sign)
            thresholds = np.unique(np.quantile(score[valid], QUANTILES))
            _, f, _ = search_threshold(score, truth, valid, thresholds)
            if f > best[0]:
                best = (f, z, polarity)
    return best


def describe(frag: SynthFragment) -> str:
    params = read_params(frag.path)
    truth = read_binary(frag.truth, "ink labels").astype(bool)
    valid = read_binary(frag.path / "mask.png", "mask").astype(bool)
    ink = float(truth[valid].mean()) if valid.any() else 0.0
    all_ink = fbeta_score(valid, truth, valid=valid)
    f, z, polarity = best_layer_fbeta(frag.path / "surface_volume", truth, valid)
    return (
        f"{frag.split:5s} {frag.id:2s} labels {params['label_source']} "
        f"(crop {params['label_crop']}): ink {ink:.1%} of the papyrus; F0.5 best single-layer "
        f"threshold {f:.3f} (layer {z}, ink {polarity}), all ink {all_ink:.3f}"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path, help="output folder (train/, test/, truth/ go under it)")
    ap.add_argument("--height", type=int, default=1024, help="fragment height in px")
    ap.add_argument("--width", type=int, default=768, help="fragment width in px")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-train", type=int, default=2)
    ap.add_argument("--n-test", type=int, default=1)
    ap.add_argument("--ink-contrast", type=float, default=DEFAULT_INK_CONTRAST)
    ap.add_argument("--label-scale", type=float, default=DEFAULT_LABEL_SCALE)
    ap.add_argument("--texture", type=Path, default=None, help="real CT layers 00.tif … 10.tif")
    ap.add_argument("--labels", type=Path, default=None, help="real *_inklabels.png images")
    args = ap.parse_args()
    try:
        cfg = SemiRealConfig(
            out=args.out,
            texture_dir=args.texture,
            labels_dir=args.labels,
            n_train=args.n_train,
            n_test=args.n_test,
            height_px=args.height,
            width_px=args.width,
            seed=args.seed,
            ink_contrast=args.ink_contrast,
            label_scale=args.label_scale,
        )
        print(f"texture {cfg.texture}\nlabels  {cfg.labels}", flush=True)
        t0 = time.perf_counter()
        fragments = synthesize_semireal(cfg, progress=True)
        seconds = time.perf_counter() - t0
        print(f"{len(fragments)} fragments ready (complete ones kept) in {seconds:.0f} s")
        for frag in fragments:
            print(describe(frag), flush=True)
    except InkpipeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
