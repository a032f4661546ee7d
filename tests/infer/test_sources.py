from __future__ import annotations

import functools
import http.server
import shutil
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import fsspec
import numpy as np
import pytest
import zarr
from click.testing import CliRunner
from PIL import Image

from inkpipe.cli import cli
from inkpipe.infer import sources
from inkpipe.infer.predict import PredictConfig, predict
from inkpipe.infer.rle import read_submission
from inkpipe.infer.sources import (
    MAX_BLOCK_PX,
    SourceVolume,
    block_px,
    compute_layer_stats,
    is_zarr_source,
    open_zarr_fragment,
    source_id,
)
from inkpipe.pipeline.errors import (
    ConfigError,
    InkpipeError,
    InputNotFoundError,
    InvalidInputError,
    MissingPackageError,
)
from inkpipe.pipeline.images import read_gray
from inkpipe.pipeline.layers import LayerRange
from inkpipe.pipeline.ome import multiscales_attrs
from inkpipe.pipeline.store import open_fragments
from tests.infer.test_predict import make_checkpoint

QUIET = {"progress": False}
LAYERS = LayerRange(2, 6)  # what make_checkpoint's model reads


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "a.pt", seed=0)


@pytest.fixture(scope="module")
def frag1(tiny_store: Path):
    """Fragment 1 of the tiny store: its volume, mask image and the store's prediction."""
    (frag,) = open_fragments(tiny_store, ["1"])
    return frag, tiny_store.parent / "fragments" / "train" / "1" / "mask.png"


@pytest.fixture(scope="module")
def store_prediction(tiny_store, ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("store-pred")
    cfg = PredictConfig(
        checkpoints=(ckpt,), fragments=("1",), out=out, store=tiny_store, tta="none", **QUIET
    )
    (result,) = predict(cfg, log=lambda s: None)
    return result, out


def write_volume(
    target: str | Path, data: np.ndarray, chunks: tuple[int, ...] | None = None, fmt: int = 3
) -> str:
    """Write ``data`` as a plain Zarr array (no inkpipe attributes) at a path or URL."""
    chunks = chunks or tuple(min(s, c) for s, c in zip(data.shape, (3, 40, 40, 40)))
    array = zarr.create_array(
        store=str(target),
        shape=data.shape,
        dtype=data.dtype,
        chunks=chunks,
        zarr_format=fmt,  # type: ignore[arg-type]
        overwrite=True,
    )
    array[...] = data
    return str(target)


@pytest.fixture
def memory_root() -> Iterator[str]:
    """A fresh folder of fsspec's in-process memory filesystem, removed afterwards."""
    root = f"memory://inkpipe-{uuid.uuid4().hex}"
    yield root
    fs = fsspec.filesystem("memory")
    if fs.exists(root):
        fs.rm(root, recursive=True)


def predict_volume(volume: str, mask: Path, ckpt: Path, out: Path, **kw) -> tuple[object, list]:
    logs: list[str] = []
    cfg = PredictConfig(
        checkpoints=(ckpt,), fragments=(volume,), masks=(mask,), out=out, tta="none", **QUIET, **kw
    )
    (result,) = predict(cfg, log=logs.append)
    return result, logs


def assert_same_prediction(a, b) -> None:
    pa, pb = read_gray(a.probability_png).astype(int), read_gray(b.probability_png).astype(int)
    assert pa.shape == pb.shape
    # the statistics are summed in other bands than at ingest: the last float bits may differ
    assert np.abs(pa - pb).max() <= 1
    np.testing.assert_array_equal(read_gray(a.mask_png) > 0, read_gray(b.mask_png) > 0)


def test_a_local_zarr_array_predicts_like_the_store(frag1, store_prediction, ckpt, tmp_path):
    frag, mask = frag1
    volume = write_volume(tmp_path / "seg1.zarr", np.asarray(frag.volume[...]))
    result, logs = predict_volume(volume, mask, ckpt, tmp_path / "out")
    assert result.id == "seg1" and result.shape == (96, 80)
    assert_same_prediction(result, store_prediction[0])
    assert list(read_submission(tmp_path / "out" / "submission.csv")) == ["seg1"]
    assert any("statistics of layers 2:6 inside the mask" in line for line in logs)
    assert not (tmp_path / "out" / ".ingest.zarr").exists()  # nothing ingested


def test_a_fragment_normalised_checkpoint_summarises_every_layer_once(
    frag1, tiny_store, tmp_path, monkeypatch
):
    """``normalize: fragment`` pools all layers, as ingest stored them: one pass over them."""
    frag, mask = frag1
    norm = make_checkpoint(tmp_path / "norm.pt", config={"normalize": "fragment"})
    cfg = PredictConfig(
        checkpoints=(norm,),
        fragments=("1",),
        out=tmp_path / "s",
        store=tiny_store,
        tta="none",
        **QUIET,
    )
    (from_store,) = predict(cfg, log=lambda s: None)
    volume = write_volume(tmp_path / "seg1.zarr", np.asarray(frag.volume[...]))
    stats_reads: list = []
    original = sources.compute_layer_stats

    def spy(vol, m, layers):
        stats_reads.append(layers)
        return original(vol, m, layers)

    monkeypatch.setattr(sources, "compute_layer_stats", spy)
    result, logs = predict_volume(volume, mask, norm, tmp_path / "out")
    assert_same_prediction(result, from_store)
    assert stats_reads == [LayerRange(0, 12)]  # every layer, in one pass
    assert any("statistics of layers 0:12 inside the mask" in line for line in logs)


def test_the_statistics_are_ingest_s(frag1, tmp_path, monkeypatch):
    frag, mask = frag1
    volume = write_volume(tmp_path / "v.zarr", np.asarray(frag.volume[...]), chunks=(5, 16, 24))
    source = open_zarr_fragment(volume, mask, LAYERS)
    stats = source.layer_stats()
    np.testing.assert_allclose(stats[2:6], frag.layer_stats()[2:6], rtol=1e-12)
    assert np.isnan(stats[:2]).all() and np.isnan(stats[6:]).all()  # only the model's layers
    # bands of any height add up to the same statistics: here one block row (16 px) a band
    monkeypatch.setattr(sources, "STATS_BAND_MB", 1e-6)
    source.volume.chunks = (5, 16, 24)
    reads: list = []
    original = SourceVolume.__getitem__

    def spy(self, key):
        reads.append(key)
        return original(self, key)

    monkeypatch.setattr(SourceVolume, "__getitem__", spy)
    small = compute_layer_stats(source.volume, source.mask(), LAYERS)
    np.testing.assert_allclose(small, stats, rtol=1e-12)
    assert [(k[1].start, k[1].stop) for k in reads] == [(y, y + 16) for y in range(0, 96, 16)]


def test_an_ome_zarr_group_in_memory_reads_level_0(
    frag1, store_prediction, ckpt, tmp_path, memory_root
):
    frag, mask = frag1
    data = np.asarray(frag.volume[...])
    group = zarr.open_group(f"{memory_root}/scroll.zarr", mode="w", zarr_format=3)
    for level, step in (("0", 1), ("1", 2)):
        part = np.ascontiguousarray(data[:, ::step, ::step])
        array = group.create_array(level, shape=part.shape, dtype="uint16", chunks=(4, 32, 32))
        array[...] = part
    group.attrs.update(
        multiscales_attrs("scroll", ("z", "y", "x"), ["0", "1"], [[1] * 3, [1, 2, 2]])
    )
    result, logs = predict_volume(f"{memory_root}/scroll.zarr", mask, ckpt, tmp_path / "out")
    assert result.id == "scroll"
    assert_same_prediction(result, store_prediction[0])
    assert any("scroll.zarr/0" in line for line in logs)


def test_a_zarr_v2_group_with_an_array_0(frag1, store_prediction, ckpt, tmp_path, memory_root):
    frag, mask = frag1
    group = zarr.open_group(f"{memory_root}/v2.zarr", mode="w", zarr_format=2)
    array = group.create_array("0", shape=frag.volume.shape, dtype="uint16", chunks=(12, 50, 50))
    array[...] = np.asarray(frag.volume[...])
    # the level itself names its image: .../v2.zarr/0 -> v2
    result, _ = predict_volume(f"{memory_root}/v2.zarr/0", mask, ckpt, tmp_path / "out")
    assert result.id == "v2"
    assert_same_prediction(result, store_prediction[0])


@pytest.fixture
def http_root(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """An HTTP server on 127.0.0.1 serving ``tmp_path/www`` (stopped afterwards)."""
    pytest.importorskip("aiohttp")  # fsspec's HTTP filesystem
    www = tmp_path / "www"
    www.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Quiet, directory=str(www))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", www
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_a_volume_over_http(frag1, store_prediction, ckpt, tmp_path, http_root):
    url, www = http_root
    frag, mask = frag1
    write_volume(www / "remote.zarr", np.asarray(frag.volume[...]))
    result, _ = predict_volume(f"{url}/remote.zarr", mask, ckpt, tmp_path / "out")
    assert result.id == "remote"
    assert_same_prediction(result, store_prediction[0])
    with pytest.raises(InputNotFoundError, match="Zarr volume not found: http://127.0.0.1"):
        open_zarr_fragment(f"{url}/absent.zarr", mask, LAYERS)


def test_uint8_volumes_are_read_as_the_high_byte(frag1, ckpt, tmp_path):
    frag, mask = frag1
    data = np.asarray(frag.volume[...])
    volume = write_volume(tmp_path / "u8.zarr", (data >> 8).astype(np.uint8))
    source = open_zarr_fragment(volume, mask, LAYERS)
    np.testing.assert_array_equal(source.volume[3, :5, :5], (data[3, :5, :5] >> 8) << 8)
    assert source.volume[3, :5, :5].dtype == np.uint16
    result, logs = predict_volume(volume, mask, ckpt, tmp_path / "out")
    assert result.shape == (96, 80)
    assert any("uint8, read as value << 8" in line for line in logs)


def test_only_the_model_layers_are_read(frag1, ckpt, tmp_path, monkeypatch):
    frag, mask = frag1
    volume = write_volume(tmp_path / "v.zarr", np.asarray(frag.volume[...]))
    keys: list = []
    original = SourceVolume.__getitem__

    def spy(self, key):
        keys.append(key)
        return original(self, key)

    monkeypatch.setattr(SourceVolume, "__getitem__", spy)
    predict_volume(volume, mask, ckpt, tmp_path / "out")
    assert keys
    for key in keys:
        z = key[0] if isinstance(key, tuple) else key
        if isinstance(z, slice):
            assert LAYERS.start <= z.start and z.stop <= LAYERS.stop, key
        else:
            assert z == LAYERS.start + LAYERS.k // 2, key  # the overlay's CT layer


def test_blocks_are_bounded_whatever_the_chunks():
    assert block_px(64) == 256 and block_px(100) == 300 and block_px(512) == 512
    assert block_px(MAX_BLOCK_PX) == MAX_BLOCK_PX
    for chunk in (2049, 4096, 5000, 65536):
        assert block_px(chunk) <= 1024
    whole_layers = zarr.create_array(
        store={}, shape=(65, 6000, 5000), dtype="uint16", chunks=(1, 6000, 5000)
    )
    assert SourceVolume(whole_layers, "x").chunks == (1, 1000, 1000)
    sharded = zarr.create_array(
        store={}, shape=(8, 4096, 4096), dtype="uint16", chunks=(8, 64, 64), shards=(8, 512, 512)
    )
    assert SourceVolume(sharded, "x").chunks == (8, 512, 512)  # one shard a block


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("s3://bucket/scrolls/20230702.zarr", "20230702"),
        ("https://host/a/b/segment.zarr/", "segment"),
        ("memory://x/scroll.zarr/0", "scroll"),
        ("/data/surface volume.zarr", "surface_volume"),
        ("vol", "vol"),
        ("https://host/0", "0"),
        ("s3://b/segments/20230702185753/", "20230702185753"),
    ],
)
def test_source_ids(given, expected):
    assert source_id(given) == expected


def test_what_counts_as_a_zarr_source(tiny_store, tmp_path):
    assert is_zarr_source("s3://b/x") and is_zarr_source("memory://x")
    assert is_zarr_source(str(tmp_path / "absent.zarr"))  # so it is reported as a Zarr volume
    assert is_zarr_source(str(tiny_store / "1"))  # a Zarr group
    raw = tiny_store.parent / "fragments" / "train" / "1"
    assert not is_zarr_source(str(raw))  # a fragment folder
    assert not is_zarr_source(str(tmp_path))  # a plain folder: reported as a fragment folder


def mask_png(path: Path, shape: tuple[int, int]) -> Path:
    mask = np.zeros(shape, np.uint8)
    mask[2:-2, 2:-2] = 255
    Image.fromarray(mask).save(path)
    return path


def broken_inputs(tmp: Path, memory_root: str, tiny_store: Path) -> dict[str, tuple]:
    """name -> (volume, mask, error class, words the message must hold)."""
    rng = np.random.default_rng(0)
    good = rng.integers(0, 60000, (8, 40, 30), dtype=np.uint16)
    mask = mask_png(tmp / "mask.png", (40, 30))
    several = zarr.open_group(tmp / "several.zarr", mode="w", zarr_format=3)
    for name in ("a", "b"):
        several.create_array(name, shape=(8, 40, 30), dtype="uint16")
    cases = {
        "missing path": (
            str(tmp / "absent.zarr"),
            mask,
            InputNotFoundError,
            ["Zarr volume not found", "absent.zarr"],
        ),
        "missing url": (
            f"{memory_root}/absent.zarr",
            mask,
            InputNotFoundError,
            ["Zarr volume not found", "memory://"],
        ),
        "float32": (
            write_volume(tmp / "f32.zarr", good.astype(np.float32)),
            mask,
            InvalidInputError,
            ["dtype float32", "expected uint16", "convert"],
        ),
        "int16": (
            write_volume(f"{memory_root}/i16.zarr", good.astype(np.int16)),
            mask,
            InvalidInputError,
            ["dtype int16", "i16.zarr"],
        ),
        "2-D": (
            write_volume(tmp / "flat.zarr", good[0]),
            mask,
            InvalidInputError,
            ["is 2-D", "(z, y, x)"],
        ),
        "4-D": (write_volume(tmp / "c.zarr", good[None]), mask, InvalidInputError, ["is 4-D"]),
        "mask shape": (
            write_volume(tmp / "wide.zarr", good[:, :, :20]),
            mask,
            InvalidInputError,
            ["is 40 x 30 px", "is 40 x 20 px", "pass the mask of this volume"],
        ),
        "layers past the array": (
            write_volume(tmp / "thin.zarr", good[:4]),
            mask,
            ConfigError,
            ["reads layers 2:6", "has 4 layers", "--layers"],
        ),
        "missing mask": (
            write_volume(tmp / "ok.zarr", good),
            tmp / "nomask.png",
            InputNotFoundError,
            ["mask not found", "nomask.png"],
        ),
        "empty mask": (
            write_volume(tmp / "ok2.zarr", good),
            _empty_mask(tmp / "empty.png"),
            InvalidInputError,
            ["is empty"],
        ),
        "several arrays": (
            str(tmp / "several.zarr"),
            mask,
            InvalidInputError,
            ["no multiscales metadata", "a, b", "several.zarr/a"],
        ),
        "a store": (str(tiny_store), mask, InvalidInputError, ["is an inkpipe store", "--store"]),
        "a folder of files": (
            _junk_dir(tmp / "junk.zarr"),
            mask,
            InvalidInputError,
            ["is not a Zarr array or group"],
        ),
    }
    return cases


def _empty_mask(path: Path) -> Path:
    Image.fromarray(np.zeros((40, 30), np.uint8)).save(path)
    return path


def _junk_dir(path: Path) -> str:
    path.mkdir()
    (path / "notes.txt").write_text("not zarr")
    return str(path)


def test_broken_inputs_are_one_line_errors(tmp_path, memory_root, tiny_store, ckpt):
    cases = broken_inputs(tmp_path, memory_root, tiny_store)
    for name, (volume, mask, error, words) in cases.items():
        with pytest.raises(error) as info:
            open_zarr_fragment(volume, mask, LAYERS)
        message = str(info.value)
        assert "\n" not in message, name
        for word in words:
            assert word in message, (name, word, message)
        # and from the command line: one line, exit code 1, no traceback
        result = CliRunner().invoke(
            cli,
            ["predict", "--checkpoint", str(ckpt), volume, "--mask", str(mask)]
            + ["--out", str(tmp_path / "out"), "--quiet"],
        )
        assert result.exit_code == 1, (name, result.output)
        assert "Traceback" not in result.output
        assert result.output.startswith("Error: ") and len(result.output.strip().splitlines()) == 1
        assert words[0] in result.output, (name, result.output)


def test_mask_count_and_store_errors(tmp_path, tiny_store, ckpt):
    volume = write_volume(tmp_path / "v.zarr", np.zeros((8, 40, 30), np.uint16))
    mask = mask_png(tmp_path / "m.png", (40, 30))
    with pytest.raises(ConfigError, match=r"1 Zarr volume\(s\) .*v.zarr.* but 0 --mask"):
        predict(
            PredictConfig(checkpoints=(ckpt,), fragments=(volume,), out=tmp_path / "o", **QUIET)
        )
    folder = str(tiny_store.parent / "fragments" / "train" / "2")
    with pytest.raises(ConfigError, match="--mask is for Zarr volumes, but no FRAGMENT is one"):
        predict(
            PredictConfig(
                checkpoints=(ckpt,), fragments=(folder,), masks=(mask,), out=tmp_path / "o", **QUIET
            )
        )
    with pytest.raises(ConfigError, match="--mask is for Zarr volumes"):
        PredictConfig(
            checkpoints=(ckpt,), fragments=("1",), masks=(mask,), store=tiny_store, out=tmp_path
        )
    other = tmp_path / "copy"
    other.mkdir()
    again = shutil.copytree(volume, other / "v.zarr")
    with pytest.raises(InvalidInputError, match=r"several inputs have the fragment id \['v'\]"):
        predict(
            PredictConfig(
                checkpoints=(ckpt,),
                fragments=(volume, str(again)),
                masks=(mask, mask),
                out=tmp_path / "o",
                **QUIET,
            )
        )


def test_mixing_folders_and_volumes_keeps_the_order(frag1, tiny_store, ckpt, tmp_path):
    frag, mask = frag1
    volume = write_volume(tmp_path / "vol.zarr", np.asarray(frag.volume[...]))
    folder = str(tiny_store.parent / "fragments" / "train" / "2")
    cfg = PredictConfig(
        checkpoints=(ckpt,),
        fragments=(volume, folder),
        masks=(mask,),
        out=tmp_path / "o",
        tta="none",
        **QUIET,
    )
    results = predict(cfg, log=lambda s: None)
    assert [r.id for r in results] == ["vol", "2"]
    assert list(read_submission(tmp_path / "o" / "submission.csv")) == ["vol", "2"]


def test_missing_fsspec_backends_and_unreachable_servers(tmp_path, monkeypatch):
    mask = mask_png(tmp_path / "m.png", (40, 30))

    def no_s3(*args, **kwargs):
        raise ImportError("Install s3fs to access S3")

    monkeypatch.setattr(sources.zarr, "open", no_s3)
    with pytest.raises(MissingPackageError, match="needs s3fs .*; install it: pip install s3fs"):
        open_zarr_fragment("s3://bucket/vol.zarr", mask, LAYERS)
    monkeypatch.undo()
    pytest.importorskip("aiohttp")
    with socket_closed() as port, pytest.raises(InkpipeError) as info:
        open_zarr_fragment(f"http://127.0.0.1:{port}/vol.zarr", mask, LAYERS)
    assert "\n" not in str(info.value) and f"127.0.0.1:{port}/vol.zarr" in str(info.value)


class socket_closed:
    """A localhost port that nothing listens on (bound, then closed)."""

    def __enter__(self) -> int:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    def __exit__(self, *exc) -> None:
        return None


def test_a_read_failure_names_the_volume(tmp_path):
    array = zarr.create_array(
        store=str(tmp_path / "v.zarr"), shape=(8, 40, 30), dtype="uint16", chunks=(8, 20, 20)
    )
    array[...] = 1
    chunk = next(
        p for p in (tmp_path / "v.zarr").rglob("*") if p.is_file() and p.parent.name != "v.zarr"
    )
    chunk.write_bytes(b"garbage")
    volume = SourceVolume(zarr.open_array(str(tmp_path / "v.zarr"), mode="r"), "v.zarr")
    with pytest.raises(
        InvalidInputError, match=r"reading Zarr volume v.zarr failed .*run the command again"
    ):
        volume[0:8, 0:40, 0:30]
