from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from inkpipe.infer.postprocess import binarize
from inkpipe.numerics.metrics import (
    DEFAULT_THRESHOLDS,
    confusion,
    fbeta_counts,
    fbeta_score,
    precision_recall,
    search_threshold,
)
from inkpipe.pipeline.errors import ConfigError, InvalidInputError


def direct_fbeta(pred: np.ndarray, truth: np.ndarray, beta: float) -> float:
    """The textbook formula from precision and recall, with the module's empty-set rule."""
    tp = float(np.sum(pred & truth))
    fp = float(np.sum(pred & ~truth))
    fn = float(np.sum(~pred & truth))
    if tp == 0:
        return 1.0 if fp == 0 and fn == 0 else 0.0
    p, r = tp / (tp + fp), tp / (tp + fn)
    return (1 + beta**2) * p * r / (beta**2 * p + r)


@settings(max_examples=100, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    shape=st.tuples(st.integers(1, 20), st.integers(1, 20)),
    density=st.floats(0, 1),
    beta=st.sampled_from([0.5, 1.0, 2.0]),
)
def test_fbeta_matches_direct_formula(
    seed: int, shape: tuple[int, int], density: float, beta: float
) -> None:
    rng = np.random.default_rng(seed)
    pred = rng.random(shape) < density
    truth = rng.random(shape) < density
    assert fbeta_score(pred, truth, beta=beta) == pytest.approx(direct_fbeta(pred, truth, beta))
    valid = rng.random(shape) < 0.7
    expected = direct_fbeta(pred & valid, truth & valid, beta)
    assert fbeta_score(pred, truth, beta=beta, valid=valid) == pytest.approx(expected)


def test_confusion_counts_and_dtypes() -> None:
    pred = np.array([[1, 1, 0, 0]], np.uint8)
    truth = np.array([[1, 0, 1, 0]], bool)
    assert confusion(pred, truth) == (1, 1, 1)
    assert all(type(c) is int for c in confusion(pred, truth))
    assert confusion(pred, truth, valid=np.array([[1, 0, 1, 1]], bool)) == (1, 0, 1)
    with pytest.raises(InvalidInputError, match="truth has shape"):
        confusion(pred, truth[:, :3])


def test_empty_set_convention() -> None:
    assert fbeta_counts(0, 0, 0) == 1.0
    assert fbeta_counts(0, 5, 0) == 0.0
    assert fbeta_counts(0, 0, 5) == 0.0
    assert precision_recall(0, 0, 0) == (1.0, 1.0)
    assert precision_recall(0, 0, 4) == (0.0, 0.0)
    assert precision_recall(0, 3, 0) == (0.0, 0.0)
    z = np.zeros((3, 3), bool)
    assert fbeta_score(z, z) == 1.0


def test_fbeta_counts_known_value() -> None:
    # beta=0.5: 1.25*tp / (1.25*tp + 0.25*fn + fp)
    assert fbeta_counts(8, 2, 4) == pytest.approx(10 / (10 + 1 + 2))
    assert fbeta_counts(3, 1, 1, beta=1) == pytest.approx(0.75)


@pytest.mark.parametrize("beta", [0, -1, float("nan"), "x"])
def test_bad_beta(beta: object) -> None:
    with pytest.raises(ConfigError, match="beta"):
        fbeta_counts(1, 1, 1, beta=beta)  # type: ignore[arg-type]


def test_negative_counts() -> None:
    with pytest.raises(InvalidInputError, match="counts must be >= 0"):
        fbeta_counts(1, -1, 0)


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    shape=st.tuples(st.integers(1, 40), st.integers(1, 40)),
    with_valid=st.booleans(),
    exact_hits=st.booleans(),
)
def test_search_threshold_matches_brute_force(
    seed: int, shape: tuple[int, int], with_valid: bool, exact_hits: bool
) -> None:
    rng = np.random.default_rng(seed)
    prob = rng.random(shape, dtype=np.float32)
    if exact_hits:  # probabilities sitting exactly on thresholds exercise the >= boundary
        prob = DEFAULT_THRESHOLDS[rng.integers(0, DEFAULT_THRESHOLDS.size, shape)].astype(
            np.float32
        )
    truth = rng.random(shape) < np.clip(prob + rng.normal(0, 0.3, shape), 0, 1)
    valid = rng.random(shape) < 0.8 if with_valid else None
    best_t, best_f, table = search_threshold(prob, truth, valid=valid)
    assert [row.threshold for row in table] == DEFAULT_THRESHOLDS.tolist()
    for row in table:
        pred = binarize(prob, row.threshold)
        assert (row.tp, row.fp, row.fn) == confusion(pred, truth, valid)
        assert row.fbeta == fbeta_score(pred, truth, valid=valid)
        assert (row.precision, row.recall) == precision_recall(row.tp, row.fp, row.fn)
    brute = [fbeta_score(binarize(prob, t), truth, valid=valid) for t in DEFAULT_THRESHOLDS]
    assert best_f == max(brute)
    assert best_t == DEFAULT_THRESHOLDS[int(np.argmax(brute))]  # ties go to the lowest


def test_search_threshold_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    import inkpipe.numerics.metrics as metrics

    rng = np.random.default_rng(0)
    prob = rng.random((37, 23)).astype(np.float32)
    truth = rng.random((37, 23)) < prob
    expected = search_threshold(prob, truth, thresholds=[0.9, 0.3, 0.5, 0.3])
    monkeypatch.setattr(metrics, "_CHUNK_PX", 100)
    assert search_threshold(prob, truth, thresholds=[0.3, 0.5, 0.9]) == expected
    assert [r.threshold for r in expected[2]] == [0.3, 0.5, 0.9]


def test_search_threshold_float64_and_edges() -> None:
    prob = np.array([[0.0, 0.5, 1.0]])
    truth = np.array([[0, 1, 1]])
    best_t, best_f, table = search_threshold(prob, truth, thresholds=[0.0, 0.5, 1.0])
    assert [(r.tp, r.fp, r.fn) for r in table] == [(2, 1, 0), (2, 0, 0), (1, 0, 1)]
    assert (best_t, best_f) == (0.5, 1.0)


def test_search_threshold_rejects() -> None:
    prob = np.zeros((2, 2), np.float32)
    truth = np.zeros((2, 2), bool)
    with pytest.raises(InvalidInputError, match="floating"):
        search_threshold(prob.astype(np.uint8), truth)
    with pytest.raises(InvalidInputError, match="NaN"):
        search_threshold(np.full((2, 2), np.nan, np.float32), truth)
    with pytest.raises(InvalidInputError, match="shape"):
        search_threshold(prob, truth[:1])
    with pytest.raises(ConfigError, match="thresholds"):
        search_threshold(prob, truth, thresholds=[])
    with pytest.raises(ConfigError, match="thresholds"):
        search_threshold(prob, truth, thresholds=[0.5, float("inf")])
