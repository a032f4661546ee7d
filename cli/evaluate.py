"""``inkpipe evaluate``: score a submission CSV (no torch: its own module, not predict's)."""

from __future__ import annotations

from pathlib import Path

import click

from inkpipe.infer.evaluate import EvaluateConfig, evaluate

from .options import default_of


@click.command("evaluate", short_help="Score a submission CSV against ink labels (F0.5).")
@click.argument("submission", type=click.Path(path_type=Path))
@click.option(
    "--labels",
    required=True,
    type=click.Path(path_type=Path),
    help="Folder with the ink labels: <id>/inklabels.png (fragment layout) or <id>.png. Its "
    "label images are the fragments expected.",
)
@click.option(
    "--beta",
    type=float,
    default=default_of(EvaluateConfig, "beta"),
    show_default=True,
    help="F-beta weight of recall; the competition scored F0.5.",
)
def evaluate_command(submission: Path, labels: Path, beta: float) -> None:
    """Score a submission CSV against ink labels, per fragment and on average.

    Every row is decoded at its label image's shape and scored over the whole image, as the
    competition did. Every fragment with a label image needs a row: a missing row is scored
    as an empty mask (F0.5 0 when the fragment has ink) and counted in the mean; a row
    without a label image is listed as extra and not scored. An empty Predicted is a valid
    empty mask. Label images are read as in ingest: 0/1 (1 is ink), 8-bit grey (ink above 127)
    or 1-bit; 16-bit, coloured, transparent and all-ink images are refused.
    """
    report = evaluate(EvaluateConfig(submission=submission, labels=labels, beta=beta))
    click.echo(report.to_table())
