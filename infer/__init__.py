"""inkpipe.infer: tiling, blending, TTA, post-processing, RLE, scoring and prediction."""
