"""``inkpipe train`` through click's CliRunner, and under torchrun with two processes."""

import csv
import os
import shutil
import subprocess
import sys

from click.testing import CliRunner

from inkpipe.cli import cli
from inkpipe.pipeline.layers import LayerRange
from inkpipe.train.checkpoint import load_checkpoint


def test_train_cli(tiny_store, tmp_path):
    out = tmp_path / "cli"
    args = [
        "train",
        "--store",
        str(tiny_store),
        "--out",
        str(out),
        "--layers",
        "2:6",
        "--epochs",
        "1",
        "--steps-per-epoch",
        "1",
        "--batch-size",
        "2",
        "--val",
        "patches:2",
        "--quiet",
    ]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "best val F0.5" in result.output and (out / "best.pt").is_file()
    result = CliRunner().invoke(cli, [*args[:5], "--layers", "38:28"])
    assert result.exit_code == 1 and "START:STOP" in result.output
    assert "Traceback" not in result.output


def test_damaged_store_chunk_in_a_loader_worker_is_one_line(tiny_store, tmp_path):
    store = tmp_path / "store.zarr"
    shutil.copytree(tiny_store, store)
    for chunk in store.glob("*/volume/c/**/*"):
        if chunk.is_file():
            chunk.write_bytes(chunk.read_bytes()[:40])  # every volume chunk truncated
    args = ["train", "--store", str(store), "--out", str(tmp_path / "run"), "--layers", "2:6"]
    args += ["--epochs", "1", "--steps-per-epoch", "1", "--batch-size", "2", "--val", "patches:2"]
    result = CliRunner().invoke(cli, [*args, "--workers", "2", "--quiet"])
    assert result.exit_code == 1, result.output
    # the run's log lines, then the error on one line of its own
    lines = result.output.strip().splitlines()
    assert any(line.startswith("training ") for line in lines[:-1]), result.output
    assert "Traceback" not in result.output and "DataLoader" not in result.output
    assert sum("damaged" in line for line in lines) == 1, result.output
    assert lines[-1].startswith("Error: store chunk file ") and "is damaged" in lines[-1]
    assert lines[-1].endswith("--overwrite`")


def test_ddp_on_cpu_with_two_processes(tiny_store, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        "29517",
        "-m",
        "inkpipe.cli",
        "train",
        "--store",
        str(tiny_store),
        "--out",
        str(out),
        "--layers",
        "2:6",
        "--epochs",
        "1",
        "--steps-per-epoch",
        "2",
        "--batch-size",
        "2",
        "--val",
        "patches:2",
        "--quiet",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert len(rows) == 1 and load_checkpoint(out / "best.pt").layers == LayerRange(2, 6)
