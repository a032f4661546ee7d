"""Helpers shared by the benchmark scripts: real-size synthetic data, cache eviction, RSS."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REAL_H, REAL_W, LAYERS = 8181, 6330, 65  # Kaggle fragment 1


def ensure_fragment(root: Path, height: int, width: int, seed: int = 0) -> Path:
    """Synthesize one training fragment at ``root/train/1`` unless it is already there."""
    from inkpipe.pipeline.synth import synthesize_fragment

    path = root / "train" / "1"
    if not (path / ".synth_complete").exists():
        t0 = time.perf_counter()
        print(f"synthesizing a {height}x{width}x{LAYERS} fragment in {path} …", flush=True)
        synthesize_fragment(
            path, height_px=height, width_px=width, layers=LAYERS, seed=seed, progress=True
        )
        print(f"  done in {time.perf_counter() - t0:.0f} s", flush=True)
    return path


def tile_fragment(source: Path, root: Path, height: int, width: int) -> Path:
    """Build a ``height`` x ``width`` training fragment at ``root/train/1`` by tiling ``source``.

    Each slice, the mask, the labels and the IR image of the (smaller) synthetic fragment
    ``source`` are repeated to cover the new size and cut: the same texture and compressibility
    in the time it takes to write the files, instead of the minutes ``synthesize_fragment``
    takes at real size. Skipped if already built.
    """
    import numpy as np
    import tifffile
    from PIL import Image

    path = root / "train" / "1"
    marker = path / ".tiled_complete"
    if marker.exists():
        return path

    def tiled(image: np.ndarray) -> np.ndarray:
        reps = (-(-height // image.shape[0]), -(-width // image.shape[1]))
        return np.tile(image, reps)[:height, :width]

    t0 = time.perf_counter()
    print(f"tiling {source} to {height}x{width} in {path} …", flush=True)
    (path / "surface_volume").mkdir(parents=True, exist_ok=True)
    for tif in sorted((source / "surface_volume").glob("*.tif")):
        tifffile.imwrite(path / "surface_volume" / tif.name, tiled(tifffile.imread(tif)))
    for name in ("mask.png", "inklabels.png", "ir.png"):
        if (source / name).exists():
            Image.fromarray(tiled(np.asarray(Image.open(source / name)))).save(path / name)
    marker.write_text(str(source))
    print(f"  done in {time.perf_counter() - t0:.0f} s", flush=True)
    return path


def evict(paths: list[Path]) -> None:
    """Drop files from the page cache (POSIX_FADV_DONTNEED) so the next read is cold."""
    os.sync()
    for p in paths:
        files = [p] if p.is_file() else [f for f in p.rglob("*") if f.is_file()]
        for f in files:
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def tree_bytes(path: Path) -> int:
    """Total size of the files under ``path``."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def run_measured(code: str) -> tuple[float, float, str]:
    """Run Python ``code`` in a fresh process; return (seconds, peak RSS in MB, stdout)."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-4000:])
    rss = 0.0
    out = []
    for line in proc.stdout.splitlines():
        if line.startswith("MAXRSS_KB "):
            rss = int(line.split()[1]) / 1024
        else:
            out.append(line)
    return seconds, rss, "\n".join(out)


# VmHWM, not ru_maxrss: Linux carries ru_maxrss across fork+exec, so a child started by a
# parent that once held gigabytes would report the parent's peak.
RSS_SUFFIX = """
import re
with open('/proc/self/status') as _fh:
    print('MAXRSS_KB', re.search(r'VmHWM:\\s+(\\d+)', _fh.read()).group(1))
"""


def self_rss_mb() -> float:
    """Peak RSS of this process, MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
