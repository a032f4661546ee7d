"""Fault injection: ``kill -9`` during a training epoch, then ``inkpipe train --resume``.

On CPU with a fixed seed and ``--workers 0``, the resumed run ends with exactly the weights
(the EMA that is saved, and the raw training weights) of a run that was never interrupted:
``last.pt`` holds the optimiser, scheduler, EMA and every random stream (train/rng.py).
"""

from __future__ import annotations

import signal

import pytest
import torch
from click.testing import CliRunner

from inkpipe.cli import cli
from inkpipe.train.checkpoint import load_checkpoint
from inkpipe.train.loop import run_lock_path
from tests.faults.faultkit import run_cli

# SIGKILL at the start of optimiser step KILL_AT (0-based): 3 is the second one of epoch 2.
KILL_AT_STEP = """
import os, signal
from inkpipe.train import loop as m
_step = m.Trainer.step
def step(self, state, batch):
    if state.step == int(os.environ["KILL_AT"]):
        os.kill(os.getpid(), signal.SIGKILL)
    return _step(self, state, batch)
m.Trainer.step = step
"""


def train_args(store, out):
    args = ["train", "--store", str(store), "--out", str(out), "--layers", "2:6", "--tile", "32"]
    args += ["--epochs", "2", "--steps-per-epoch", "2", "--batch-size", "4", "--val", "patches:4"]
    # full augmentation and a depth shift: the random streams matter
    args += ["--aug", "full", "--depth-shift", "1", "--workers", "0", "--seed", "7"]
    return [*args, "--device", "cpu", "--quiet"]


@pytest.fixture
def one_thread():
    """Match the killed subprocess (OMP_NUM_THREADS=1): same thread count, same sums."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_kill_9_mid_epoch_then_resume_gives_the_same_weights(tiny_store, tmp_path, one_thread):
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    result = CliRunner().invoke(cli, train_args(tiny_store, whole))
    assert result.exit_code == 0, result.output

    killed = run_cli(train_args(tiny_store, broken), patch=KILL_AT_STEP, env={"KILL_AT": "3"})
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    assert load_checkpoint(broken / "last.pt").metrics["epoch"] == 1  # epoch 2 was cut short
    assert run_lock_path(broken).exists()

    result = CliRunner().invoke(cli, [*train_args(tiny_store, broken), "--resume"])
    assert result.exit_code == 0, result.output
    assert "taking over the stale lock" in result.output
    assert f"resuming {broken} at epoch 2" in result.output

    a, b = load_checkpoint(whole / "last.pt"), load_checkpoint(broken / "last.pt")
    assert a.metrics["epoch"] == b.metrics["epoch"] == 2
    for name in ("state_dict", "train_state_dict"):
        sa = a.state_dict if name == "state_dict" else a.extra[name]
        sb = b.state_dict if name == "state_dict" else b.extra[name]
        assert sa.keys() == sb.keys()
        different = [k for k in sa if not torch.equal(sa[k], sb[k])]
        assert not different, f"{name}: {different[:5]}"
    losses = [[row["train_loss"] for row in ck.extra["history"]] for ck in (a, b)]
    assert losses[0] == losses[1]
