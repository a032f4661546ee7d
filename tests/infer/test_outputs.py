from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr
from click.testing import CliRunner

from inkpipe.cli import cli
from inkpipe.infer import outputs
from inkpipe.infer.outputs import (
    downsample_mean,
    ome_zarr_bytes_bound,
    pyramid,
    tiff_bytes_bound,
    write_probability_ome_zarr,
    write_probability_tiff,
)
from inkpipe.infer.predict import PredictConfig, format_predictions, output_bytes_bound, predict
from inkpipe.pipeline.images import read_gray
from tests.infer.test_predict import make_checkpoint
from tests.pipeline.ngffcheck import check_image

QUIET = {"progress": False}


def prob_map(shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def test_tiff_is_tiled_compressed_uint8_and_lossless(tmp_path):
    prob = prob_map((700, 900))
    path = write_probability_tiff(tmp_path / "p.tif", prob, "frag")
    with tifffile.TiffFile(path) as tif:
        assert not tif.is_bigtiff and len(tif.pages) == 1
        page = tif.pages[0]
        assert page.is_tiled and (page.tilelength, page.tilewidth) == (256, 256)
        assert page.compression == tifffile.COMPRESSION.ADOBE_DEFLATE  # zlib
        assert page.dtype == np.uint8 and page.shape == (700, 900)
        np.testing.assert_array_equal(page.asarray(), prob)
        assert "ink probability" in page.description
    assert path.stat().st_size <= tiff_bytes_bound(700, 900)
    assert not list(tmp_path.glob(".*.tmp"))


def test_tiff_becomes_bigtiff_when_large(tmp_path, monkeypatch):
    monkeypatch.setattr(outputs, "BIGTIFF_ABOVE_BYTES", 1000)
    prob = prob_map((40, 50))
    with tifffile.TiffFile(write_probability_tiff(tmp_path / "p.tif", prob, "f")) as tif:
        assert tif.is_bigtiff
        np.testing.assert_array_equal(tif.asarray(), prob)


def test_downsample_mean_rounds_and_handles_odd_and_thin_images():
    image = np.array([[0, 1, 9], [2, 3, 9], [255, 255, 9]], np.uint8)
    np.testing.assert_array_equal(downsample_mean(image), [[2]])  # (0+1+2+3+2)//4; odd dropped
    assert downsample_mean(np.full((1, 7), 5, np.uint8)).tolist() == [[5, 5, 5]]
    assert downsample_mean(np.full((9, 1), 250, np.uint8)).shape == (4, 1)
    big = prob_map((2500, 6))  # several row blocks
    expected = big.astype(np.uint16).reshape(1250, 2, 3, 2).sum(axis=(1, 3))
    np.testing.assert_array_equal(downsample_mean(big), (expected + 2) // 4)


def test_pyramid_halves_until_the_long_side_is_below_the_limit():
    shapes = [(lv.shape, scale) for lv, scale in pyramid(np.zeros((2100, 50), np.uint8))]
    assert shapes == [((2100, 50), (1, 1)), ((1050, 25), (2, 2)), ((525, 12), (4, 4))]
    assert [lv.shape for lv, _ in pyramid(np.zeros((1023, 1000), np.uint8))] == [(1023, 1000)]
    assert [s for _, s in pyramid(np.zeros((5, 1), np.uint8), min_px=2)] == [(1, 1), (2, 1), (4, 1)]


def test_ome_zarr_is_a_valid_ngff_image_with_a_pyramid(tmp_path):
    prob = prob_map((700, 900))
    path = write_probability_ome_zarr(tmp_path / "p.ome.zarr", prob, "frag", min_px=200)
    levels = check_image(path, strict=True)  # the official 0.5 schema, then plain zarr-python
    assert [lv.shape for lv in levels] == [(700, 900), (350, 450), (175, 225), (87, 112)]
    assert all(lv.dtype == np.uint8 for lv in levels)
    np.testing.assert_array_equal(levels[0][...], prob)
    np.testing.assert_array_equal(levels[1][...], downsample_mean(prob))
    np.testing.assert_array_equal(levels[2][...], downsample_mean(downsample_mean(prob)))
    attrs = json.loads((path / "zarr.json").read_text())["attributes"]
    (ms,) = attrs["ome"]["multiscales"]
    scales = [d["coordinateTransformations"][0]["scale"] for d in ms["datasets"]]
    assert scales == [[1, 1], [2, 2], [4, 4], [8, 8]]
    assert ms["name"] == "frag" and ms["type"] == "mean"
    assert attrs["inkpipe"]["content"].startswith("ink probability")
    # default pyramid: one level for images below 1024 px
    one = write_probability_ome_zarr(tmp_path / "one.ome.zarr", prob, "frag")
    assert [lv.shape for lv in check_image(one, strict=True)] == [(700, 900)]


def test_ome_zarr_is_replaced_whole(tmp_path):
    path = tmp_path / "p.ome.zarr"
    write_probability_ome_zarr(path, prob_map((300, 300), 1), "a", min_px=100)
    write_probability_ome_zarr(path, prob_map((50, 60), 2), "a", min_px=100)
    assert [lv.shape for lv in check_image(path)] == [(50, 60)]
    assert not (path / "1").exists()  # no level of the old image left behind
    assert [p.name for p in tmp_path.iterdir()] == ["p.ome.zarr"]  # no temporary left


def test_size_bounds_hold(tmp_path):
    for shape in ((700, 900), (1500, 2049), (1, 1)):
        prob = prob_map(shape)
        tif = write_probability_tiff(tmp_path / "p.tif", prob, "f")
        assert tif.stat().st_size <= tiff_bytes_bound(*shape)
        ome = write_probability_ome_zarr(tmp_path / "p.ome.zarr", prob, "f")
        stored = sum(p.stat().st_blocks * 512 for p in ome.rglob("*") if p.is_file())
        assert stored <= ome_zarr_bytes_bound(*shape)


@pytest.fixture(scope="module")
def saved_run(tiny_store, tmp_path_factory):
    ckpt = make_checkpoint(tmp_path_factory.mktemp("ckpt") / "a.pt")
    out = tmp_path_factory.mktemp("pred") / "out"
    args = ["predict", "--checkpoint", str(ckpt), "--store", str(tiny_store), "1", "2"]
    args += ["--out", str(out), "--tta", "none", "--quiet", "--save-probabilities"]
    result = CliRunner().invoke(cli, [*args, "--save-ome-zarr"])
    assert result.exit_code == 0, result.output
    return out, result.output, ckpt


def test_predict_saves_the_probability_maps(saved_run):
    out, output, _ = saved_run
    for fragment_id, shape in (("1", (96, 80)), ("2", (70, 100))):
        png = read_gray(out / f"{fragment_id}_probability.png")
        assert png.shape == shape
        np.testing.assert_array_equal(tifffile.imread(out / f"{fragment_id}_probability.tif"), png)
        (level,) = check_image(out / f"{fragment_id}_probability.ome.zarr", strict=True)
        np.testing.assert_array_equal(level[...], png)
        group = zarr.open_group(str(out / f"{fragment_id}_probability.ome.zarr"), mode="r")
        assert group.attrs["ome"]["multiscales"][0]["name"] == fragment_id
    record = json.loads((out / "predict.json").read_text())
    assert record["config"]["save_probabilities"] and record["config"]["save_ome_zarr"]
    first = record["fragments"][0]
    assert first["probability_tif"].endswith("1_probability.tif")
    assert first["probability_ome_zarr"].endswith("1_probability.ome.zarr")
    assert "<id>_probability.tif, <id>_probability.ome.zarr" in output


def test_without_the_flags_only_pngs(tiny_store, saved_run, tmp_path):
    _, _, ckpt = saved_run
    cfg = PredictConfig(
        checkpoints=(ckpt,), fragments=("1",), out=tmp_path, store=tiny_store, tta="none", **QUIET
    )
    results = predict(cfg, log=lambda s: None)
    assert results[0].probability_tif is None and results[0].probability_ome_zarr is None
    assert not list(tmp_path.glob("*.tif")) and not list(tmp_path.glob("*.ome.zarr"))
    assert "maps:" not in format_predictions(results, tmp_path)


def test_the_disk_check_counts_the_maps(tmp_path):
    base = dict(checkpoints=(Path("c.pt"),), fragments=("1",), out=tmp_path)
    plain = output_bytes_bound(PredictConfig(**base), [(8181, 6330)])
    tif = output_bytes_bound(PredictConfig(**base, save_probabilities=True), [(8181, 6330)])
    both = output_bytes_bound(
        PredictConfig(**base, save_probabilities=True, save_ome_zarr=True), [(8181, 6330)]
    )
    assert tif - plain == tiff_bytes_bound(8181, 6330)
    assert both - tif == ome_zarr_bytes_bound(8181, 6330)
