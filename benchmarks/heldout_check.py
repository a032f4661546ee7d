"""Train on a store with chosen options, predict its test fragments, score them with an oracle.

    python benchmarks/heldout_check.py ROOT LAYERS MINUTES RUN [KEY=VALUE ...]

``ROOT`` holds ``store.zarr`` (``inkpipe ingest ROOT/frags --out ROOT/store.zarr``) and the
``frags/test``, ``frags/truth`` folders ``make_semireal.py`` / ``inkpipe synth`` write. Training
uses ``inkpipe train``'s defaults (the device's recipe) except the ``KEY=VALUE`` options, which
are :class:`~inkpipe.train.config.TrainConfig` fields as Python literals (``aug='light'``,
``depth_shift=0``, ``val='patches:64'``), for ``MINUTES`` of wall-clock time. Then every test
fragment is predicted with flip TTA and scored inside its mask; printed per fragment: F0.5 at
the run's threshold, precision, recall, and the "oracle" F0.5 of the best threshold on the test
fragment itself (it separates a threshold that did not transfer from features that did not).
Used for the exploratory runs of the README's "Held-out check"; one process per run.
"""

from __future__ import annotations

import ast
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from inkpipe.infer.predict import PredictConfig, predict
from inkpipe.numerics.metrics import fbeta_score, search_threshold
from inkpipe.pipeline.images import read_binary
from inkpipe.pipeline.layers import parse_layers
from inkpipe.train.config import TrainConfig, parse_validation
from inkpipe.train.loop import train


def main() -> int:
    if len(sys.argv) < 5:
        print(__doc__)
        return 2
    root, layers, minutes, run = (
        Path(sys.argv[1]),
        sys.argv[2],
        float(sys.argv[3]),
        Path(sys.argv[4]),
    )
    extra = {}
    for item in sys.argv[5:]:
        key, _, value = item.partition("=")
        extra[key] = ast.literal_eval(value)
    if "val" in extra:
        extra["val"] = parse_validation(extra["val"])
    shutil.rmtree(run, ignore_errors=True)
    t0 = time.time()
    cfg = TrainConfig(
        store=root / "store.zarr",
        out=run,
        layers=parse_layers(layers),
        max_minutes=minutes,
        progress=False,
        **extra,
    )
    (res,) = train(cfg)
    t1 = time.time()
    ids = tuple(sorted(p.name for p in (root / "frags" / "test").iterdir()))
    preds = predict(
        PredictConfig(
            checkpoints=(res.best_path,),
            fragments=ids,
            out=run / "pred",
            store=root / "store.zarr",
            tta="flips",
            progress=False,
        ),
        log=lambda s: None,
    )
    parts = []
    for p in preds:
        truth = read_binary(root / "frags" / "truth" / f"{p.id}.png", "truth") > 0
        valid = read_binary(root / "frags" / "test" / p.id / "mask.png", "mask") > 0
        pred = np.asarray(Image.open(p.mask_png)) > 127
        prob = np.asarray(Image.open(p.probability_png)).astype(np.float32) / 255
        tp = int((pred & truth & valid).sum())
        precision = tp / max(1, int((pred & valid).sum()))
        recall = tp / max(1, int((truth & valid).sum()))
        th, oracle, _ = search_threshold(prob, truth, valid, np.linspace(0.02, 0.98, 49))
        parts.append(
            f"{p.id}: {fbeta_score(pred, truth, valid=valid):.3f} (P {precision:.2f} "
            f"R {recall:.2f}; oracle {oracle:.3f} at {th:.2f})"
        )
    print(
        f"RESULT {run.name} {' '.join(sys.argv[5:]) or 'defaults'}: test F0.5 {'; '.join(parts)}"
        f" | best val F0.5 {res.best_f05:.3f} at {res.threshold:.2f}, epoch {res.best_epoch}"
        f"/{res.epochs_run} | train {t1 - t0:.0f} s, predict {time.time() - t1:.0f} s",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
