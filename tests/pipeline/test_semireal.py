"""Tests of the semi-real generator: layout, ink geometry, determinism, held-out labels, errors."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
from numpy.typing import NDArray
from PIL import Image

from inkpipe.pipeline.errors import ConfigError, InputNotFoundError, InvalidInputError
from inkpipe.pipeline.semireal import (
    LAYERS,
    SemiRealConfig,
    assign_sources,
    default_realdata_dir,
    mirror_indices,
    read_params,
    real_layer_index,
    synthesize_semireal,
)
from inkpipe.pipeline.synth import COMPLETE_MARKER, STARTED_MARKER, SynthFragment

H, W = 96, 80


def _realdata() -> Path | None:
    try:
        return default_realdata_dir()
    except InputNotFoundError:
        return None


REALDATA = _realdata()
needs_realdata = pytest.mark.skipif(
    REALDATA is None,
    reason="shared/realdata (ct_crop/ and labels/) not found next to the repository or the "
    "working directory; the semi-real generator needs the real pieces",
)


def read_png(path: Path) -> NDArray[np.uint8]:
    with Image.open(path) as im:
        assert im.mode == "L", f"{path} is {im.mode}, expected 8-bit gray"
        return np.asarray(im).copy()


def read_volume(path: Path) -> NDArray[np.uint16]:
    return np.stack([tifffile.imread(f) for f in sorted((path / "surface_volume").glob("*.tif"))])


def config(out: Path, **kw: object) -> SemiRealConfig:
    assert REALDATA is not None
    base = SemiRealConfig(
        out,
        texture_dir=REALDATA / "ct_crop",
        labels_dir=REALDATA / "labels",
        height_px=H,
        width_px=W,
        seed=3,
    )
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[SynthFragment]]:
    if REALDATA is None:
        pytest.skip("shared/realdata not found")
    out = tmp_path_factory.mktemp("semireal") / "set"
    return out, synthesize_semireal(config(out))


# --------------------------------------------------------------------------- pure functions


@pytest.mark.parametrize("n_src", [2, 3, 7])
@pytest.mark.parametrize("offset", [0, 1, 5])
def test_mirror_indices_tile_like_reflect_padding(n_src: int, offset: int) -> None:
    src = np.arange(n_src)
    tiled = np.pad(src, (0, 60), mode="reflect")
    idx = mirror_indices(40, n_src, offset, flip=False)
    assert np.array_equal(src[idx], tiled[offset : offset + 40])
    flipped = mirror_indices(40, n_src, offset, flip=True)
    assert np.array_equal(flipped, n_src - 1 - idx)


def test_real_layer_index_is_continuous_and_in_range() -> None:
    depth = np.linspace(-35, 40, 7501, dtype=np.float32)
    r, excess = real_layer_index(depth)
    assert r.min() >= 0 and r.max() <= 10 and excess.min() >= 0
    assert np.abs(np.diff(r)).max() < 0.02  # no jumps: the texture changes smoothly with z
    at = {d: float(real_layer_index(np.float32([d]))[0][0]) for d in (0.0, 1.0, 7.5, 15.0)}
    assert at == {0.0: 7.5, 1.0: 6.5, 7.5: 0.0, 15.0: 7.5}  # front face, ink, middle, back face
    assert np.all(excess[depth < -2.5] > 0) and np.all(excess[(depth > -2.5) & (depth < 17.5)] == 0)


@pytest.mark.parametrize(("n_images", "n_train", "n_test"), [(3, 2, 1), (3, 4, 2), (2, 1, 1)])
def test_assign_sources_holds_images_out_for_test(n_images: int, n_train: int, n_test: int) -> None:
    train, test = assign_sources(n_images, n_train, n_test, np.random.default_rng(0))
    assert len(train) == n_train and len(test) == n_test
    assert not set(train) & set(test)
    assert len(set(train)) == min(n_train, n_images - len(set(test)))


def test_assign_sources_shares_when_only_one_image() -> None:
    assert assign_sources(1, 2, 1, np.random.default_rng(0)) == ([0, 0], [0])


# --------------------------------------------------------------------------- written sets


@needs_realdata
def test_layout(written: tuple[Path, list[SynthFragment]]) -> None:
    out, frags = written
    assert [(f.id, f.split) for f in frags] == [("1", "train"), ("2", "train"), ("a", "test")]
    for frag in frags:
        names = sorted(p.name for p in (frag.path / "surface_volume").iterdir())
        assert names == [f"{z:02d}.tif" for z in range(LAYERS)]
        with tifffile.TiffFile(frag.path / "surface_volume" / "31.tif") as tif:
            assert len(tif.pages) == 1
            page = tif.pages[0]
            assert page.dtype == np.uint16 and page.shape == (H, W)
            assert page.compression == 1  # uncompressed
        mask = read_png(frag.path / "mask.png")
        assert mask.shape == (H, W) and set(np.unique(mask)) <= {0, 255}
        assert 0.4 < (mask > 0).mean() < 0.95  # mostly papyrus, with an outline
        assert read_png(frag.path / "ir.png").shape == (H, W)
        labels = read_png(frag.truth)
        assert set(np.unique(labels)) <= {0, 255} and labels.any()
        assert not (labels.astype(bool) & ~mask.astype(bool)).any()  # ink only on papyrus
        assert (frag.path / COMPLETE_MARKER).is_file()
        assert not (frag.path / STARTED_MARKER).exists()
    assert (frags[0].path / "inklabels.png") == frags[0].truth
    assert not (frags[2].path / "inklabels.png").exists()
    assert frags[2].truth == out / "truth" / "a.png"
    assert not list(out.rglob("*.tmp"))


@needs_realdata
def test_volume_keeps_real_statistics(written: tuple[Path, list[SynthFragment]]) -> None:
    frag = written[1][0]
    vol = read_volume(frag.path).astype(np.float64)
    mask = read_png(frag.path / "mask.png") > 0
    sheet = vol[33:40][:, mask]  # inside the sheet wherever the surface lies (26–34)
    assert 30_000 < sheet.mean() < 50_000 and 5_000 < sheet.std() < 16_000
    air = vol[:15][:, ~mask]
    assert 20_000 < air.mean() < 32_000  # the real gap's grey value


@needs_realdata
def test_ink_is_injected_exactly_where_labelled(
    written: tuple[Path, list[SynthFragment]], tmp_path: Path
) -> None:
    out, frags = written
    plain = synthesize_semireal(config(tmp_path / "plain", ink_contrast=0.0))
    for frag, zero in zip(frags, plain, strict=True):
        labels = read_png(frag.truth) > 0
        delta = np.abs(read_volume(frag.path).astype(np.int64) - read_volume(zero.path))
        diff = delta > 0
        changed = diff.any(axis=0)
        assert not (changed & ~labels).any(), "ink outside the labels"
        assert changed[labels].mean() > 0.99, "labelled pixels without ink"
        layers = np.flatnonzero(diff.any(axis=(1, 2)))
        assert layers.min() >= 20 and layers.max() <= 40  # around the surface (26–34) + 1
        # Two or three layers carry the ink: count those above half of each pixel's peak.
        strong = (2 * delta >= delta.max(axis=0, keepdims=True)).sum(axis=0)[labels]
        assert 2 <= np.median(strong) <= 3
        for name in ("mask.png", "ir.png"):
            assert (frag.path / name).read_bytes() == (zero.path / name).read_bytes()


@needs_realdata
def test_same_seed_gives_identical_files(
    written: tuple[Path, list[SynthFragment]], tmp_path: Path
) -> None:
    out, _ = written
    again = tmp_path / "again"
    synthesize_semireal(config(again))
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for rel in files:
        assert (out / rel).read_bytes() == (again / rel).read_bytes(), rel
    other = synthesize_semireal(config(tmp_path / "other", seed=4, n_train=1, n_test=0))[0]
    assert read_volume(other.path).tobytes() != read_volume(out / "train" / "1").tobytes()


@needs_realdata
def test_test_fragments_use_held_out_label_images(
    written: tuple[Path, list[SynthFragment]],
) -> None:
    sources = {f.id: read_params(f.path)["label_source"] for f in written[1]}
    assert sources["1"] != sources["2"]
    assert sources["a"] not in {sources["1"], sources["2"]}


@needs_realdata
def test_rerun_keeps_complete_fragments_and_refuses_other_params(
    written: tuple[Path, list[SynthFragment]],
) -> None:
    out, frags = written
    tif = frags[0].path / "surface_volume" / "00.tif"
    before = tif.stat().st_mtime_ns
    synthesize_semireal(config(out))
    assert tif.stat().st_mtime_ns == before
    with pytest.raises(ConfigError, match="ink_contrast"):
        synthesize_semireal(config(out, ink_contrast=0.3))


@needs_realdata
def test_interrupted_fragment_is_rewritten(tmp_path: Path) -> None:
    cfg = config(tmp_path / "set", n_train=1, n_test=0)
    frag = synthesize_semireal(cfg)[0]
    good = (frag.path / "surface_volume" / "40.tif").read_bytes()
    (frag.path / COMPLETE_MARKER).unlink()  # as if killed before the marker
    (frag.path / STARTED_MARKER).write_text("{}")
    (frag.path / "surface_volume" / "40.tif").write_bytes(b"truncated")
    synthesize_semireal(cfg)
    assert (frag.path / "surface_volume" / "40.tif").read_bytes() == good


# --------------------------------------------------------------------------- errors


@needs_realdata
def test_missing_texture_dir_names_the_folder(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_ct_crop"
    with pytest.raises(InputNotFoundError, match="no_such_ct_crop") as info:
        synthesize_semireal(config(tmp_path / "out", texture_dir=missing))
    assert str(missing) in str(info.value) and "--texture" in str(info.value)
    assert not (tmp_path / "out").exists()


@needs_realdata
def test_incomplete_texture_dir_names_the_missing_layer(tmp_path: Path) -> None:
    assert REALDATA is not None
    partial = tmp_path / "ct_crop"
    partial.mkdir()
    for z in range(10):
        shutil.copy(REALDATA / "ct_crop" / f"{z:02d}.tif", partial)
    with pytest.raises(InputNotFoundError, match=r"missing 10\.tif"):
        synthesize_semireal(config(tmp_path / "out", texture_dir=partial))
    tifffile.imwrite(partial / "10.tif", np.zeros((H, W), np.float32))
    with pytest.raises(InvalidInputError, match="10.tif.*float32"):
        synthesize_semireal(config(tmp_path / "out", texture_dir=partial))


@needs_realdata
def test_missing_or_empty_labels_dir(tmp_path: Path) -> None:
    with pytest.raises(InputNotFoundError, match="no_labels"):
        synthesize_semireal(config(tmp_path / "out", labels_dir=tmp_path / "no_labels"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputNotFoundError, match=r"no \*_inklabels\.png images"):
        synthesize_semireal(config(tmp_path / "out", labels_dir=tmp_path / "empty"))


@needs_realdata
@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("label_scale", 0.0, "label_scale"),
        ("label_scale", 1.5, "label_scale"),
        ("ink_contrast", -1.0, "ink_contrast"),
        ("height_px", 10, "height_px"),
        ("n_test", 27, "n_test"),
    ],
)
def test_bad_config_values(tmp_path: Path, field: str, value: object, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        config(tmp_path, **{field: value})
