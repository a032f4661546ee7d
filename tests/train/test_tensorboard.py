"""``--tensorboard``: the metrics rows as TensorBoard scalars, and the error without the package."""

from __future__ import annotations

import sys

import pytest
from click.testing import CliRunner

from inkpipe.cli import cli
from inkpipe.pipeline.errors import MissingPackageError
from inkpipe.train.history import TensorBoardLog

ROW = {"epoch": 1, "steps": 5, "train_loss": 0.5, "val_f05": 0.25, "val_precision": ""}


def read_scalars(folder) -> dict[str, list[tuple[int, float]]]:
    """Read the event files of ``folder`` with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.fixture
def without_tensorboard(monkeypatch):
    """Make ``import tensorboard`` fail as it does when the package is not installed."""
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    for name in list(sys.modules):
        if name.startswith("torch.utils.tensorboard"):
            monkeypatch.delitem(sys.modules, name)


def test_rows_become_scalars_per_epoch(tmp_path):
    pytest.importorskip("tensorboard")
    board = TensorBoardLog(tmp_path)
    board.write(ROW)
    board.write({**ROW, "epoch": 2, "train_loss": 0.25, "val_f05": 0.5})
    board.close()
    scalars = read_scalars(tmp_path)
    assert scalars["train/loss"] == [(1, 0.5), (2, 0.25)]
    assert scalars["val/f05"] == [(1, 0.25), (2, 0.5)]
    assert "val/precision" not in scalars  # empty cells are left out


def test_without_the_package_the_error_says_how_to_install_it(tmp_path, without_tensorboard):
    with pytest.raises(MissingPackageError) as e:
        TensorBoardLog(tmp_path)
    message = str(e.value)
    assert "\n" not in message and "pip install 'inkpipe[tensorboard]'" in message
    assert message.startswith("--tensorboard needs the tensorboard package")
    assert isinstance(e.value, ImportError) and not any(tmp_path.iterdir())


def train_args(store, out) -> list[str]:
    args = ["train", "--store", str(store), "--out", str(out), "--layers", "2:6", "--epochs", "1"]
    return [*args, "--steps-per-epoch", "1", "--batch-size", "2", "--val", "patches:2", "--quiet"]


def test_train_writes_event_files_beside_metrics_csv(tiny_store, tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, [*train_args(tiny_store, out), "--tensorboard"])
    assert result.exit_code == 0, result.output
    assert (out / "metrics.csv").is_file() and list(out.glob("events.out.tfevents.*"))
    scalars = read_scalars(out)
    assert [step for step, _ in scalars["val/f05"]] == [1]
    assert {"train/loss", "train/lr", "val/threshold", "speed/crops_per_s"} <= set(scalars)


def test_train_without_the_package_is_one_line(tiny_store, tmp_path, without_tensorboard):
    result = CliRunner().invoke(cli, [*train_args(tiny_store, tmp_path / "run"), "--tensorboard"])
    assert result.exit_code == 1, result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("Error: --tensorboard needs the tensorboard package")
    assert "Traceback" not in result.output
