"""Per-pixel F-beta scoring and threshold search.

Convention for empty sets (the competition's): a score is 0 when there is no true positive,
except when both the prediction and the truth are empty, which scores 1 (nothing to find,
nothing claimed). Precision and recall follow the same rule: both are 1 when prediction and
truth are empty, and ``0/0`` is 0 otherwise.

Binarization is ``prob >= threshold`` compared in ``prob``'s dtype, here and in
:func:`inkpipe.infer.postprocess.binarize`, so a threshold found by :func:`search_threshold`
reproduces its score exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from inkpipe.pipeline.checks import check_number
from inkpipe.pipeline.errors import ConfigError, InvalidInputError

DEFAULT_THRESHOLDS: NDArray[np.float64] = np.round(np.arange(0.05, 0.96, 0.05), 2)
"""0.05, 0.10, ..., 0.95."""

_CHUNK_PX = 1 << 22  # pixels per histogram chunk: bounds temporaries to tens of MB


def check_beta(beta: float) -> float:
    """Return the F-beta weight ``beta`` as a float, or raise :class:`ConfigError` unless > 0."""
    return check_number(
        "beta", beta, 0, low_open=True, kind="a number", hint="the competition used 0.5"
    )


def precision_recall(tp: int, fp: int, fn: int) -> tuple[float, float]:
    """Return (precision, recall) from counts, with the module's empty-set convention.

    Args:
        tp: true positive pixel count (>= 0).
        fp: false positive pixel count (>= 0).
        fn: false negative pixel count (>= 0).

    Returns:
        ``tp / (tp + fp)`` and ``tp / (tp + fn)``; both 1.0 when ``tp == fp == fn == 0``; a
        ``0/0`` otherwise gives 0.0.
    """
    if tp == 0 and fp == 0 and fn == 0:
        return 1.0, 1.0
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return precision, recall


def fbeta_counts(tp: int, fp: int, fn: int, beta: float = 0.5) -> float:
    """Return the F-beta score from pixel counts.

    ``F = (1 + b^2) tp / ((1 + b^2) tp + b^2 fn + fp)``; 0.0 when ``tp == 0``, except 1.0 when
    ``tp == fp == fn == 0`` (empty prediction of an empty truth).

    Args:
        tp: true positive pixel count (>= 0).
        fp: false positive pixel count (>= 0).
        fn: false negative pixel count (>= 0).
        beta: weight of recall relative to precision (> 0); 0.5 favours precision.

    Raises:
        ConfigError: ``beta`` is not a positive number.
        InvalidInputError: a count is negative.
    """
    beta = check_beta(beta)
    if min(tp, fp, fn) < 0:
        raise InvalidInputError(f"counts must be >= 0, got tp={tp}, fp={fp}, fn={fn}")
    if tp == 0:
        return 1.0 if fp == 0 and fn == 0 else 0.0
    b2 = beta * beta
    return (1 + b2) * tp / ((1 + b2) * tp + b2 * fn + fp)


def _as_bool(name: str, array: ArrayLike, shape: tuple[int, ...] | None) -> NDArray[np.bool_]:
    """Return ``array`` as bool (nonzero is True), checking its shape against ``shape``."""
    arr = np.asarray(array)
    if shape is not None and arr.shape != shape:
        raise InvalidInputError(
            f"{name} has shape {arr.shape}, expected {shape} (the prediction's shape); "
            "compare arrays of the same fragment"
        )
    return arr if arr.dtype == np.bool_ else arr != 0


def confusion(
    pred: ArrayLike, truth: ArrayLike, valid: ArrayLike | None = None
) -> tuple[int, int, int]:
    """Count true positives, false positives and false negatives per pixel.

    Args:
        pred: (H, W) bool or 0/1 array (nonzero is ink).
        truth: (H, W) bool or 0/1 array, same shape.
        valid: optional (H, W) bool array; only pixels where it is True are counted.

    Returns:
        ``(tp, fp, fn)`` as Python ints.

    Raises:
        InvalidInputError: the shapes differ.
    """
    p = _as_bool("pred", pred, None)
    t = _as_bool("truth", truth, p.shape)
    if valid is not None:
        v = _as_bool("valid", valid, p.shape)
        p = p & v
        t = t & v
    tp = int(np.count_nonzero(p & t))
    fp = int(np.count_nonzero(p)) - tp
    fn = int(np.count_nonzero(t)) - tp
    return tp, fp, fn


def fbeta_score(
    pred: ArrayLike, truth: ArrayLike, beta: float = 0.5, valid: ArrayLike | None = None
) -> float:
    """Return the per-pixel F-beta score of a binary prediction.

    Args:
        pred: (H, W) bool or 0/1 array.
        truth: (H, W) bool or 0/1 array, same shape.
        beta: weight of recall relative to precision (> 0).
        valid: optional (H, W) bool array restricting the scored pixels.
    """
    return fbeta_counts(*confusion(pred, truth, valid), beta=beta)


@dataclass(frozen=True)
class ThresholdRow:
    """Scores of one threshold in a :func:`search_threshold` table."""

    threshold: float
    fbeta: float
    precision: float
    recall: float
    tp: int
    fp: int
    fn: int


def _check_thresholds(thresholds: ArrayLike) -> NDArray[np.float64]:
    """Return the thresholds sorted and deduplicated, or raise :class:`ConfigError`."""
    try:
        th = np.asarray(thresholds, dtype=np.float64)
    except (TypeError, ValueError):
        th = np.asarray([np.nan])
    if th.ndim != 1 or th.size == 0 or not np.all(np.isfinite(th)):
        raise ConfigError(
            f"thresholds must be a non-empty 1-D list of finite numbers, got {thresholds!r}; "
            "e.g. np.arange(0.05, 0.96, 0.05)"
        )
    return np.unique(th)


def search_threshold(
    prob: ArrayLike,
    truth: ArrayLike,
    valid: ArrayLike | None = None,
    thresholds: ArrayLike = DEFAULT_THRESHOLDS,
    beta: float = 0.5,
) -> tuple[float, float, tuple[ThresholdRow, ...]]:
    """Find the threshold that maximizes F-beta, in one pass over the pixels.

    Each pixel is assigned the number of thresholds it reaches (``searchsorted``); histograms
    of that index for ink and no-ink pixels, cumulated from the top, give tp/fp/fn at every
    threshold at once. Pixels are processed in chunks, so memory stays small on 141 Mpx images.

    Args:
        prob: (H, W) floating array of probabilities; a pixel is predicted ink at threshold
            ``t`` when ``prob >= t`` (compared in ``prob``'s dtype). NaN is rejected.
        truth: (H, W) bool or 0/1 array.
        valid: optional (H, W) bool array restricting the scored pixels.
        thresholds: candidate thresholds (any order; duplicates are dropped).
        beta: weight of recall relative to precision (> 0).

    Returns:
        ``(best_threshold, best_fbeta, table)``: the table has one :class:`ThresholdRow` per
        threshold in increasing order; ties go to the lowest threshold.

    Raises:
        InvalidInputError: shapes differ, ``prob`` is not floating, or it contains NaN.
        ConfigError: ``thresholds`` or ``beta`` is invalid.
    """
    beta = check_beta(beta)
    p = np.asarray(prob)
    if not np.issubdtype(p.dtype, np.floating):
        raise InvalidInputError(
            f"prob has dtype {p.dtype}, expected floating probabilities in [0, 1]; "
            "convert with .astype(np.float32)"
        )
    t = _as_bool("truth", truth, p.shape).reshape(-1)
    v = None if valid is None else _as_bool("valid", valid, p.shape).reshape(-1)
    th = _check_thresholds(thresholds)
    # Compare in the probabilities' dtype, as binarize does (casting keeps the order).
    th_cmp = th.astype(p.dtype)
    p = p.reshape(-1)

    n_bins = th.size + 1
    ink_hist = np.zeros(n_bins, dtype=np.int64)
    bg_hist = np.zeros(n_bins, dtype=np.int64)
    for lo in range(0, p.size, _CHUNK_PX):
        pc = p[lo : lo + _CHUNK_PX]
        tc = t[lo : lo + _CHUNK_PX]
        if v is not None:
            vc = v[lo : lo + _CHUNK_PX]
            pc, tc = pc[vc], tc[vc]
        if np.isnan(pc).any():
            raise InvalidInputError(
                "prob contains NaN, expected finite probabilities; check the model output"
            )
        # level[i] = number of thresholds <= prob[i], so pixel i is ink at threshold j iff j < level
        level = np.searchsorted(th_cmp, pc, side="right")
        ink_hist += np.bincount(level[tc], minlength=n_bins)
        bg_hist += np.bincount(level[~tc], minlength=n_bins)

    # above[j] = pixels with level > j, i.e. predicted ink at threshold j
    ink_above = np.cumsum(ink_hist[::-1])[::-1][1:]
    bg_above = np.cumsum(bg_hist[::-1])[::-1][1:]
    n_ink = int(ink_hist.sum())

    rows = []
    for j, threshold in enumerate(th.tolist()):
        tp, fp = int(ink_above[j]), int(bg_above[j])
        fn = n_ink - tp
        precision, recall = precision_recall(tp, fp, fn)
        f = fbeta_counts(tp, fp, fn, beta)
        rows.append(ThresholdRow(float(threshold), f, precision, recall, tp, fp, fn))
    best = max(range(len(rows)), key=lambda j: (rows[j].fbeta, -j))
    return rows[best].threshold, rows[best].fbeta, tuple(rows)
