"""The run's history: one row of metrics per epoch, written as a CSV and plotted as a PNG.

With ``--tensorboard`` the same rows also go to TensorBoard event files in the run folder,
beside ``metrics.csv`` (``tensorboard --logdir runs`` shows every run under ``runs/``). That
needs the optional ``tensorboard`` package (``pip install 'inkpipe[tensorboard]'``).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from inkpipe.pipeline.errors import MissingPackageError
from inkpipe.pipeline.files import atomic_target, atomic_write

METRIC_FIELDS = (
    "epoch",
    "steps",
    "train_loss",
    "val_f05",
    "val_precision",
    "val_recall",
    "threshold",
    "lr",
    "seconds",
    "crops_per_s",
)


def write_metrics(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write the per-epoch metrics CSV (atomically)."""
    with atomic_write(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=METRIC_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def plot_metrics(path: Path, rows: list[dict[str, Any]]) -> None:
    """Plot loss, validation F0.5 and threshold over epochs to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    axes[0].plot(epochs, [r["train_loss"] for r in rows], marker="o")
    axes[0].set_title("training loss")
    axes[1].plot(epochs, [_num(r["val_f05"]) for r in rows], marker="o", color="tab:green")
    axes[1].set_title("validation F0.5")
    axes[1].set_ylim(0, 1)
    axes[2].plot(epochs, [_num(r["threshold"]) for r in rows], marker="o", color="tab:orange")
    axes[2].set_title("threshold")
    axes[2].set_ylim(0, 1)
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    try:
        with atomic_target(path) as tmp:
            fig.savefig(tmp, dpi=80, format="png")
    finally:
        plt.close(fig)


def _num(v: Any) -> float:
    return float("nan") if v in ("", None) else float(v)


# metrics.csv column -> TensorBoard tag
TENSORBOARD_TAGS = {
    "train_loss": "train/loss",
    "val_f05": "val/f05",
    "val_precision": "val/precision",
    "val_recall": "val/recall",
    "threshold": "val/threshold",
    "lr": "train/lr",
    "crops_per_s": "speed/crops_per_s",
    "seconds": "speed/epoch_seconds",
}
TENSORBOARD_INSTALL = "pip install 'inkpipe[tensorboard]' (or pip install tensorboard)"


class TensorBoardLog:
    """Append the history rows to TensorBoard event files in a run folder, one step per epoch.

    A resumed run adds a new event file beside the first; TensorBoard shows them as one run.
    """

    def __init__(self, out: Path) -> None:
        """Open a writer on ``out``; raise :class:`MissingPackageError` without tensorboard."""
        try:
            import tensorboard  # noqa: F401  (torch.utils.tensorboard needs it)
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise MissingPackageError(
                f"--tensorboard needs the tensorboard package, which is not installed; "
                f"install it with {TENSORBOARD_INSTALL}, or drop --tensorboard "
                "(metrics.csv has the same numbers)"
            ) from None
        self.writer = SummaryWriter(log_dir=str(out))

    def write(self, row: dict[str, Any]) -> None:
        """Add the numbers of one ``metrics.csv`` row at step ``row["epoch"]`` and flush."""
        for column, tag in TENSORBOARD_TAGS.items():
            value = row.get(column, "")
            if value not in ("", None):
                self.writer.add_scalar(tag, float(value), global_step=int(row["epoch"]))
        self.writer.flush()

    def close(self) -> None:
        """Flush and close the event file."""
        self.writer.close()
