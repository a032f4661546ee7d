"""Score a submission CSV against ink label images, per fragment and on average.

Every row of the submission is decoded at its label image's shape and scored over the whole
image, as the competition did (no papyrus mask). The mean is unweighted over fragments.
Empty prediction of an empty label scores 1; see :mod:`inkpipe.numerics.metrics`.

Label images are found as ``LABELS/<id>/inklabels.png`` (the competition's fragment layout)
or ``LABELS/<id>.png``, and read with the same per-image rule as ingest
(:func:`inkpipe.pipeline.images.read_binary`).

The label images define the fragments expected (:data:`ROW_RULE`): the competition required a
row for every test fragment, so a fragment without a row is scored as an empty prediction
(F0.5 0 when it has ink) and counted in the mean; a row without a label image is reported
and not scored. An empty ``Predicted`` is a valid empty mask.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path

from numpy.typing import ArrayLike

from inkpipe.numerics.metrics import check_beta, confusion, fbeta_counts, precision_recall
from inkpipe.pipeline.errors import InputNotFoundError, InvalidInputError
from inkpipe.pipeline.images import read_binary
from inkpipe.pipeline.text import format_table

from .rle import decode_rle, read_submission

LABEL_FILE = "inklabels.png"
ROW_RULE = (
    "Every fragment with a label image needs a row: a missing row is scored as an empty mask "
    "(F0.5 0 when the fragment has ink) and counted in the mean; a row without a label image "
    "is listed as extra and not scored; an empty Predicted is a valid empty mask."
)
_LOOKS_LIKE_RLE = re.compile(r"\s*\d+(\s+\d+)+\s*")


@dataclass(frozen=True)
class EvaluateConfig:
    """What to score.

    Attributes:
        submission: the submission CSV (``Id,Predicted``).
        labels: folder holding ``<id>/inklabels.png`` or ``<id>.png`` per fragment.
        beta: F-beta weight of recall (> 0); the competition used 0.5.
    """

    submission: Path
    labels: Path
    beta: float = 0.5

    def __post_init__(self) -> None:
        """Normalize paths and check ``beta``."""
        object.__setattr__(self, "submission", Path(self.submission))
        object.__setattr__(self, "labels", Path(self.labels))
        object.__setattr__(self, "beta", check_beta(self.beta))


@dataclass(frozen=True)
class FragmentScore:
    """The score of one fragment."""

    id: str
    fbeta: float
    precision: float
    recall: float
    tp: int
    fp: int
    fn: int
    missing: bool = False  # no row in the submission: scored as an empty mask


@dataclass(frozen=True)
class EvaluationReport:
    """Scores of every expected fragment and their unweighted means.

    Attributes:
        scores: one per fragment with a label image: the submission's rows in file order,
            then the fragments without a row (``missing``), by id.
        mean_fbeta, mean_precision, mean_recall: unweighted means over ``scores``.
        beta: the F-beta weight.
        missing: ids with a label image but no row (scored as empty masks).
        extra: ids of rows without a label image (not scored).
    """

    scores: tuple[FragmentScore, ...]
    mean_fbeta: float
    mean_precision: float
    mean_recall: float
    beta: float = 0.5
    missing: tuple[str, ...] = ()
    extra: tuple[str, ...] = ()

    def to_table(self) -> str:
        """Return an aligned text table: one row per fragment, the mean row, then notes.

        A fragment without a row is marked ``(missing)``; below the table, one line lists
        the missing ids and one the extra rows, when there are any.
        """
        f_name = f"F{self.beta:g}"
        header = ("fragment", f_name, "precision", "recall", "tp", "fp", "fn")
        rows = [
            (s.id + (" (missing)" if s.missing else ""), f"{s.fbeta:.4f}", f"{s.precision:.4f}")
            + (f"{s.recall:.4f}", str(s.tp), str(s.fp), str(s.fn))
            for s in self.scores
        ]
        mean = (
            "mean",
            f"{self.mean_fbeta:.4f}",
            f"{self.mean_precision:.4f}",
            f"{self.mean_recall:.4f}",
            "",
            "",
            "",
        )
        notes = []
        if self.missing:
            notes.append(
                f"missing rows ({len(self.missing)}), scored as empty masks: "
                + ", ".join(self.missing)
            )
        if self.extra:
            notes.append(
                f"extra rows ({len(self.extra)}), no label image, not scored: "
                + ", ".join(self.extra)
            )
        return "\n".join([format_table(header, rows, footer=[mean]), *notes])


def label_ids(labels_dir: Path) -> list[str]:
    """Return the ids of the fragments with a label image in ``labels_dir``, sorted.

    A fragment is ``<id>/inklabels.png`` or ``<id>.png``; hidden names are skipped.

    Raises:
        InputNotFoundError: ``labels_dir`` is missing, or holds no label image.
    """
    labels_dir = Path(labels_dir)
    if not labels_dir.is_dir():
        raise InputNotFoundError(
            f"labels folder not found: {labels_dir}; pass the folder holding <id>/{LABEL_FILE}"
        )
    ids = set()
    for child in labels_dir.iterdir():
        if child.name.startswith("."):
            continue
        if child.is_dir() and (child / LABEL_FILE).is_file():
            ids.add(child.name)
        elif child.is_file() and child.suffix.lower() == ".png":
            ids.add(child.stem)
    if not ids:
        raise InputNotFoundError(
            f"no label images in {labels_dir}: expected <id>/{LABEL_FILE} or <id>.png per "
            "fragment; pass the folder that holds them"
        )
    return sorted(ids)


def find_label_image(labels_dir: Path, fragment_id: str) -> Path:
    """Return the ink label image of a fragment.

    Args:
        labels_dir: folder of labels.
        fragment_id: the fragment's id, as in the submission.

    Returns:
        ``labels_dir/<id>/inklabels.png`` if it exists, else ``labels_dir/<id>.png``.

    Raises:
        InputNotFoundError: ``labels_dir`` is missing, or neither file exists (both paths are
            named).
    """
    labels_dir = Path(labels_dir)
    if not labels_dir.is_dir():
        raise InputNotFoundError(
            f"labels folder not found: {labels_dir}; pass the folder holding <id>/{LABEL_FILE}"
        )
    candidates = (labels_dir / fragment_id / LABEL_FILE, labels_dir / f"{fragment_id}.png")
    for path in candidates:
        if path.is_file():
            return path
    raise InputNotFoundError(
        f"no ink labels for fragment '{fragment_id}': tried {candidates[0]} and {candidates[1]}; "
        "add one of them or remove the row from the submission"
    )


def score_fragment(
    fragment_id: str, pred: ArrayLike, truth: ArrayLike, beta: float = 0.5
) -> FragmentScore:
    """Score one binary prediction against its labels.

    Args:
        fragment_id: the fragment's id.
        pred: (H, W) bool or 0/1 array.
        truth: (H, W) bool or 0/1 array.
        beta: F-beta weight of recall (> 0).
    """
    tp, fp, fn = confusion(pred, truth)
    precision, recall = precision_recall(tp, fp, fn)
    return FragmentScore(fragment_id, fbeta_counts(tp, fp, fn, beta), precision, recall, tp, fp, fn)


def _check_extra(cfg: EvaluateConfig, rows: dict[str, str], expected: list[str]) -> list[str]:
    """Return the ids of rows without a label image; refuse when they show a mistake.

    Raises:
        InvalidInputError: an extra Id looks like a run-length string (swapped columns), or
            no row at all has a label image (the wrong labels folder or submission).
    """
    known = set(expected)
    extra = [i for i in rows if i not in known]
    for fragment_id in extra:
        if _LOOKS_LIKE_RLE.fullmatch(fragment_id):
            raise InvalidInputError(
                f"submission {cfg.submission}: Id '{fragment_id[:40]}' looks like a run-length "
                "string, are the columns swapped? expected 'Id,Predicted' with the fragment id "
                "first"
            )
    if extra and len(extra) == len(rows):
        raise InvalidInputError(
            f"submission {cfg.submission}: none of its ids ({', '.join(extra[:10])}) has a label "
            f"image in {cfg.labels} (it has {', '.join(expected[:10])}); check --labels"
        )
    return extra


def evaluate(cfg: EvaluateConfig) -> EvaluationReport:
    """Score a submission against every label image of ``cfg.labels``.

    Rows are matched to label images by Id. :data:`ROW_RULE`: a fragment with a label image
    but no row is scored as an empty mask and counted in the mean; a row without a label
    image is reported in ``extra`` and not scored.

    Args:
        cfg: the submission, the labels folder and beta.

    Returns:
        An :class:`EvaluationReport`: the submission's rows in file order, then the missing
        fragments by id.

    Raises:
        InputNotFoundError: the CSV or the labels folder is missing, or the folder holds no
            label image.
        InvalidInputError: the CSV is malformed or has no rows, no row matches a label
            image, an Id looks like a run-length string (swapped columns), a label image
            fits no reading rule, or a row's RLE does not decode at its label image's shape
            (the message names the file and the row).
    """
    rows = read_submission(cfg.submission)
    if not rows:
        raise InvalidInputError(
            f"submission {cfg.submission} has a header but no rows, expected one row per "
            "fragment; write predictions first"
        )
    expected = label_ids(cfg.labels)
    extra = _check_extra(cfg, rows, expected)
    missing = [i for i in expected if i not in rows]
    scores = []
    for fragment_id in [*(i for i in rows if i not in extra), *missing]:
        label_path = find_label_image(cfg.labels, fragment_id)
        truth = read_binary(label_path, "ink labels", all_set_ok=False)  # as ingest does
        rle = rows.get(fragment_id, "")
        try:
            pred = decode_rle(rle, truth.shape)
        except InvalidInputError as exc:
            raise InvalidInputError(
                f"submission {cfg.submission}, Id '{fragment_id}' "
                f"(labels {truth.shape[0]}x{truth.shape[1]}): {exc}"
            ) from None
        score = score_fragment(fragment_id, pred, truth, cfg.beta)
        scores.append(replace(score, missing=fragment_id not in rows))
    n = len(scores)
    return EvaluationReport(
        scores=tuple(scores),
        mean_fbeta=sum(s.fbeta for s in scores) / n,
        mean_precision=sum(s.precision for s in scores) / n,
        mean_recall=sum(s.recall for s in scores) / n,
        beta=cfg.beta,
        missing=tuple(missing),
        extra=tuple(extra),
    )
