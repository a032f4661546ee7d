"""Score a submission CSV against ink label images, per fragment and on average.

Every row of the submission is decoded at its label image's shape and scored over the whole
image, as the competition did (no papyrus mask). The mean is unweighted over fragments.
Empty prediction of an empty label scores 1; see :mod:`inkpipe.infer.metrics`.

Label images are found as ``LABELS/<id>/inklabels.png`` (the competition's fragment layout)
or ``LABELS/<id>.png``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from numpy.typing import ArrayLike

from inkpipe.numerics.metrics import check_beta, confusion, fbeta_counts, precision_recall
from inkpipe.pipeline.errors import InputNotFoundError, InvalidInputError
from inkpipe.pipeline.images import read_binary
from inkpipe.pipeline.text import format_table

from .rle import decode_rle, read_submission


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


@dataclass(frozen=True)
class EvaluationReport:
    """Scores of every fragment in a submission and their unweighted means."""

    scores: tuple[FragmentScore, ...]
    mean_fbeta: float
    mean_precision: float
    mean_recall: float
    beta: float = 0.5

    def to_table(self) -> str:
        """Return an aligned text table: one row per fragment, then the mean row."""
        f_name = f"F{self.beta:g}"
        header = ("fragment", f_name, "precision", "recall", "tp", "fp", "fn")
        rows = [
            (s.id, f"{s.fbeta:.4f}", f"{s.precision:.4f}", f"{s.recall:.4f}", str(s.tp))
            + (str(s.fp), str(s.fn))
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
        return format_table(header, rows, footer=[mean])


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
            f"labels folder not found: {labels_dir}; pass the folder holding <id>/inklabels.png"
        )
    candidates = (labels_dir / fragment_id / "inklabels.png", labels_dir / f"{fragment_id}.png")
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


def evaluate(cfg: EvaluateConfig) -> EvaluationReport:
    """Score every row of a submission against its label image.

    Args:
        cfg: the submission, the labels folder and beta.

    Returns:
        An :class:`EvaluationReport` in submission row order.

    Raises:
        InputNotFoundError: the CSV, the labels folder or a fragment's label image is missing.
        InvalidInputError: the CSV is malformed or empty, or a row's RLE does not decode at its
            label image's shape (the message names the file and the row).
    """
    rows = read_submission(cfg.submission)
    if not rows:
        raise InvalidInputError(
            f"submission {cfg.submission} has a header but no rows, expected one row per "
            "fragment; write predictions first"
        )
    scores = []
    for fragment_id, rle in rows.items():
        truth = read_binary(find_label_image(cfg.labels, fragment_id), "ink labels")
        try:
            pred = decode_rle(rle, truth.shape)
        except InvalidInputError as exc:
            raise InvalidInputError(
                f"submission {cfg.submission}, Id '{fragment_id}' "
                f"(labels {truth.shape[0]}x{truth.shape[1]}): {exc}"
            ) from None
        scores.append(score_fragment(fragment_id, pred, truth, cfg.beta))
    n = len(scores)
    return EvaluationReport(
        scores=tuple(scores),
        mean_fbeta=sum(s.fbeta for s in scores) / n,
        mean_precision=sum(s.precision for s in scores) / n,
        mean_recall=sum(s.recall for s in scores) / n,
        beta=cfg.beta,
    )
