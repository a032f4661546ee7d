"""Tests of the synthetic fragment generator: layout, determinism, realism, hardness, resuming."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import tifffile
from numpy.typing import NDArray
from PIL import Image
from scipy import ndimage

from inkpipe.pipeline.errors import ConfigError
from inkpipe.pipeline.synth import (
    COMPLETE_MARKER,
    STARTED_MARKER,
    SynthConfig,
    SynthFragment,
    _Fields,
    _make_fields,
    synthesize,
    synthesize_fragment,
)

H, W = 160, 128


def read_png(path: Path) -> NDArray[np.uint8]:
    with Image.open(path) as im:
        assert im.mode == "L", f"{path} is {im.mode}, expected 8-bit gray"
        return np.asarray(im).copy()


def read_volume(path: Path) -> NDArray[np.uint16]:
    files = sorted((path / "surface_volume").glob("*.tif"))
    return np.stack([tifffile.imread(f) for f in files])


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def best_f05(scores: NDArray[np.floating], labels: NDArray[np.bool_]) -> float:
    """Best F0.5 of ``score >= t`` over every threshold t, for both polarities.

    Tied scores fall on the same side of any threshold, so only cuts between distinct values count.
    """
    best = 0.0
    positives = max(int(labels.sum()), 1)
    for signed in (scores, -scores):
        order = np.argsort(-signed, kind="stable")
        ranked = signed[order]
        cuts = np.append(ranked[1:] != ranked[:-1], True)  # last index of each tie group
        tp = np.cumsum(labels[order])[cuts].astype(np.float64)
        precision = tp / (np.flatnonzero(cuts) + 1)
        recall = tp / positives
        f05 = 1.25 * precision * recall / np.maximum(0.25 * precision + recall, 1e-12)
        best = max(best, float(f05.max()))
    return best


def test_best_f05_helper() -> None:
    labels = np.array([1, 1, 0, 0, 0, 0], dtype=bool)
    assert best_f05(np.array([5.0, 4, 1, 1, 1, 1]), labels) == pytest.approx(1.0)
    assert best_f05(-np.array([5.0, 4, 1, 1, 1, 1]), labels) == pytest.approx(1.0)
    everything = 1.25 * (2 / 6) / (0.25 * (2 / 6) + 1)  # predicting all is the only cut
    assert best_f05(np.zeros(6), labels) == pytest.approx(everything)


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[SynthConfig, list[SynthFragment]]:
    cfg = SynthConfig(
        out=tmp_path_factory.mktemp("synth"), n_train=1, n_test=1, height_px=H, width_px=W, seed=3
    )
    return cfg, synthesize(cfg)


# --------------------------------------------------------------------------- layout


def test_layout(small: tuple[SynthConfig, list[SynthFragment]]) -> None:
    cfg, fragments = small
    assert [(f.id, f.split) for f in fragments] == [("1", "train"), ("a", "test")]
    train, test = fragments
    assert train.path == cfg.out / "train" / "1" and train.truth == train.path / "inklabels.png"
    assert test.path == cfg.out / "test" / "a" and test.truth == cfg.out / "truth" / "a.png"
    for frag in fragments:
        names = sorted(p.name for p in (frag.path / "surface_volume").iterdir())
        assert names == [f"{z:02d}.tif" for z in range(65)]
        for name in ("00.tif", "64.tif"):
            with tifffile.TiffFile(frag.path / "surface_volume" / name) as tif:
                assert len(tif.pages) == 1
                page = tif.pages[0]
                assert page.shape == (H, W) and page.dtype == np.uint16
                assert page.compression == 1 and page.is_contiguous  # readable by byte offset
        for name in ("mask.png", "ir.png"):
            assert read_png(frag.path / name).shape == (H, W)
        assert set(np.unique(read_png(frag.path / "mask.png"))) == {0, 255}
        truth = read_png(frag.truth)
        assert truth.shape == (H, W) and set(np.unique(truth)) == {0, 255}
        listing = {p.name for p in frag.path.iterdir()}
        assert COMPLETE_MARKER in listing and STARTED_MARKER not in listing
        assert not [p for p in frag.path.rglob("*.tmp")]
    assert (train.path / "inklabels.png").is_file()
    assert not (test.path / "inklabels.png").exists()
    marker = json.loads((train.path / COMPLETE_MARKER).read_text())
    assert marker["height_px"] == H and marker["layers"] == 65 and marker["labels"] is True


def test_many_layers_get_three_digit_names(tmp_path: Path) -> None:
    synthesize_fragment(tmp_path / "f", height_px=64, width_px=64, layers=101)
    names = sorted(p.name for p in (tmp_path / "f" / "surface_volume").iterdir())
    assert names == [f"{z:03d}.tif" for z in range(101)]


# --------------------------------------------------------------------------- determinism


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path) -> None:
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        synthesize_fragment(tmp_path / name, height_px=96, width_px=80, layers=8, seed=seed)
    a, b, c = (tree_bytes(tmp_path / name) for name in "abc")
    assert a == b
    assert a.keys() == c.keys()
    for key in ("mask.png", "inklabels.png", "ir.png", "surface_volume/03.tif"):
        assert a[key] != c[key]


def test_adding_fragments_keeps_existing_ones(tmp_path: Path) -> None:
    small = SynthConfig(tmp_path / "x", n_train=1, n_test=1, height_px=64, width_px=64, layers=8)
    large = SynthConfig(tmp_path / "y", n_train=2, n_test=2, height_px=64, width_px=64, layers=8)
    synthesize(small)
    fragments = synthesize(large)
    assert [f.id for f in fragments] == ["1", "2", "a", "b"]
    for sub in ("train/1", "test/a"):
        assert tree_bytes(tmp_path / "x" / sub) == tree_bytes(tmp_path / "y" / sub)
    assert tree_bytes(tmp_path / "y" / "train/1") != tree_bytes(tmp_path / "y" / "train/2")


# --------------------------------------------------------------------------- realism


def test_mask_is_irregular_with_holes(small: tuple[SynthConfig, list[SynthFragment]]) -> None:
    for frag in small[1]:
        mask = read_png(frag.path / "mask.png") > 0
        assert 0.4 < mask.mean() < 0.95
        assert ndimage.binary_fill_holes(mask).sum() > mask.sum()  # holes
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        box = mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
        assert box.mean() < 0.9  # not a rectangle


def test_ink_is_lines_of_strokes_inside_the_mask(
    small: tuple[SynthConfig, list[SynthFragment]],
) -> None:
    for frag in small[1]:
        mask = read_png(frag.path / "mask.png") > 0
        ink = read_png(frag.truth) > 0
        assert not (ink & ~mask).any()
        assert 0.04 < ink[mask].mean() < 0.25
        # Strokes a few px wide, not blobs: eroding 2 px from each side removes most ink.
        assert ndimage.binary_erosion(ink, iterations=2).sum() < 0.3 * ink.sum()
        assert ndimage.label(ink)[1] >= 4  # many separate letters/strokes
        # Lines of text: some rows inside the papyrus carry no ink (the gaps between lines).
        assert (mask.any(1) & ~ink.any(1)).sum() >= 10


def test_ir_shows_ink_darker(small: tuple[SynthConfig, list[SynthFragment]]) -> None:
    frag = small[1][0]
    ir = read_png(frag.path / "ir.png").astype(float)
    mask = read_png(frag.path / "mask.png") > 0
    ink = read_png(frag.truth) > 0
    assert ir[ink].mean() < ir[mask & ~ink].mean() - 20
    assert ir[~mask].mean() < ir[mask & ~ink].mean() - 50


@pytest.fixture(scope="module")
def hard(tmp_path_factory: pytest.TempPathFactory) -> tuple[NDArray[np.float32], _Fields]:
    size, seed = 256, 0
    path = tmp_path_factory.mktemp("hard") / "f"
    synthesize_fragment(path, height_px=size, width_px=size, seed=seed)
    fields = _make_fields(size, size, 65, seed, 0.8)
    assert (read_png(path / "inklabels.png") == fields.labels * 255).all()
    return read_volume(path).astype(np.float32), fields


def _sample_depth(volume: NDArray[np.float32], depth: NDArray[np.float32]) -> NDArray[np.float32]:
    """Sample (z, y, x) ``volume`` at a fractional depth per pixel, linearly along z."""
    z0 = np.floor(depth).astype(int)
    t = depth - z0
    yy, xx = np.indices(depth.shape)
    return volume[z0, yy, xx] * (1 - t) + volume[z0 + 1, yy, xx] * t


def test_volume_values_realistic_and_never_clipped(
    hard: tuple[NDArray[np.float32], _Fields],
) -> None:
    volume, fields = hard
    mask = fields.mask > 0
    assert volume.min() > 0 and volume.max() < 65535
    air = np.median(volume[[0, -1]])  # above the surface and below the sheet everywhere
    papyrus = np.median(_sample_depth(volume, fields.surface_z + 4)[mask])
    assert 10_000 < air < 20_000 and 25_000 < papyrus < 45_000


def test_ink_is_hard_per_pixel_but_found_with_context(
    hard: tuple[NDArray[np.float32], _Fields],
) -> None:
    volume, fields = hard
    mask = fields.mask > 0
    labels = fields.labels[mask] > 0
    # Pixel by pixel, no threshold on any single layer, nor on the mean, beats chance by much.
    per_layer = max(best_f05(layer[mask], labels) for layer in volume)
    mean = best_f05(volume.mean(0)[mask], labels)
    chance = best_f05(np.zeros(labels.shape), labels)
    assert per_layer < 0.35 and mean < 0.35
    assert per_layer < chance + 0.1 and mean < chance + 0.1
    # Following the surface: the ink layer minus the papyrus below it (same fibres, no ink),
    # minus a local background, smoothed over a stroke's width.
    signal = _sample_depth(volume, fields.ink_z) - _sample_depth(volume, fields.ink_z + 2.5)
    weight = mask.astype(np.float32)

    def smooth(image: NDArray[np.float32], sigma: float) -> NDArray[np.float32]:
        return ndimage.gaussian_filter(image * weight, sigma) / np.maximum(
            ndimage.gaussian_filter(weight, sigma), 1e-3
        )

    oracle = smooth(signal - smooth(signal, 8.0), 1.5)
    found = best_f05(oracle[mask], labels)
    assert found > 0.5 and found > max(per_layer, mean) + 0.2, (chance, per_layer, mean, found)


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"height_px": 32}, "height_px must be an integer >= 64, got 32"),
        ({"width_px": 63}, "width_px must be an integer >= 64, got 63"),
        ({"height_px": 100.0}, "height_px must be an integer >= 64, got 100.0"),
        ({"layers": 4}, "layers must be an integer in [8, 1000], got 4"),
        ({"seed": -1}, "seed must be an integer >= 0, got -1"),
        ({"ink_contrast": -0.1}, "ink_contrast must be a number in [0, 10]"),
        ({"ink_contrast": float("nan")}, "ink_contrast must be a number in [0, 10]"),
        ({"n_test": 27}, "n_test must be an integer in [0, 26], got 27"),
        ({"n_train": -1}, "n_train must be an integer >= 0, got -1"),
        ({"n_train": 0, "n_test": 0}, "n_train + n_test must be at least 1"),
        ({"n_train": True}, "n_train must be an integer >= 0, got True"),
    ],
)
def test_bad_config_raises(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        SynthConfig(out=tmp_path, **kwargs)
    assert message in str(info.value)


def test_bad_fragment_args_raise(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="width_px must be an integer >= 64, got 10"):
        synthesize_fragment(tmp_path / "f", height_px=64, width_px=10)
    with pytest.raises(ConfigError, match="layers"):
        synthesize_fragment(tmp_path / "f", height_px=64, width_px=64, layers=7)
    assert not (tmp_path / "f").exists()


# --------------------------------------------------------------------------- resuming


def test_complete_fragment_is_skipped(tmp_path: Path) -> None:
    cfg = SynthConfig(tmp_path, n_train=1, n_test=1, height_px=64, width_px=64, layers=8)
    synthesize(cfg)
    stamp = tmp_path / "train" / "1" / "surface_volume" / "03.tif"
    os.utime(stamp, ns=(1_000_000_000, 1_000_000_000))
    synthesize(cfg)
    assert stamp.stat().st_mtime_ns == 1_000_000_000


def test_interrupted_fragment_is_regenerated(tmp_path: Path) -> None:
    cfg = SynthConfig(tmp_path, n_train=1, n_test=1, height_px=64, width_px=64, layers=8)
    synthesize(cfg)
    before = tree_bytes(tmp_path)
    frag = tmp_path / "train" / "1"
    # What an interrupted run leaves: no completion marker, a missing and a stray slice.
    (frag / COMPLETE_MARKER).unlink()
    (frag / STARTED_MARKER).write_text("{}")
    (frag / "surface_volume" / "05.tif").unlink()
    (frag / "surface_volume" / ".06.tif.123.tmp").write_bytes(b"half")
    (tmp_path / "truth" / "a.png").unlink()  # a test fragment whose truth went missing
    synthesize(cfg)
    assert tree_bytes(tmp_path) == before


def test_foreign_folder_is_never_deleted(tmp_path: Path) -> None:
    frag = tmp_path / "train" / "1"
    frag.mkdir(parents=True)
    (frag / "notes.txt").write_text("real data")
    with pytest.raises(ConfigError, match="not written by the synthesizer"):
        synthesize(SynthConfig(tmp_path, n_train=1, n_test=0, height_px=64, width_px=64))
    assert (frag / "notes.txt").read_text() == "real data"


def test_fragment_with_other_parameters_is_refused(tmp_path: Path) -> None:
    synthesize_fragment(tmp_path / "f", height_px=64, width_px=64, layers=8, seed=1)
    with pytest.raises(ConfigError, match=r"'seed': 1\}, asked for \{'seed': 2"):
        synthesize_fragment(tmp_path / "f", height_px=64, width_px=64, layers=8, seed=2)


def test_progress_bar(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    synthesize_fragment(tmp_path / "f", height_px=64, width_px=64, layers=8, progress=True)
    assert "8/8" in capsys.readouterr().err
