"""Inference-side variants on a trained checkpoint: TTA, overlap, speck removal, threshold.

    python benchmarks/infer_variants.py ROOT CHECKPOINT OUT

``ROOT`` is a ``heldout_check.py`` root (``store.zarr``, ``frags/test``, ``frags/truth``);
``CHECKPOINT`` a ``best.pt`` trained on it. The first test fragment is predicted once per
(TTA, overlap) pair with the probability map saved; every post-processing variant (opening
radius, smallest blob kept) is then applied to that map at the checkpoint's validated
threshold and scored inside the papyrus mask, as ``inkpipe predict`` would. Printed per pair:
the prediction's wall time, F0.5 of each variant and the "oracle" F0.5 of the best threshold on
the test fragment itself. Nothing is trained, so every difference is the inference option's.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import tifffile

from inkpipe.infer.postprocess import postprocess
from inkpipe.infer.predict import PredictConfig, predict
from inkpipe.numerics.metrics import fbeta_score, search_threshold
from inkpipe.pipeline.images import read_binary
from inkpipe.train.checkpoint import load_checkpoint

PASSES = [("none", 0.5), ("flips", 0.5), ("flips+rot90", 0.5), ("flips", 0.75)]
CLEANING = [(0, 0), (1, 0), (2, 0), (3, 0), (1, 100), (1, 400), (1, 1600)]  # (open px, min area)


def main() -> int:
    if len(sys.argv) != 4:
        print(__doc__)
        return 2
    root, ckpt, out = (Path(a) for a in sys.argv[1:])
    frag = sorted(p.name for p in (root / "frags" / "test").iterdir())[0]
    truth = read_binary(root / "frags" / "truth" / f"{frag}.png", "truth") > 0
    valid = read_binary(root / "frags" / "test" / frag / "mask.png", "mask") > 0
    threshold = load_checkpoint(ckpt).threshold
    for tta, overlap in PASSES:
        t0 = time.time()
        (pred,) = predict(
            PredictConfig(
                checkpoints=(ckpt,),
                fragments=(frag,),
                out=out / f"{tta}_{overlap}",
                store=root / "store.zarr",
                tta=tta,
                overlap=overlap,
                save_probabilities=True,
                progress=False,
            ),
            log=lambda s: None,
        )
        seconds = time.time() - t0
        assert pred.probability_tif is not None
        raw = tifffile.imread(pred.probability_tif)  # uint8 0-255 (or float 0-1)
        prob = raw.astype(np.float32)
        if np.issubdtype(raw.dtype, np.integer):
            prob /= np.iinfo(raw.dtype).max
        _, oracle, _ = search_threshold(prob, truth, valid, np.linspace(0.02, 0.98, 49))
        scores = [
            f"open {o} min {a}: "
            f"{fbeta_score(postprocess(prob, threshold, o, a, valid) > 0, truth, valid=valid):.3f}"
            for o, a in CLEANING
        ]
        print(
            f"RESULT {ckpt.parent.name} tta {tta} overlap {overlap} ({seconds:.0f} s), threshold "
            f"{threshold:.2f}: {', '.join(scores)} | oracle {oracle:.3f}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
