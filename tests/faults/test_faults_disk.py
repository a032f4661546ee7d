"""Fault injection: a full disk during ingest, train and predict.

A real full disk where the test can mount a small tmpfs (in a private mount namespace with
``unshare``), otherwise writes patched to raise ``ENOSPC``; and reported free space patched
small for the checks made before writing. Each case: a one-line error naming what was being
written and the space, nothing already written lost, and the next run finishing the job.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr.storage._local as zarr_local
from click.testing import CliRunner
from PIL import Image

from inkpipe.cli import cli
from inkpipe.infer.predict import PredictConfig, output_bytes_bound
from inkpipe.pipeline import disk
from inkpipe.pipeline.chunks import ChunkWriter, chunk_path
from inkpipe.pipeline.errors import DiskFullError
from inkpipe.pipeline.ingest import store_lock_path
from inkpipe.pipeline.store import StoreSettings, fragment_bytes_bound, fragment_ids, open_store
from inkpipe.train.checkpoint import load_checkpoint
from inkpipe.train.loop import run_lock_path
from tests.faults.faultkit import (
    assert_lossless,
    error_line,
    file_stamps,
    three_fragments,
    tiny_checkpoint,
)

TINY_ARGS = ["--chunk-layers", "4", "--chunk-px", "64", "--tile", "32", "--stride", "16"]
TINY = StoreSettings(chunk_layers=4, chunk_px=64, tile_px=32, stride_px=16)
REPO = Path(__file__).resolve().parents[2]


def enospc(path: object) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def report_free(monkeypatch: pytest.MonkeyPatch, free: int) -> None:
    """Make every disk look like it has ``free`` bytes left."""
    usage = shutil._ntuple_diskusage(10**12, 10**12 - free, free)  # type: ignore[attr-defined]
    monkeypatch.setattr(disk.shutil, "disk_usage", lambda path: usage)


def ingest(fragments: Path, store: Path) -> object:
    args = ["ingest", str(fragments), "--out", str(store), "--quiet", *TINY_ARGS]
    return CliRunner().invoke(cli, args)


# ------------------------------------------------------------------------------ ingest


def test_ingest_disk_full_midway_keeps_complete_fragments(tmp_path, monkeypatch):
    sources = three_fragments(tmp_path / "fragments")
    store = tmp_path / "store.zarr"
    real_put, real_write, written = zarr_local._put, ChunkWriter.write, []

    def full(path):  # the disk fills inside fragment 1's volume
        if f"{store.name}/1/volume/c/" in Path(path).as_posix():
            written.append(path)
            if len(written) > 3:
                raise enospc(path)

    def put(path, value, exclusive=False):  # chunks written through zarr-python
        full(path)
        return real_put(path, value, exclusive=exclusive)

    def write(self, index, data):  # chunks written directly by ingest
        full(chunk_path(self.root, index))
        return real_write(self, index, data)

    monkeypatch.setattr(zarr_local, "_put", put)
    monkeypatch.setattr(ChunkWriter, "write", write)
    result = ingest(tmp_path / "fragments", store)
    line = error_line(result.output, result.exit_code)
    assert line.startswith(f"Error: the disk is full writing fragment 1 ({store}: ")
    assert line.endswith("complete fragments are kept and fragment 1 is redone")
    assert fragment_ids(open_store(store)) == ["a"]  # 1 is incomplete, so not listed
    assert_lossless(store, {"a": sources["a"]})
    assert not store_lock_path(store).exists()
    stamps = file_stamps(store / "a")

    monkeypatch.setattr(zarr_local, "_put", real_put)  # space freed
    monkeypatch.setattr(ChunkWriter, "write", real_write)
    result = ingest(tmp_path / "fragments", store)
    assert result.exit_code == 0, result.output
    assert "fragment a: unchanged, skipped" in result.output
    assert "fragment 1: incomplete from an interrupted run, re-ingesting" in result.output
    assert "2 fragment(s) ingested, 1 unchanged" in result.output
    assert file_stamps(store / "a") == stamps  # not rewritten
    assert_lossless(store, sources)


def test_ingest_says_up_front_when_fragments_cannot_fit(tmp_path, monkeypatch):
    sources = three_fragments(tmp_path / "fragments")
    store = tmp_path / "store.zarr"
    result = CliRunner().invoke(
        cli, ["ingest", str(sources["a"]), "--out", str(store), "--quiet", *TINY_ARGS]
    )
    assert result.exit_code == 0, result.output
    stamps = file_stamps(store)
    block = disk.block_bytes(store)
    need = sum(
        fragment_bytes_bound(shape, TINY, 3, block) for shape in ((12, 96, 80), (12, 70, 100))
    )
    report_free(monkeypatch, need - 1)
    result = ingest(tmp_path / "fragments", store)
    line = error_line(result.output, result.exit_code)
    assert line.startswith(f"Error: not enough disk space for fragments 1, 2 into store {store}")
    assert f"it needs up to {disk.format_bytes(need)}" in line
    assert "ingest fewer fragments at a time with --fragment ID" in line
    assert file_stamps(store) == stamps  # nothing written, a intact
    assert_lossless(store, {"a": sources["a"]})
    # exactly enough: a is skipped (it needs nothing), 1 and 2 fit
    report_free(monkeypatch, need)
    result = ingest(tmp_path / "fragments", store)
    assert result.exit_code == 0, result.output
    assert_lossless(store, sources)


# In a private mount namespace: a 700 kB tmpfs that holds two tiny fragments, not three.
TMPFS_SCRIPT = """
import json, subprocess, sys
from pathlib import Path
from click.testing import CliRunner
import inkpipe.pipeline.ingest as ingest_module
from inkpipe.cli import cli
from inkpipe.pipeline.store import fragment_ids, open_store
from tests.faults.faultkit import assert_lossless

mnt, fragments = Path(sys.argv[1]), Path(sys.argv[2])
if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=700k", "tmpfs", str(mnt)]).returncode:
    sys.exit(77)
store = mnt / "store.zarr"
args = ["ingest", str(fragments), "--out", str(store), "--quiet", *sys.argv[3:]]
folders = {"a": fragments / "test" / "a", "1": fragments / "train" / "1"}
folders["2"] = fragments / "train" / "2"
report = {}
run = CliRunner().invoke(cli, args)
report["checked"] = [run.exit_code, run.output]
check_space = ingest_module.check_space
ingest_module.check_space = lambda *a, **k: None  # write until the disk is really full
run = CliRunner().invoke(cli, args)
report["full"] = [run.exit_code, run.output]
report["listed"] = fragment_ids(open_store(store))
assert_lossless(store, {f: folders[f] for f in report["listed"]})
ingest_module.check_space = check_space
subprocess.run(["mount", "-o", "remount,size=8m", str(mnt)], check=True)
run = CliRunner().invoke(cli, args)
report["again"] = [run.exit_code, run.output]
assert_lossless(store, folders)
print(json.dumps(report))
"""


def test_ingest_on_a_real_full_tmpfs(tmp_path):
    if shutil.which("unshare") is None:
        pytest.skip("no unshare to mount a private tmpfs")
    three_fragments(tmp_path / "fragments")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    script = tmp_path / "tmpfs_ingest.py"
    script.write_text(textwrap.dedent(TMPFS_SCRIPT))
    run = subprocess.run(
        ["unshare", "-rm", sys.executable, str(script), str(mnt), str(tmp_path / "fragments")]
        + TINY_ARGS,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
    )
    if run.returncode == 77 or "unshare failed" in run.stderr or "unshare:" in run.stderr:
        pytest.skip(f"cannot mount a tmpfs here: {run.stderr.strip()[:200]}")
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads(run.stdout.strip().splitlines()[-1])
    # with the check: refused before writing any fragment, the real free space named
    line = error_line(report["checked"][1], report["checked"][0])
    assert "not enough disk space for fragments a, 1, 2 into store" in line
    # without it: the real ENOSPC, mid-fragment, one line; what was complete is listed
    line = error_line(report["full"][1], report["full"][0])
    assert "the disk is full writing fragment" in line and "is redone" in line
    interrupted = line.split("writing fragment ")[1].split(" ")[0]
    assert report["listed"] == ["a", "1", "2"][: ["a", "1", "2"].index(interrupted)]
    assert report["listed"], "expected at least one fragment to fit before the disk filled"
    # more space: the complete fragments are skipped, the interrupted one redone
    code, out = report["again"]
    assert code == 0, out
    for fid in report["listed"]:
        assert f"fragment {fid}: unchanged, skipped" in out
    assert f"fragment {interrupted}: incomplete from an interrupted run" in out


# ------------------------------------------------------------------------------ train


def train_args(store: Path, out: Path, epochs: int) -> list[str]:
    args = ["train", "--store", str(store), "--out", str(out), "--layers", "2:6", "--tile", "32"]
    args += ["--epochs", str(epochs), "--steps-per-epoch", "1", "--batch-size", "2"]
    return [*args, "--val", "patches:2", "--device", "cpu", "--seed", "0", "--quiet"]


def test_train_disk_full_at_a_checkpoint_keeps_the_last_one(tiny_store, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_save, saves = torch.save, []

    def save(obj, path, *a, **k):  # the third checkpoint (in epoch 2) meets a full disk
        saves.append(path)
        if len(saves) == 3:
            Path(path).write_bytes(b"\0" * 1000)  # a partial file, as a full disk leaves
            raise enospc(path)
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(torch, "save", save)
    result = CliRunner().invoke(cli, train_args(tiny_store, out, epochs=3))
    line = error_line(result.output, result.exit_code)
    assert line.startswith(f"Error: the disk is full writing the run {out} ({out}: ")
    assert line.endswith("continue with --resume (the checkpoints already written are kept)")
    assert load_checkpoint(out / "last.pt").metrics["epoch"] == 1
    assert load_checkpoint(out / "best.pt").metrics["epoch"] == 1
    assert not list(out.glob(".*.tmp")) and not run_lock_path(out).exists()

    monkeypatch.setattr(torch, "save", real_save)
    result = CliRunner().invoke(cli, [*train_args(tiny_store, out, epochs=3), "--resume"])
    assert result.exit_code == 0, result.output
    assert f"resuming {out} at epoch 2" in result.output
    assert load_checkpoint(out / "last.pt").metrics["epoch"] == 3


def test_train_checks_the_space_before_a_checkpoint(tiny_store, tmp_path, monkeypatch):
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, train_args(tiny_store, out, epochs=1))
    assert result.exit_code == 0, result.output
    before = (out / "last.pt").read_bytes()
    report_free(monkeypatch, 1000)
    result = CliRunner().invoke(cli, [*train_args(tiny_store, out, epochs=2), "--resume"])
    line = error_line(result.output, result.exit_code)
    assert f"not enough disk space for checkpoint {out / 'best.pt'}" in line or (
        f"not enough disk space for checkpoint {out / 'last.pt'}" in line
    )
    assert "it needs up to" in line and "are free on the disk of" in line
    assert (out / "last.pt").read_bytes() == before


# ------------------------------------------------------------------------------ predict


def predict_args(store: Path, ckpt: Path, out: Path, *extra: str) -> list[str]:
    args = ["predict", "--checkpoint", str(ckpt), "--store", str(store), "--out", str(out)]
    return [*args, "--device", "cpu", "--tta", "none", "--quiet", *extra, "1", "a"]


def test_predict_checks_pictures_and_canvases_up_front(tiny_store, tmp_path, monkeypatch):
    ckpt = tiny_checkpoint(tmp_path / "ck.pt")
    out = tmp_path / "pred"
    shapes = [(96, 80), (96, 80)]
    spilled = PredictConfig(checkpoints=(ckpt,), fragments=("x",), out=out, canvas_budget_mb=0)
    need = output_bytes_bound(spilled, shapes)
    assert need > output_bytes_bound(PredictConfig((ckpt,), ("x",), out), shapes)  # canvases
    report_free(monkeypatch, need - 1)
    result = CliRunner().invoke(cli, predict_args(tiny_store, ckpt, out, "--canvas-budget-mb", "0"))
    line = error_line(result.output, result.exit_code)
    assert f"not enough disk space for the predictions of 2 fragment(s) in {out}" in line
    assert not list(out.glob("*.png")) and not (out / "submission.csv").exists()
    report_free(monkeypatch, need)
    result = CliRunner().invoke(cli, predict_args(tiny_store, ckpt, out, "--canvas-budget-mb", "0"))
    assert result.exit_code == 0, result.output
    assert (out / "submission.csv").is_file() and not list(out.glob(".canvas-*"))


def test_predict_disk_full_keeps_the_previous_outputs(tiny_store, tmp_path, monkeypatch):
    ckpt = tiny_checkpoint(tmp_path / "ck.pt")
    out = tmp_path / "pred"
    result = CliRunner().invoke(cli, predict_args(tiny_store, ckpt, out))
    assert result.exit_code == 0, result.output
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    real_save = Image.Image.save

    def save(self, fp, *a, **k):  # the disk fills in the middle of a picture
        if ".a_mask.png." in str(fp):
            Path(fp).write_bytes(b"\x89PNG partial")
            raise enospc(fp)
        return real_save(self, fp, *a, **k)

    monkeypatch.setattr(Image.Image, "save", save)
    result = CliRunner().invoke(cli, predict_args(tiny_store, ckpt, out))
    line = error_line(result.output, result.exit_code)
    assert line.startswith(f"Error: the disk is full writing the predictions ({out}: ")
    assert line.endswith("free some space and run the same command again")
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert after.keys() == before.keys()  # no temporary left behind
    assert after["submission.csv"] == before["submission.csv"]
    for name in after:
        if name.endswith(".png"):
            assert np.asarray(Image.open(out / name)).size  # whole pictures


def test_memory_mapped_canvases_fail_on_a_full_disk_not_later(tiny_store, tmp_path, monkeypatch):
    ckpt = tiny_checkpoint(tmp_path / "ck.pt")
    out = tmp_path / "pred"

    def fallocate(fd, offset, length):
        raise enospc(f"fd {fd}")

    monkeypatch.setattr(os, "posix_fallocate", fallocate, raising=False)
    result = CliRunner().invoke(cli, predict_args(tiny_store, ckpt, out, "--canvas-budget-mb", "0"))
    line = error_line(result.output, result.exit_code)
    assert line.startswith(f"Error: the disk is full writing the predictions ({out}: ")
    assert not list(out.glob(".canvas-*"))  # the canvases' folder is removed


# ------------------------------------------------------------------------------ helpers


def test_the_fragment_bound_holds_on_disk(tiny_store):
    root = open_store(tiny_store)
    block = disk.block_bytes(tiny_store)
    for fid in fragment_ids(root):
        group = tiny_store / fid
        used = sum(p.stat().st_blocks * 512 for p in group.rglob("*") if p.is_file())
        meta = open_store(tiny_store)[fid].attrs["inkpipe"]
        planes = 1 + meta["has_labels"] + meta["has_ir"]
        assert 0 < used <= fragment_bytes_bound(tuple(meta["shape"]), TINY, planes, block)


def test_disk_helpers(tmp_path, monkeypatch):
    assert disk.format_bytes(512) == "512 B" and disk.format_bytes(3.14e6) == "3.14 MB"
    assert disk.format_bytes(7.63e9) == "7.63 GB" and disk.format_bytes(12.5e3) == "12.5 kB"
    assert disk.free_bytes(tmp_path / "not" / "yet") > 0  # the disk it would be on
    target = tmp_path / "reserved"
    target.write_bytes(b"")
    disk.reserve(target, 1 << 16)
    assert target.stat().st_size == 1 << 16
    report_free(monkeypatch, 10**6)
    with pytest.raises(DiskFullError, match=r"needs up to 2.00 MB, 1.00 MB are free"):
        disk.check_free(tmp_path / "x", 2 * 10**6, "x", "fix it")
    full = disk.disk_full_as_error(tmp_path, "y", "fix it")
    with (
        pytest.raises(
            DiskFullError, match=r"the disk is full writing y \(.*1.00 MB free\); fix it"
        ),
        full,
    ):
        raise enospc(tmp_path / "y")
    with pytest.raises(PermissionError), disk.disk_full_as_error(tmp_path, "y", "fix it"):
        raise PermissionError(errno.EACCES, "denied")  # not a full disk: unchanged
