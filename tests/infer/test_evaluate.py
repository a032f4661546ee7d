from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from inkpipe.infer.evaluate import (
    EvaluateConfig,
    EvaluationReport,
    FragmentScore,
    evaluate,
    find_label_image,
)
from inkpipe.infer.rle import encode_rle, write_submission
from inkpipe.pipeline.errors import (
    ConfigError,
    InkpipeError,
    InputNotFoundError,
    InvalidInputError,
)
from inkpipe.pipeline.images import write_png


@pytest.fixture
def labels(tmp_path: Path) -> Path:
    """Fragment 'a' in the competition layout, 'b' as a flat PNG, 'empty' with no ink."""
    root = tmp_path / "labels"
    a = np.zeros((6, 8), np.uint8)
    a[1:3, 1:5] = 255  # 8 ink pixels
    (root / "a").mkdir(parents=True)
    write_png(root / "a" / "inklabels.png", a)
    b = np.zeros((5, 4), np.uint8)
    b[0, :] = 255  # 4 ink pixels
    write_png(root / "b.png", b)
    write_png(root / "empty.png", np.zeros((3, 3), np.uint8))
    return root


def predictions() -> dict[str, np.ndarray]:
    a = np.zeros((6, 8), np.uint8)
    a[1:3, 1:4] = 1  # 6 tp, 2 fn
    a[5, 7] = 1  # 1 fp
    b = np.zeros((5, 4), np.uint8)
    b[4, :] = 1  # 0 tp, 4 fp, 4 fn
    return {"a": a, "b": b, "empty": np.zeros((3, 3), np.uint8)}


def write(tmp_path: Path, rows: dict[str, str]) -> Path:
    return write_submission(tmp_path / "submission.csv", rows.items())


def test_find_label_image_layouts(labels: Path) -> None:
    assert find_label_image(labels, "a") == labels / "a" / "inklabels.png"
    assert find_label_image(labels, "b") == labels / "b.png"
    with pytest.raises(InputNotFoundError) as err:
        find_label_image(labels, "zz")
    message = str(err.value)
    assert str(labels / "zz" / "inklabels.png") in message and str(labels / "zz.png") in message
    with pytest.raises(InputNotFoundError, match="labels folder not found"):
        find_label_image(labels / "nope", "a")


def test_evaluate_exact_scores(tmp_path: Path, labels: Path) -> None:
    sub = write(tmp_path, {k: encode_rle(v) for k, v in predictions().items()})
    report = evaluate(EvaluateConfig(sub, labels))
    a, b, empty = report.scores
    assert a == FragmentScore(
        "a",
        fbeta=1.25 * 6 / (1.25 * 6 + 0.25 * 2 + 1),
        precision=6 / 7,
        recall=6 / 8,
        tp=6,
        fp=1,
        fn=2,
    )
    assert b == FragmentScore("b", 0.0, 0.0, 0.0, 0, 4, 4)
    assert empty == FragmentScore("empty", 1.0, 1.0, 1.0, 0, 0, 0)
    assert report.mean_fbeta == pytest.approx((a.fbeta + 0.0 + 1.0) / 3)
    assert report.mean_precision == pytest.approx((6 / 7 + 1.0) / 3)
    assert report.mean_recall == pytest.approx((0.75 + 1.0) / 3)


def test_evaluate_beta(tmp_path: Path, labels: Path) -> None:
    sub = write(tmp_path, {"a": encode_rle(predictions()["a"])})
    report = evaluate(EvaluateConfig(sub, labels, beta=1.0))
    assert report.scores[0].fbeta == pytest.approx(2 * 6 / (2 * 6 + 2 + 1))
    assert "F1" in report.to_table()


def test_to_table(tmp_path: Path, labels: Path) -> None:
    sub = write(tmp_path, {k: encode_rle(v) for k, v in predictions().items()})
    table = evaluate(EvaluateConfig(sub, labels)).to_table()
    lines = table.splitlines()
    assert lines[0].split() == ["fragment", "F0.5", "precision", "recall", "tp", "fp", "fn"]
    assert lines[2].split() == ["a", "0.8333", "0.8571", "0.7500", "6", "1", "2"]
    assert lines[-1].split()[0] == "mean"
    assert lines[-1].split()[1] == "0.6111"
    assert len({len(line) for line in (lines[1], lines[-2])}) == 1  # aligned rules


def test_to_table_is_aligned() -> None:
    report = EvaluationReport(
        scores=(
            FragmentScore("1", 0.5, 0.5, 0.5, 1, 1, 1),
            FragmentScore("long-fragment-id", 0.25, 0.5, 0.125, 123456, 7, 89),
        ),
        mean_fbeta=0.375,
        mean_precision=0.5,
        mean_recall=0.3125,
    )
    lines = report.to_table().splitlines()
    column = lines[0].index("F0.5") + len("F0.5")
    assert all(line[column - 1] != " " for line in lines if line[0] != "-")  # right-aligned


def test_missing_csv(tmp_path: Path, labels: Path) -> None:
    with pytest.raises(InputNotFoundError, match="submission not found"):
        evaluate(EvaluateConfig(tmp_path / "none.csv", labels))


def test_missing_rows_score_as_empty_masks_and_extra_rows_are_listed(
    tmp_path: Path, labels: Path
) -> None:
    sub = write(tmp_path, {"ghost": "", "a": encode_rle(predictions()["a"])})
    report = evaluate(EvaluateConfig(sub, labels))
    assert [s.id for s in report.scores] == ["a", "b", "empty"]
    a, b, empty = report.scores
    assert not a.missing and b.missing and empty.missing
    assert b == FragmentScore("b", 0.0, 0.0, 0.0, 0, 0, 4, missing=True)
    assert empty.fbeta == 1.0  # an empty mask of a label without ink
    assert report.mean_fbeta == pytest.approx((a.fbeta + 0.0 + 1.0) / 3)
    assert report.missing == ("b", "empty") and report.extra == ("ghost",)
    table = report.to_table()
    assert "b (missing)" in table
    assert "missing rows (2), scored as empty masks: b, empty" in table
    assert "extra rows (1), no label image, not scored: ghost" in table


def test_no_row_matching_any_label_is_an_error(tmp_path: Path, labels: Path) -> None:
    sub = write(tmp_path, {"x": "", "y": ""})
    with pytest.raises(InvalidInputError, match="none of its ids \\(x, y\\).*check --labels"):
        evaluate(EvaluateConfig(sub, labels))


def test_labels_folder_without_label_images(tmp_path: Path) -> None:
    (tmp_path / "labels").mkdir()
    sub = write(tmp_path, {"a": ""})
    with pytest.raises(InputNotFoundError, match="no label images in"):
        evaluate(EvaluateConfig(sub, tmp_path / "labels"))


def test_bad_rle_names_file_and_row(tmp_path: Path, labels: Path) -> None:
    sub = write(tmp_path, {"a": "", "b": "1 2 2 1"})
    with pytest.raises(InvalidInputError) as err:
        evaluate(EvaluateConfig(sub, labels))
    message = str(err.value)
    assert str(sub) in message and "Id 'b'" in message and "overlaps" in message
    assert "\n" not in message


def test_rle_for_wrong_shape(tmp_path: Path, labels: Path) -> None:
    sub = write(tmp_path, {"b": "1 21"})  # b is 5x4 = 20 pixels
    with pytest.raises(InvalidInputError, match="labels 5x4.*past the end"):
        evaluate(EvaluateConfig(sub, labels))


def test_empty_submission(tmp_path: Path, labels: Path) -> None:
    sub = write(tmp_path, {})
    with pytest.raises(InvalidInputError, match="no rows"):
        evaluate(EvaluateConfig(sub, labels))


def test_corrupt_label_image(tmp_path: Path, labels: Path) -> None:
    (labels / "c.png").write_bytes(b"not a png")
    sub = write(tmp_path, {"c": ""})
    with pytest.raises(InkpipeError, match="c.png"):
        evaluate(EvaluateConfig(sub, labels))


def test_config_checks_beta(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="beta"):
        EvaluateConfig(tmp_path / "s.csv", tmp_path, beta=0)
    cfg = EvaluateConfig("s.csv", "labels")  # type: ignore[arg-type]
    assert isinstance(cfg.submission, Path) and isinstance(cfg.labels, Path)
