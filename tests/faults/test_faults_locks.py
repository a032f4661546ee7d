"""Fault injection: two writers of one store or one run folder, and locks left by kill -9.

The second writer gets a one-line error naming the lock file and how to clear it, and the
store or run it would have written is untouched; a lock whose owner is gone is taken over with
a message; a lock from another host is never taken over.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from inkpipe.cli import cli
from inkpipe.pipeline.errors import LockedError
from inkpipe.pipeline.ingest import IngestConfig, ingest, store_lock_path
from inkpipe.pipeline.locks import UNREADABLE_GRACE_S, hold_lock, read_lock
from inkpipe.train.loop import run_lock_path
from tests.conftest import TINY, write_fragment
from tests.faults.faultkit import (
    DRIVER,
    assert_lossless,
    dead_pid,
    error_line,
    file_stamps,
    live_process,
    run_cli,
    write_lock,
)

TINY_ARGS = ["--chunk-layers", "4", "--chunk-px", "64", "--tile", "32", "--stride", "16"]


@pytest.fixture
def sources(tmp_path: Path) -> dict[str, Path]:
    root = tmp_path / "fragments"
    return {
        "1": write_fragment(root / "train" / "1", seed=1),
        "2": write_fragment(root / "train" / "2", height=70, width=100, seed=2),
    }


def ingest_args(sources: dict[str, Path], store: Path) -> list[str]:
    return ["ingest", str(next(iter(sources.values())).parent), "--out", str(store), "--quiet"]


def test_lock_file_says_who_holds_it_and_goes_away(tmp_path):
    lock = tmp_path / "x.lock"
    with hold_lock(lock, "store x", "inkpipe ingest") as me:
        owner = read_lock(lock)
        assert owner == me
        assert owner.pid == os.getpid() and owner.host == socket.gethostname()
        assert owner.command == "inkpipe ingest" and owner.locked_at <= time.time()
        again = hold_lock(lock, "store x", "inkpipe ingest")  # the same process: not re-entered
        with pytest.raises(LockedError, match="is locked by 'inkpipe ingest'"), again:
            pass
    assert not lock.exists()
    with pytest.raises(RuntimeError), hold_lock(lock, "store x", "inkpipe ingest"):
        raise RuntimeError("boom")
    assert not lock.exists()  # released after an error too


def test_second_ingest_is_refused_and_the_store_untouched(sources, tmp_path):
    store = tmp_path / "store.zarr"
    ingest(IngestConfig(root=sources["1"], out=store, settings=TINY, progress=False), log=print)
    before = file_stamps(store)
    with live_process() as owner:
        lock = write_lock(store_lock_path(store), owner.pid)
        result = CliRunner().invoke(cli, [*ingest_args(sources, store), *TINY_ARGS])
        line = error_line(result.output, result.exit_code)
        assert f"store {store} is locked by 'inkpipe ingest' (pid {owner.pid} on host" in line
        assert f"if no such process runs, delete {lock}" in line
        assert lock.exists()  # the owner's lock stays
    assert file_stamps(store) == before
    assert_lossless(store, {"1": sources["1"]})


def test_stale_lock_of_a_killed_ingest_is_taken_over(sources, tmp_path):
    store = tmp_path / "store.zarr"
    lock = write_lock(store_lock_path(store), dead_pid())
    result = CliRunner().invoke(cli, [*ingest_args(sources, store), *TINY_ARGS])
    assert result.exit_code == 0, result.output
    assert f"taking over the stale lock {lock}" in result.output
    assert "no longer runs on this host" in result.output
    assert not lock.exists()
    assert_lossless(store, sources)


def test_a_reused_pid_does_not_keep_a_lock(sources, tmp_path):
    store = tmp_path / "store.zarr"
    with live_process() as other:  # alive, but started after the lock's owner did
        lock = write_lock(store_lock_path(store), other.pid, process_started=time.time() - 3600)
        result = CliRunner().invoke(cli, [*ingest_args(sources, store), *TINY_ARGS])
    assert result.exit_code == 0, result.output
    assert "taking over the stale lock" in result.output and not lock.exists()


def test_a_lock_from_another_host_is_respected(sources, tmp_path):
    store = tmp_path / "store.zarr"
    lock = write_lock(store_lock_path(store), dead_pid(), host="other-host.example")
    result = CliRunner().invoke(cli, [*ingest_args(sources, store), *TINY_ARGS])
    line = error_line(result.output, result.exit_code)
    assert "on host other-host.example" in line
    assert f"if that process is gone, delete {lock} and run again" in line
    assert not store.exists()


def test_an_unreadable_lock_is_respected_while_young_then_taken_over(sources, tmp_path):
    store = tmp_path / "store.zarr"
    lock = store_lock_path(store)
    lock.write_text("")  # a writer between creating and filling its lock
    result = CliRunner().invoke(cli, [*ingest_args(sources, store), *TINY_ARGS])
    assert "lock being written" in error_line(result.output, result.exit_code)
    old = time.time() - UNREADABLE_GRACE_S - 5
    os.utime(lock, (old, old))
    result = CliRunner().invoke(cli, [*ingest_args(sources, store), *TINY_ARGS])
    assert result.exit_code == 0, result.output
    assert "unreadable" in result.output and not lock.exists()


# The first writer stops inside its first fragment until the test lets it go on.
PAUSE = """
import os, time
from pathlib import Path
from inkpipe.pipeline import ingest as m
_one = m._ingest_one
def paused(*a, **k):
    Path(os.environ["PAUSED"]).touch()
    while not Path(os.environ["GO"]).exists():
        time.sleep(0.02)
    return _one(*a, **k)
m._ingest_one = paused
"""


def test_two_concurrent_ingests(sources, tmp_path):
    store = tmp_path / "store.zarr"
    paused, go = tmp_path / "paused", tmp_path / "go"
    first = subprocess.Popen(
        [sys.executable, "-c", DRIVER.format(patch=PAUSE), *ingest_args(sources, store)]
        + TINY_ARGS,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PAUSED": str(paused), "GO": str(go), "OMP_NUM_THREADS": "1"},
    )
    try:
        deadline = time.time() + 60
        while not paused.exists():
            assert first.poll() is None and time.time() < deadline, first.stdout.read()
            time.sleep(0.02)
        # the second writer, while the first holds the store
        second = run_cli([*ingest_args(sources, store), *TINY_ARGS])
        line = error_line(second.stdout + second.stderr, second.returncode)
        assert f"is locked by 'inkpipe ingest' (pid {first.pid} on host" in line
        assert str(store_lock_path(store)) in line
    finally:
        go.touch()
        out, _ = first.communicate(timeout=60)
    assert first.returncode == 0, out
    assert "2 fragment(s) ingested" in out
    assert not store_lock_path(store).exists()
    assert_lossless(store, sources)


def test_second_train_into_one_run_folder_is_refused(tiny_store, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    args = ["train", "--store", str(tiny_store), "--out", str(out), "--layers", "2:6"]
    args += ["--epochs", "1", "--steps-per-epoch", "1", "--batch-size", "2", "--tile", "32"]
    args += ["--val", "patches:2", "--device", "cpu", "--quiet"]
    with live_process() as owner:
        lock = write_lock(run_lock_path(out), owner.pid, command="inkpipe train")
        result = CliRunner().invoke(cli, args)
        line = error_line(result.output, result.exit_code)
        assert f"run {out} is locked by 'inkpipe train' (pid {owner.pid}" in line
        assert str(lock) in line
    assert sorted(p.name for p in out.iterdir()) == [lock.name]  # nothing written
    lock.write_text(json.dumps({"pid": dead_pid()}))  # a damaged lock of a dead process
    os.utime(lock, (time.time() - 60, time.time() - 60))
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "taking over the stale lock" in result.output
    assert (out / "last.pt").is_file() and not lock.exists()
