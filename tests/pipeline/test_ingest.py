import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import tifffile
import yaml
import zarr
from PIL import Image

from inkpipe.pipeline import ingest as ingest_mod
from inkpipe.pipeline.errors import InkpipeError, InputNotFoundError, InvalidInputError, StoreError
from inkpipe.pipeline.ingest import IngestConfig, ingest, resolve_settings
from inkpipe.pipeline.store import (
    Codec,
    Shuffle,
    StoreSettings,
    fragment_ids,
    fragment_meta,
    open_fragments,
    open_store,
)
from inkpipe.pipeline.windows import INK_PX
from tests.conftest import TINY, write_fragment

ROOT = Path(__file__).resolve().parents[2]


def run(root, out, **kw):
    kw.setdefault("settings", TINY)
    return ingest(IngestConfig(root=root, out=out, progress=False, **kw), log=lambda s: None)


def test_ingest_roundtrip(fragments_dir, tmp_path):
    out = tmp_path / "s.zarr"
    results = run(fragments_dir, out)
    assert [r.status for r in results] == ["ingested"] * 3
    frags = {f.id: f for f in open_fragments(out)}
    assert set(frags) == {"1", "2", "a"}
    f = frags["2"]
    assert f.meta.shape == (12, 70, 100) and f.meta.split == "train" and f.meta.complete
    for z in (0, 5, 11):
        src = tifffile.imread(fragments_dir / "train" / "2" / "surface_volume" / f"{z:02d}.tif")
        np.testing.assert_array_equal(f.volume[z], src)
    assert f.volume.chunks == (4, 64, 64)
    assert frags["a"].labels() is None and frags["a"].meta.split == "test"
    assert frags["1"].ir() is not None
    # the mask plane (written from the mask's bits) and the IR plane (after the volume), exact;
    # fragment 2 is 100 px wide: the bits' last byte is partly padding
    src_dir = fragments_dir / "train" / "2"
    mask_src = np.asarray(Image.open(src_dir / "mask.png")) > 0
    np.testing.assert_array_equal(f.mask(), mask_src.astype(np.uint8))
    np.testing.assert_array_equal(f.ir(), np.asarray(Image.open(src_dir / "ir.png")))
    # statistics inside the mask, of the rows y % STATS_ROW_STEP == 0, exact for mean and std
    step = ingest_mod.STATS_ROW_STEP
    vol = f.volume[:, ::step].astype(np.float64)
    m = f.mask()[::step].astype(bool)
    stats = f.layer_stats()
    np.testing.assert_allclose(stats[:, 0], [v[m].mean() for v in vol], rtol=1e-9)
    np.testing.assert_allclose(stats[:, 1], [v[m].std() for v in vol], rtol=1e-6)
    # the percentiles are exact for those rows (from a histogram of every uint16 value)
    for q, col in ((1, 2), (99, 3)):
        exact = [np.percentile(v[m], q, method="inverted_cdf") for v in vol]
        np.testing.assert_array_equal(stats[:, col], exact)
    # every chunk file reads through zarr-python as the source slices
    src = np.stack(
        [
            tifffile.imread(fragments_dir / "train" / "2" / "surface_volume" / f"{z:02d}.tif")
            for z in range(12)
        ]
    )
    plain = zarr.open_array(out / "2" / "volume", mode="r")
    for zc in range(3):
        for yc in range(2):
            for xc in range(2):
                sel = np.s_[zc * 4 : zc * 4 + 4, yc * 64 : yc * 64 + 64, xc * 64 : xc * 64 + 64]
                np.testing.assert_array_equal(plain[sel], src[sel])
    # window index agrees with the mask and labels
    w = f.windows()
    for y0, x0, mpx, ink in w:
        assert mpx == f.mask()[y0 : y0 + 32, x0 : x0 + 32].sum()
        assert ink == f.labels()[y0 : y0 + 32, x0 : x0 + 32].sum()
        assert mpx > 0.1 * 32 * 32
    assert (w[:, INK_PX] > 0).any() and (w[:, INK_PX] == 0).any()
    attrs = f.group["windows"].attrs
    assert attrs["tile_px"] == 32 and attrs["stride_px"] == 16
    assert "surface_volume/00.tif" in f.meta.sources
    assert f.meta.settings["chunk_px"] == 64


def test_rerun_skips_unchanged_and_redoes_changed(fragments_dir, tmp_path):
    out = tmp_path / "s.zarr"
    run(fragments_dir, out)
    assert [r.status for r in run(fragments_dir, out)] == ["skipped"] * 3
    assert [r.status for r in run(fragments_dir, out, overwrite=True)] == ["ingested"] * 3
    p = fragments_dir / "train" / "1" / "surface_volume" / "03.tif"
    tifffile.imwrite(p, np.full((96, 80), 7, np.uint16))
    statuses = {r.id: r.status for r in run(fragments_dir, out)}
    assert statuses == {"1": "ingested", "2": "skipped", "a": "skipped"}
    assert open_fragments(out, ["1"])[0].volume[3, 0, 0] == 7


def test_interrupted_fragment_is_redone(fragments_dir, tmp_path, monkeypatch):
    out = tmp_path / "s.zarr"
    real = ingest_mod.copy_band
    calls = {"n": 0}

    def flaky(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 8:  # discovery order is a, 1, 2; a has 6 bands: this is in 1
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(ingest_mod, "copy_band", flaky)
    with pytest.raises(KeyboardInterrupt):
        run(fragments_dir, out)
    root = open_store(out)
    assert fragment_ids(root) == ["a"]  # the complete one is listed and readable
    assert open_fragments(out)[0].volume[0].shape == (96, 80)
    assert fragment_meta(root, "1") is not None and not fragment_meta(root, "1").complete
    assert fragment_meta(root, "2") is None
    monkeypatch.setattr(ingest_mod, "copy_band", real)
    statuses = {r.id: r.status for r in run(fragments_dir, out)}
    assert statuses == {"a": "skipped", "1": "ingested", "2": "ingested"}
    src = tifffile.imread(_slice(fragments_dir, 7))
    np.testing.assert_array_equal(open_fragments(out, ["1"])[0].volume[7], src)


def test_foreign_output_is_never_touched(fragments_dir, tmp_path):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "thesis.txt").write_text("do not delete")
    with pytest.raises(StoreError, match="not an inkpipe store"):
        run(fragments_dir, out, overwrite=True)
    assert (out / "thesis.txt").read_text() == "do not delete"
    plain = tmp_path / "plain.zarr"
    zarr.open_group(plain, mode="w")
    with pytest.raises(StoreError, match="not an inkpipe store"):
        run(fragments_dir, plain)


def test_single_fragment_folder_and_folder_of_fragments(tmp_path):
    write_fragment(tmp_path / "one" / "frag7", seed=4)
    write_fragment(tmp_path / "one" / "frag8", seed=5, labels=False)
    results = run(tmp_path / "one", tmp_path / "a.zarr")
    assert [r.id for r in results] == ["frag7", "frag8"]
    metas = {f.id: f.meta.split for f in open_fragments(tmp_path / "a.zarr")}
    assert metas == {"frag7": "train", "frag8": "test"}
    results = run(tmp_path / "one" / "frag7", tmp_path / "b.zarr")
    assert [r.id for r in results] == ["frag7"]


def test_the_same_id_in_train_and_test_is_an_error(tmp_path):
    write_fragment(tmp_path / "train" / "5", seed=4)
    write_fragment(tmp_path / "test" / "5", seed=5, labels=False)
    with pytest.raises(InvalidInputError, match=r"fragment ids found twice in .*\['5'\]"):
        run(tmp_path, tmp_path / "a.zarr")


def test_other_layer_count_is_recorded(tmp_path):
    write_fragment(tmp_path / "f" / "x", layers=7)
    run(tmp_path / "f", tmp_path / "s.zarr")
    assert open_fragments(tmp_path / "s.zarr")[0].meta.layers == 7


def test_manifest_selects_checks_and_groups(fragments_dir, tmp_path):
    m = tmp_path / "m.yaml"
    m.write_text(
        yaml.safe_dump(
            {
                "fragments": [
                    {
                        "id": "one",
                        "path": "train/1",
                        "split": "train",
                        "height_px": 96,
                        "width_px": 80,
                        "layers": 12,
                        "group": "g1",
                    },
                ],
                "ingest": {"chunk_px": 32, "tile_px": 32, "stride_px": 32},
            }
        )
    )
    settings = resolve_settings(m, {"chunk_layers": 2})
    assert (settings.chunk_px, settings.chunk_layers, settings.codec) == (32, 2, "lz4")
    run(fragments_dir, tmp_path / "s.zarr", manifest=m, settings=settings)
    (f,) = open_fragments(tmp_path / "s.zarr")
    assert (f.id, f.meta.group, f.volume.chunks) == ("one", "g1", (2, 32, 32))
    # the attributes hold plain text; the settings read back hold the members
    assert type(f.meta.settings["codec"]) is str and type(f.meta.settings["shuffle"]) is str
    assert (f.settings.codec, f.settings.shuffle) == (Codec.LZ4, Shuffle.SHUFFLE)
    assert isinstance(f.settings.codec, Codec)
    m.write_text(
        yaml.safe_dump(
            {"fragments": [{"id": "1", "path": "train/1", "height_px": 8181, "width_px": 6330}]}
        )
    )
    with pytest.raises(InvalidInputError, match="96x80.*8181x6330"):
        run(fragments_dir, tmp_path / "t.zarr", manifest=m)
    m.write_text(yaml.safe_dump({"fragments": [{"id": "1", "path": "train/1", "layers": 65}]}))
    with pytest.raises(InvalidInputError, match="found 12 slices.*expected 65"):
        run(fragments_dir, tmp_path / "t.zarr", manifest=m)
    m.write_text(yaml.safe_dump({"fragments": [{"id": "9", "path": "train/9"}]}))
    with pytest.raises(InputNotFoundError, match="train/9"):
        run(fragments_dir, tmp_path / "t.zarr", manifest=m)
    twice = [{"id": "1", "path": "train/1"}, {"id": "1", "path": "test/a"}]
    m.write_text(yaml.safe_dump({"fragments": twice}))
    with pytest.raises(InvalidInputError, match=r"fragment ids listed twice: \['1'\]"):
        run(fragments_dir, tmp_path / "t.zarr", manifest=m)
    assert not (tmp_path / "t.zarr").exists()


def test_repo_manifest_matches_code_defaults():
    from inkpipe.pipeline.manifest import load_manifest

    m = load_manifest(ROOT / "data_manifest.yaml")
    assert StoreSettings.from_mapping(m.ingest) == StoreSettings()
    assert {
        f.id: (f.height_px, f.width_px, f.layers) for f in m.fragments if f.split == "train"
    } == {"1": (8181, 6330, 65), "2": (14830, 9506, 65), "3": (7606, 5249, 65)}


# --- bad input: one clear error each, and nothing written --------------------------------


def _slice(root, z):
    return root / "train" / "1" / "surface_volume" / f"{z:02d}.tif"


def break_gap(root):
    _slice(root, 5).unlink()


def break_extra_name(root):
    shutil.copy(_slice(root, 1), root / "train" / "1" / "surface_volume" / "1b.tif")


def break_shape(root):
    tifffile.imwrite(_slice(root, 3), np.zeros((90, 80), np.uint16))


def break_dtype(root):
    tifffile.imwrite(_slice(root, 3), np.zeros((96, 80), np.float32))


def break_truncated(root):
    p = _slice(root, 2)
    p.write_bytes(p.read_bytes()[: os.path.getsize(p) // 2])


def break_garbage_tiff(root):
    _slice(root, 2).write_bytes(b"this is not a tiff at all")


def break_mask_shape(root):
    Image.fromarray(np.zeros((50, 50), np.uint8)).save(root / "train" / "1" / "mask.png")


def break_label_shape(root):
    Image.fromarray(np.zeros((96, 81), np.uint8)).save(root / "train" / "1" / "inklabels.png")


def break_mask_missing(root):
    (root / "train" / "1" / "mask.png").unlink()


def break_mask_garbage(root):
    (root / "train" / "1" / "mask.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")


def break_mask_empty(root):
    Image.fromarray(np.zeros((96, 80), np.uint8)).save(root / "train" / "1" / "mask.png")


CASES = [
    (break_gap, r"slices missing .*05\.tif"),
    (break_extra_name, r"unexpected slice name .*1b\.tif"),
    (break_shape, r"03\.tif has shape \(90, 80\).*must be the same size"),
    (break_dtype, r"03\.tif is float32"),
    (break_truncated, r"02\.tif is truncated"),
    (break_garbage_tiff, r"cannot read slice .*02\.tif"),
    (break_mask_shape, r"mask .*mask\.png is 50x50.*96x80"),
    (break_label_shape, r"ink labels .*inklabels\.png is 96x81"),
    (break_mask_missing, r"mask not found.*mask\.png"),
    (break_mask_garbage, r"cannot read mask .*mask\.png"),
    (break_mask_empty, r"mask .*mask\.png is empty"),
]


@pytest.mark.parametrize(("breaker", "pattern"), CASES, ids=[c[0].__name__ for c in CASES])
def test_bad_input_gives_one_clear_error(fragments_dir, tmp_path, breaker, pattern):
    breaker(fragments_dir)
    out = tmp_path / "s.zarr"
    with pytest.raises(InkpipeError, match=pattern) as info:
        run(fragments_dir, out)
    assert "\n" not in str(info.value)
    assert not out.exists()  # every fragment is checked before the store is created


def test_no_fragments(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputNotFoundError, match="no fragments found in"):
        run(tmp_path / "empty", tmp_path / "s.zarr")
    with pytest.raises(InputNotFoundError, match="fragments folder not found"):
        run(tmp_path / "nope", tmp_path / "s.zarr")


def test_ingest_on_a_dask_distributed_cluster(fragments_dir, tmp_path):
    from distributed import LocalCluster

    with LocalCluster(
        n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None
    ) as cluster:
        run(fragments_dir, tmp_path / "d.zarr", scheduler=cluster.scheduler_address)
    run(fragments_dir, tmp_path / "l.zarr")
    for fd, fl in zip(open_fragments(tmp_path / "d.zarr"), open_fragments(tmp_path / "l.zarr")):
        np.testing.assert_array_equal(fd.volume[...], fl.volume[...])
        np.testing.assert_array_equal(fd.layer_stats(), fl.layer_stats())


def test_layer_statistics_do_not_depend_on_the_banding():
    rng = np.random.default_rng(3)
    data = rng.integers(0, 65535, size=(3, 37, 20), dtype=np.uint16)
    mask = (rng.random((37, 20)) > 0.3).astype(np.uint8)
    whole = ingest_mod.summarize_band(data, mask, 0)
    parts = [
        ingest_mod.summarize_band(data[:, a:b], mask[a:b], a)
        for a, b in ((0, 13), (13, 30), (30, 37))
    ]
    np.testing.assert_array_equal(sum(p[0] for p in parts), whole[0])
    np.testing.assert_array_equal(sum(p[1] for p in parts), whole[1])
    step = ingest_mod.STATS_ROW_STEP
    assert whole[0][0, 0] == mask[::step].sum()  # only the rows y % step == 0 are counted


def test_band_buffers_are_reused_and_bounded():
    pool = ingest_mod.BandBuffers(keep=1)
    with pool.take((2, 4, 8)) as first:
        first[...] = 7
    with pool.take((2, 3, 8)) as again:  # a smaller band reuses the same memory
        assert np.shares_memory(again, first) and again.shape == (2, 3, 8)
        with pool.take((2, 4, 8)) as other:  # taken while the first is lent: new memory
            assert not np.shares_memory(other, again)
    assert len(pool._free) == 1  # only `keep` buffers stay free
    pool.clear()
    assert pool._free == []


def test_each_band_is_read_once_by_a_reading_thread_ahead_of_its_copy(
    fragments_dir, tmp_path, monkeypatch
):
    events: list[tuple] = []
    real_read, real_copy = ingest_mod.read_rows_into, ingest_mod.copy_band

    def read(info, y0, y1, out, direct=False):
        frag, layer = info.path.parent.parent.name, int(info.path.stem)
        events.append(("read", threading.get_ident(), direct, frag, layer, y0, y1))
        return real_read(info, y0, y1, out, direct)

    def copy(volume_path, band, *args, **kwargs):
        events.append(("copy", threading.get_ident(), Path(volume_path).parent.name, band))
        return real_copy(volume_path, band, *args, **kwargs)

    monkeypatch.setattr(ingest_mod, "read_rows_into", read)
    monkeypatch.setattr(ingest_mod, "copy_band", copy)
    run(fragments_dir, tmp_path / "s.zarr", workers=1)
    reads = [e for e in events if e[0] == "read"]
    copies = [e for e in events if e[0] == "copy"]
    keys = [e[3:] for e in reads]
    assert copies and len(set(keys)) == len(keys)  # each slice's band read once
    assert all(e[2] for e in reads)  # direct I/O by default
    assert not {e[1] for e in reads} & {e[1] for e in copies}  # read by another thread
    for i in (i for i, e in enumerate(events) if e[0] == "copy"):
        _, _, frag, (z0, z1, y0, y1) = events[i]
        wanted = {(frag, z, y0, y1) for z in range(z0, z1)}
        assert wanted <= {e[3:] for e in events[:i] if e[0] == "read"}  # read before
    runs = ingest_mod.band_runs((12, 96, 80), TINY)  # fragment 1: runs of one range of layers
    assert all(len({b[0] for b in r}) == 1 for r in runs) and len(runs) < len(
        ingest_mod.band_tasks((12, 96, 80), TINY)
    )


def test_direct_and_buffered_ingest_write_the_same_store(fragments_dir, tmp_path):
    stores = {}
    for direct in (True, False):
        out = tmp_path / f"s{direct}.zarr"
        run(fragments_dir, out, direct_io=direct)
        stores[direct] = {
            p.relative_to(out): p.read_bytes()
            for p in sorted((out / "1" / "volume").rglob("*"))
            if p.is_file()
        }
    assert stores[True] == stores[False] and len(stores[True]) > 1


def test_a_broken_ir_image_is_a_one_line_error_and_the_fragment_is_redone(fragments_dir, tmp_path):
    from click.testing import CliRunner

    from inkpipe.cli import cli

    ir = fragments_dir / "train" / "1" / "ir.png"
    good = ir.read_bytes()
    ir.write_bytes(good[: len(good) // 2])  # the header intact, the pixels cut short
    out = tmp_path / "s.zarr"
    args = ["ingest", str(fragments_dir), "--out", str(out), "--quiet"]
    args += ["--chunk-layers", "4", "--chunk-px", "64", "--tile", "32", "--stride", "16"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "IR image" in errors[0] and str(ir) in errors[0], result.output
    assert result.output.rstrip().endswith(errors[0])  # the last line, nothing after it
    root = open_store(out)
    assert not fragment_meta(root, "1").complete  # written while the IR plane failed: redone
    ir.write_bytes(good)
    assert CliRunner().invoke(cli, args).exit_code == 0
    assert fragment_meta(open_store(out), "1").complete
