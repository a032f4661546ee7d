"""Shared fixtures: tiny fragments in the real on-disk layout and a store ingested from them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from inkpipe.pipeline.ingest import IngestConfig, ingest
from inkpipe.pipeline.store import StoreSettings

TINY = StoreSettings(chunk_layers=4, chunk_px=64, tile_px=32, stride_px=16)


def write_fragment(
    path: Path,
    height: int = 96,
    width: int = 80,
    layers: int = 12,
    seed: int = 0,
    labels: bool = True,
    ir: bool = True,
) -> Path:
    """Write a small random fragment (uint16 slices, ragged mask, a block of ink)."""
    rng = np.random.default_rng(seed)
    sv = path / "surface_volume"
    sv.mkdir(parents=True, exist_ok=True)
    for z in range(layers):
        tifffile.imwrite(sv / f"{z:02d}.tif", rng.integers(1000, 60000, (height, width), np.uint16))
    mask = np.zeros((height, width), np.uint8)
    mask[4 : height - 4, 6 : width - 3] = 255
    mask[height // 2 : height // 2 + 5, width // 3 : width // 3 + 5] = 0
    Image.fromarray(mask).save(path / "mask.png")
    if labels:
        ink = np.zeros((height, width), np.uint8)
        ink[10:30, 12:50] = 255
        Image.fromarray(ink).save(path / "inklabels.png")
    if ir:
        Image.fromarray(rng.integers(0, 255, (height, width), np.uint8)).save(path / "ir.png")
    return path


@pytest.fixture
def fragments_dir(tmp_path: Path) -> Path:
    """A Kaggle-style folder: train/1, train/2 (labelled), test/a (unlabelled)."""
    root = tmp_path / "fragments"
    write_fragment(root / "train" / "1", seed=1)
    write_fragment(root / "train" / "2", height=70, width=100, seed=2)
    write_fragment(root / "test" / "a", seed=3, labels=False)
    return root


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store ingested once per session from three tiny random fragments (read-only!)."""
    base = tmp_path_factory.mktemp("store")
    root = base / "fragments"
    write_fragment(root / "train" / "1", seed=1)
    write_fragment(root / "train" / "2", height=70, width=100, seed=2)
    write_fragment(root / "test" / "a", seed=3, labels=False)
    out = base / "store.zarr"
    ingest(IngestConfig(root=root, out=out, settings=TINY, progress=False), log=lambda s: None)
    return out
