"""Helpers of the fault-injection tests: CLI runs in a subprocess with a fault patched in,
one-line error checks, lock files of chosen owners, and a lossless-store check."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from inkpipe.pipeline.locks import _process_started
from inkpipe.pipeline.store import fragment_ids, open_fragment, open_store
from tests.conftest import write_fragment

# Runs the CLI after executing PATCH (Python code, may be empty); argv follows.
DRIVER = """
import sys
{patch}
from inkpipe.cli import main
sys.argv = ["inkpipe", *sys.argv[1:]]
main()
"""


def run_cli(
    args: list[str], patch: str = "", timeout: float = 120, **kw
) -> subprocess.CompletedProcess[str]:
    """Run ``inkpipe ARGS`` in a fresh Python process, with ``patch`` applied first."""
    code = DRIVER.format(patch=textwrap.dedent(patch))
    env = {**os.environ, "OMP_NUM_THREADS": "1", **kw.pop("env", {})}
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        **kw,
    )


def error_line(output: str, exit_code: int) -> str:
    """Check a failed CLI run ended with one ``Error: …`` line and no traceback; return it."""
    assert exit_code == 1, output
    assert "Traceback" not in output, output
    lines = [line for line in output.strip().splitlines() if line.strip()]
    assert lines and lines[-1].startswith("Error: "), output
    assert sum(line.startswith("Error: ") for line in lines) == 1, output
    return lines[-1]


@contextlib.contextmanager
def live_process() -> Iterator[subprocess.Popen]:
    """A process that runs (sleeps) for the ``with`` block: a lock owner that is alive."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def dead_pid() -> int:
    """Return the pid of a process that has exited (and was reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def write_lock(
    path: Path,
    pid: int,
    host: str | None = None,
    process_started: float | None = None,
    command: str = "inkpipe ingest",
) -> Path:
    """Write a lock file as inkpipe would for the process ``pid``."""
    started = process_started if process_started is not None else _process_started(pid)
    owner = {
        "pid": pid,
        "host": host or socket.gethostname(),
        "process_started": started if started is not None else time.time(),
        "locked_at": time.time(),
        "command": command,
        "token": secrets.token_hex(8),
    }
    path.write_text(json.dumps(owner) + "\n")
    return path


def assert_lossless(store: Path, sources: dict[str, Path]) -> None:
    """Check each listed fragment of ``store`` holds exactly its source files' pixels."""
    root = open_store(store)
    assert sorted(fragment_ids(root)) == sorted(sources)
    for fid, folder in sources.items():
        frag = open_fragment(root, fid)
        assert frag.meta.complete
        slices = sorted((folder / "surface_volume").glob("*.tif"))
        volume = np.stack([tifffile.imread(p) for p in slices])
        np.testing.assert_array_equal(np.asarray(frag.volume[...]), volume)
        mask = np.asarray(Image.open(folder / "mask.png")) > 127
        np.testing.assert_array_equal(frag.mask(), mask.astype(np.uint8))
        if (folder / "inklabels.png").exists():
            ink = np.asarray(Image.open(folder / "inklabels.png")) > 127
            np.testing.assert_array_equal(frag.labels(), (ink & mask).astype(np.uint8))


def three_fragments(root: Path) -> dict[str, Path]:
    """Write fragments a (test), 1 and 2 (train); ingest discovers them in that order."""
    return {
        "a": write_fragment(root / "test" / "a", seed=3, labels=False),
        "1": write_fragment(root / "train" / "1", seed=1),
        "2": write_fragment(root / "train" / "2", height=70, width=100, seed=2),
    }


def tiny_checkpoint(path: Path) -> Path:
    """Save an untrained tiny model reading layers 2:6 with 32 px tiles."""
    import torch  # here: the subprocess drivers that import this module need no torch

    from inkpipe.pipeline.layers import LayerRange
    from inkpipe.train.checkpoint import checkpoint_payload, save_checkpoint
    from inkpipe.train.models import ModelSpec, build_model

    torch.manual_seed(0)
    spec = ModelSpec(name="attention-unet", in_channels=4, widths=(4, 8, 16))
    payload = checkpoint_payload(
        build_model(spec).eval(), spec, LayerRange(2, 6), 32, 0.5, metrics={}, config={}
    )
    return save_checkpoint(path, payload)


def file_stamps(folder: Path) -> dict[str, int]:
    """Return ``{relative path: mtime_ns}`` of every file under ``folder`` (to see rewrites)."""
    return {
        str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()
    }
