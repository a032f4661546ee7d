"""Two gloo processes under torchrun: rank 0 validates a whole fragment each epoch while the
other rank waits in the barrier, and only rank 0 writes the run's files."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_rank_0_validates_a_fragment_while_the_other_waits(tiny_store, tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    cmd += ["--master-port", "29531", "-m", "inkpipe.cli", "train", "--store", str(tiny_store)]
    cmd += ["--out", str(out), "--layers", "2:6", "--fragment", "1", "--fragment", "2"]
    cmd += ["--val", "fragment:2", "--epochs", "2", "--steps-per-epoch", "1", "--batch-size", "2"]
    cmd += ["--device", "cpu", "--tensorboard", "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2"] and all(r["val_f05"] != "" for r in rows)
    assert len(list(out.glob("events.out.tfevents.*"))) == 1  # rank 0 only
    assert proc.stdout.count("best val F0.5") == 1  # rank 0 logs, the other is quiet
