"""Fault injection: ``kill -9`` in the middle of an ingest, then the same command again.

The killed process leaves a stale lock and an incomplete fragment. The rerun takes the lock
over, keeps the complete fragments without rewriting them, redoes only the interrupted one,
and the store then holds every source pixel exactly.
"""

from __future__ import annotations

import signal

import pytest
from click.testing import CliRunner

from inkpipe.cli import cli
from inkpipe.pipeline.ingest import store_lock_path
from inkpipe.pipeline.locks import read_lock
from inkpipe.pipeline.store import fragment_ids, fragment_meta, open_store
from tests.faults.faultkit import assert_lossless, file_stamps, run_cli, three_fragments

TINY_ARGS = ["--chunk-layers", "4", "--chunk-px", "64", "--tile", "32", "--stride", "16"]

# SIGKILL (no cleanup of any kind) while fragment 1 is written: in its third band of the
# volume, or after everything but the completion marker.
KILL_IN_VOLUME = """
import os, signal
from inkpipe.pipeline import ingest as m
_copy, bands = m.copy_band, []
def copy_band(volume_path, *a, **k):
    if "/1/volume" in str(volume_path):
        bands.append(1)
        if len(bands) == 3:
            os.kill(os.getpid(), signal.SIGKILL)
    return _copy(volume_path, *a, **k)
m.copy_band = copy_band
"""
KILL_BEFORE_MARKER = """
import os, signal
from inkpipe.pipeline import ingest as m
_finish = m.finish_fragment
def finish_fragment(root, group, meta):
    if meta.id == "1":
        os.kill(os.getpid(), signal.SIGKILL)
    return _finish(root, group, meta)
m.finish_fragment = finish_fragment
"""


@pytest.mark.parametrize("patch", [KILL_IN_VOLUME, KILL_BEFORE_MARKER], ids=["volume", "marker"])
def test_kill_9_mid_ingest_then_rerun(tmp_path, patch):
    sources = three_fragments(tmp_path / "fragments")
    store = tmp_path / "store.zarr"
    args = ["ingest", str(tmp_path / "fragments"), "--out", str(store), "--quiet", *TINY_ARGS]
    killed = run_cli(args, patch=patch)
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    root = open_store(store)
    assert fragment_ids(root) == ["a"]
    assert fragment_meta(root, "1") is not None and not fragment_meta(root, "1").complete
    lock = store_lock_path(store)
    assert read_lock(lock) is not None  # left behind by the killed process
    stamps = file_stamps(store / "a")

    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert f"taking over the stale lock {lock}" in result.output
    assert "fragment a: unchanged, skipped" in result.output
    assert "fragment 1: incomplete from an interrupted run, re-ingesting" in result.output
    assert "2 fragment(s) ingested, 1 unchanged" in result.output
    assert file_stamps(store / "a") == stamps
    assert not lock.exists()
    assert_lossless(store, sources)
