from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from inkpipe.infer import predict as predict_module
from inkpipe.infer.predict import (
    OVERLAY_ALPHA,
    OVERLAY_COLOR,
    OVERLAY_DARKEN,
    FragmentPrediction,
    PredictConfig,
    checkpoint_normalize,
    count_windows,
    format_predictions,
    predict,
    render_overlay,
    stride_for,
)
from inkpipe.infer.rle import decode_rle, read_submission
from inkpipe.numerics.blending import sliding_window_predict
from inkpipe.numerics.metrics import fbeta_score
from inkpipe.pipeline.errors import (
    ConfigError,
    InkpipeError,
    InputNotFoundError,
    InvalidInputError,
    StoreError,
)
from inkpipe.pipeline.images import read_gray
from inkpipe.pipeline.layers import LayerRange
from inkpipe.pipeline.store import open_fragments
from inkpipe.pipeline.volume import NormMode
from inkpipe.train.checkpoint import checkpoint_payload, load_checkpoint, save_checkpoint
from inkpipe.train.models import ModelSpec, build_model
from tests.conftest import write_fragment

QUIET = {"progress": False}


def make_checkpoint(
    path: Path,
    layers: LayerRange | None = None,
    tile_px: int = 32,
    seed: int = 0,
    threshold: float = 0.5,
    config: dict | None = None,
) -> Path:
    """Save an untrained tiny attention U-Net whose logits are centred on 0.

    An untrained net outputs ~0.5 everywhere; centring its head's bias on random input makes
    the thresholded mask a mix of ink and no ink, so the tests compare non-trivial masks.
    """
    layers = layers or LayerRange(2, 6)
    torch.manual_seed(seed)
    spec = ModelSpec(name="attention-unet", in_channels=layers.k, widths=(4, 8, 16))
    model = build_model(spec).eval()
    with torch.no_grad():
        model.head.weight.mul_(50.0)
        model.head.bias.zero_()
        model.head.bias.sub_(model(torch.randn(2, layers.k, tile_px, tile_px)).mean())
    payload = checkpoint_payload(
        model, spec, layers, tile_px=tile_px, threshold=threshold, metrics={}, config=config or {}
    )
    return save_checkpoint(path, payload)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("ckpt")
    return {
        "a": make_checkpoint(base / "a.pt", seed=0),
        "b": make_checkpoint(base / "b.pt", seed=1, threshold=0.6),
        "layers": make_checkpoint(base / "layers.pt", layers=LayerRange(3, 7)),
        "tile": make_checkpoint(base / "tile.pt", tile_px=48),
        "deep": make_checkpoint(base / "deep.pt", layers=LayerRange(9, 13)),
        "big": make_checkpoint(base / "big.pt", tile_px=128),
        "norm": make_checkpoint(base / "norm.pt", config={"normalize": "fragment"}),
    }


@pytest.fixture(scope="module")
def store_run(
    tiny_store: Path, ckpts: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> tuple[list[FragmentPrediction], Path]:
    out = tmp_path_factory.mktemp("pred") / "out"
    cfg = PredictConfig(
        checkpoints=(ckpts["a"],), fragments=("1", "a", "2"), out=out, store=tiny_store, **QUIET
    )
    return predict(cfg, log=lambda s: None), out


def raw_dirs(tiny_store: Path) -> list[Path]:
    """The raw fragment folders tiny_store was ingested from (same order as store_run)."""
    root = tiny_store.parent / "fragments"
    return [root / "train" / "1", root / "test" / "a", root / "train" / "2"]


def test_outputs_exist_with_the_fragment_shapes(store_run, tiny_store):
    results, out = store_run
    frags = {f.id: f for f in open_fragments(tiny_store)}
    assert [r.id for r in results] == ["1", "a", "2"]
    for r in results:
        h, w = frags[r.id].mask().shape
        assert r.shape == (h, w)
        assert read_gray(r.probability_png).shape == (h, w)
        mask = read_gray(r.mask_png)
        assert mask.shape == (h, w) and set(np.unique(mask)) <= {0, 255}
        overlay = np.asarray(Image.open(r.overlay_png))
        assert overlay.shape == (h, w, 3) and overlay.dtype == np.uint8
        assert 0 < r.ink_fraction < 1  # the centred test model gives a mix
        assert r.ink_fraction == pytest.approx((mask > 0).sum() / (frags[r.id].mask() > 0).sum())
    record = json.loads((out / "predict.json").read_text())
    assert record["resolved"]["layers"] == "2:6" and record["resolved"]["stride_px"] == 16
    assert record["resolved"]["threshold"] == 0.5
    assert [f["id"] for f in record["fragments"]] == ["1", "a", "2"]


def test_submission_decodes_to_the_mask_pictures(store_run):
    results, out = store_run
    rows = read_submission(out / "submission.csv")
    assert list(rows) == ["1", "a", "2"]  # fragment order
    for r in results:
        mask = read_gray(r.mask_png) > 0
        np.testing.assert_array_equal(decode_rle(rows[r.id], r.shape), mask)


def test_predictions_are_zero_outside_the_papyrus(store_run, tiny_store):
    results, _ = store_run
    frags = {f.id: f for f in open_fragments(tiny_store)}
    for r in results:
        outside = frags[r.id].mask() == 0
        assert outside.any()
        assert not read_gray(r.probability_png)[outside].any()
        assert not read_gray(r.mask_png)[outside].any()
        assert read_gray(r.probability_png)[~outside].any()


def test_a_checkpoint_normalises_as_it_was_trained(store_run, tiny_store, ckpts, tmp_path):
    """Same weights, ``normalize: fragment`` in the config: the crops the model sees change."""
    results, _ = store_run
    cfg = PredictConfig(
        checkpoints=(ckpts["norm"],),
        fragments=("1",),
        out=tmp_path / "n",
        store=tiny_store,
        **QUIET,
    )
    (norm,) = predict(cfg, log=lambda s: None)
    per_layer = read_gray(results[0].probability_png).astype(int)
    per_fragment = read_gray(norm.probability_png).astype(int)
    # the tiny store's layers have similar statistics, so the change is small but there
    assert (per_layer != per_fragment).mean() > 0.01
    assert checkpoint_normalize(load_checkpoint(ckpts["a"])) is NormMode.LAYER
    assert checkpoint_normalize(load_checkpoint(ckpts["norm"])) is NormMode.FRAGMENT


def test_raw_folders_give_the_same_result_as_the_store(store_run, tiny_store, ckpts, tmp_path):
    results, out = store_run
    cfg = PredictConfig(
        checkpoints=(ckpts["a"],),
        fragments=tuple(str(d) for d in raw_dirs(tiny_store)),
        out=tmp_path / "raw",
        **QUIET,
    )
    raw = predict(cfg, log=lambda s: None)
    assert [r.id for r in raw] == [r.id for r in results]
    for a, b in zip(results, raw):
        for name in ("probability_png", "mask_png", "overlay_png"):
            np.testing.assert_array_equal(
                read_gray(getattr(a, name)), read_gray(getattr(b, name)), err_msg=name
            )
    assert (tmp_path / "raw" / "submission.csv").read_text() == (out / "submission.csv").read_text()
    # The on-the-fly store is kept, and a rerun skips the unchanged fragments.
    logs: list[str] = []
    predict(cfg, log=logs.append)
    assert sum("unchanged, skipped" in line for line in logs) == 3


def test_ensemble_averages_the_checkpoints(tiny_store, ckpts, tmp_path):
    probs = {}
    for name, paths in (("a", ("a",)), ("b", ("b",)), ("ab", ("a", "b"))):
        cfg = PredictConfig(
            checkpoints=tuple(ckpts[p] for p in paths),
            fragments=("1",),
            out=tmp_path / name,
            store=tiny_store,
            tta="none",
            **QUIET,
        )
        (r,) = predict(cfg, log=lambda s: None)
        probs[name] = read_gray(r.probability_png).astype(int)
    # Blending is linear, so the ensemble's map is the mean of the members' maps (to rounding).
    assert np.abs(probs["ab"] - (probs["a"] + probs["b"]) / 2).max() <= 1
    assert not np.array_equal(probs["a"], probs["b"])
    record = json.loads((tmp_path / "ab" / "predict.json").read_text())
    assert record["resolved"]["threshold"] == pytest.approx(0.55)  # mean of 0.5 and 0.6


@pytest.mark.parametrize("tta", ["none", "flips", "flips+rot90"])
def test_tta_modes_run(tiny_store, ckpts, tmp_path, tta):
    cfg = PredictConfig(
        checkpoints=(ckpts["a"],),
        fragments=("2",),
        out=tmp_path,
        store=tiny_store,
        tta=tta,
        overlap=0.25,
        **QUIET,
    )
    (r,) = predict(cfg, log=lambda s: None)
    assert r.shape == (70, 100) and 0 <= r.ink_fraction <= 1


def test_fragment_smaller_than_a_tile(tiny_store, ckpts, tmp_path):
    cfg = PredictConfig(
        checkpoints=(ckpts["big"],), fragments=("1",), out=tmp_path, store=tiny_store, **QUIET
    )
    (r,) = predict(cfg, log=lambda s: None)
    assert r.shape == (96, 80) and read_gray(r.mask_png).shape == (96, 80)
    rows = read_submission(tmp_path / "submission.csv")
    np.testing.assert_array_equal(decode_rle(rows["1"], r.shape), read_gray(r.mask_png) > 0)


def test_memory_mapped_canvases_give_the_same_result(store_run, tiny_store, ckpts, tmp_path):
    results, _ = store_run
    logs: list[str] = []
    cfg = PredictConfig(
        checkpoints=(ckpts["a"],),
        fragments=("1",),
        out=tmp_path,
        store=tiny_store,
        canvas_budget_mb=0,
        **QUIET,
    )
    (r,) = predict(cfg, log=logs.append)
    assert any("memory-mapped" in line for line in logs)
    np.testing.assert_array_equal(
        read_gray(r.probability_png), read_gray(results[0].probability_png)
    )
    assert not list(tmp_path.glob(".canvas-*"))  # the temporary folder is gone


def test_overlay_uses_a_ct_layer_without_ir_and_is_reduced_when_large(ckpts, tmp_path, monkeypatch):
    folder = write_fragment(tmp_path / "frags" / "noir", height=40, width=64, seed=5, ir=False)
    monkeypatch.setattr(predict_module, "OVERLAY_MAX_PX", 32)
    logs: list[str] = []
    cfg = PredictConfig(checkpoints=(ckpts["a"],), fragments=(str(folder),), out=tmp_path / "o")
    (r,) = predict(cfg, log=logs.append)
    assert r.id == "noir" and r.shape == (40, 64)
    overlay = np.asarray(Image.open(r.overlay_png))
    assert overlay.shape == (20, 32, 3)
    assert any("overlay reduced to 32x20" in line for line in logs)
    assert any("CT layer 4" in line for line in logs)  # middle of layers 2:6
    assert read_gray(r.mask_png).shape == (40, 64)


def test_render_overlay_tints_ink_and_darkens_outside():
    gray = np.full((4, 6), 200, np.uint8)
    papyrus = np.zeros((4, 6), np.uint8)
    papyrus[:, :4] = 1
    ink = np.zeros((4, 6), np.uint8)
    ink[0, 0] = 1
    rgb, scale = render_overlay(gray, papyrus, ink)
    assert scale == 1 and rgb.shape == (4, 6, 3)
    np.testing.assert_array_equal(rgb[1, 1], [200, 200, 200])  # papyrus: plain gray
    assert rgb[1, 5].max() < 100  # outside the papyrus: darkened
    r, g, b = rgb[0, 0].tolist()
    assert r > 200 and g < 120 and b > g  # ink: magenta tint
    small, scale = render_overlay(
        np.zeros((100, 50), np.uint8),
        papyrus[:1, :1].repeat(100, 0).repeat(50, 1),
        np.zeros((100, 50), np.uint8),
        max_px=10,
    )
    assert small.shape == (10, 5, 3) and scale == pytest.approx(0.1)


def _overlay_by_formula(gray, papyrus_u8, ink_u8):
    """The overlay's float formula on uint8 gray, papyrus (0..255) and ink (0..255) planes."""
    inside = papyrus_u8.astype(np.float64) / 255
    base = gray.astype(np.float64) * (OVERLAY_DARKEN + (1 - OVERLAY_DARKEN) * inside)
    alpha = (ink_u8.astype(np.float64) * (OVERLAY_ALPHA / 255))[..., None]
    rgb = base[..., None] * (1 - alpha) + np.asarray(OVERLAY_COLOR) * alpha
    return np.clip(rgb + 0.5, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("max_px", [4096, 37])
def test_render_overlay_within_one_level_of_the_formula(max_px):
    rng = np.random.default_rng(max_px)
    gray = rng.integers(0, 256, (120, 90), dtype=np.uint8)
    papyrus = (rng.random((120, 90)) < 0.7).astype(np.uint8)
    ink = (rng.random((120, 90)) < 0.3).astype(np.uint8)
    rgb, scale = render_overlay(gray, papyrus, ink, max_px)
    planes = [gray, papyrus * np.uint8(255), ink * np.uint8(255)]
    if scale < 1:  # the reduced planes hold fractions of papyrus and ink
        planes = [
            np.asarray(Image.fromarray(a).resize(rgb.shape[1::-1], Image.Resampling.BOX))
            for a in planes
        ]
        assert len(np.unique(planes[1])) > 2
    expected = _overlay_by_formula(*planes)
    assert np.abs(rgb.astype(int) - expected).max() <= 1


@pytest.mark.parametrize("tile,stride", [(32, 16), (32, 32), (32, 5), (128, 64)])
def test_count_windows_matches_the_windows_predicted(tile, stride):
    rng = np.random.default_rng(tile + stride)
    valid = np.zeros((90, 70), np.uint8)
    for _ in range(3):
        y, x = rng.integers(0, 80), rng.integers(0, 60)
        valid[y : y + 6, x : x + 9] = 1
    calls = []

    def predictor(batch):
        calls.append(len(batch))
        return batch[:, 0]

    sliding_window_predict(np.zeros((1, 90, 70), np.float32), predictor, tile, stride, 4, valid)
    assert count_windows(valid, tile, stride) == sum(calls)


def test_stride_for_overlap():
    assert stride_for(224, 0.5) == 112
    assert stride_for(224, 0.0) == 224
    assert stride_for(32, 0.95) == 2
    assert stride_for(4, 0.95) == 1


def test_checkpoint_errors(tiny_store, ckpts, tmp_path):
    def run(*names: str, **kw):
        paths = tuple(ckpts[n] if n in ckpts else tmp_path / n for n in names)
        cfg = PredictConfig(
            checkpoints=paths, fragments=("1",), out=tmp_path / "o", store=tiny_store, **QUIET, **kw
        )
        return predict(cfg, log=lambda s: None)

    with pytest.raises(ConfigError, match="no checkpoint given"):
        run()
    with pytest.raises(InputNotFoundError, match="checkpoint not found: .*missing.pt"):
        run("a", "missing.pt")
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(InvalidInputError, match="junk.pt"):
        run("junk.pt")
    for other, what in (
        ("layers", "layers 3:7"),
        ("tile", "48 px tiles"),
        ("norm", "per layer, .*norm.pt per fragment"),
    ):
        with pytest.raises(ConfigError, match="checkpoints disagree") as err:
            run("a", other)
        assert "a.pt" in str(err.value) and f"{other}.pt" in str(err.value)
        assert re.search(what, str(err.value))
    with pytest.raises(ConfigError, match=r"layers 9:13 do not fit fragment 1, which has 12"):
        run("deep")
    assert not (tmp_path / "o" / "submission.csv").exists()
    # Raw folders are checked before the (slow, for real data) ingest.
    raw = PredictConfig(
        checkpoints=(ckpts["deep"],),
        fragments=(str(raw_dirs(tiny_store)[0]),),
        out=tmp_path / "r",
        **QUIET,
    )
    with pytest.raises(ConfigError, match="layers 9:13 do not fit fragment 1"):
        predict(raw, log=lambda s: None)
    assert not (tmp_path / "r" / ".ingest.zarr").exists()


def test_fragment_errors(tiny_store, ckpts, tmp_path):
    def run(*fragments: str, store: Path | None = tiny_store):
        cfg = PredictConfig(
            checkpoints=(ckpts["a"],), fragments=fragments, out=tmp_path / "o", store=store, **QUIET
        )
        return predict(cfg, log=lambda s: None)

    with pytest.raises(StoreError, match=r"fragment 'zz' is not in store .*\(it has: a, 1, 2\)"):
        run("1", "zz")
    with pytest.raises(InputNotFoundError, match="fragment folder not found"):
        run(str(tmp_path / "nothing"), store=None)
    with pytest.raises(InvalidInputError, match="is not a fragment folder.*holds fragment folders"):
        run(str(tiny_store.parent / "fragments" / "train"), store=None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidInputError, match="is not a fragment folder"):
        run(str(tmp_path / "empty"), store=None)
    with pytest.raises(ConfigError, match="given twice"):
        run("1", "1")
    with pytest.raises(ConfigError, match="no fragment given"):
        run()
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="is a file"):
        predict(
            PredictConfig(
                checkpoints=(ckpts["a"],),
                fragments=("1",),
                out=tmp_path / "file",
                store=tiny_store,
                **QUIET,
            )
        )


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"tta": "flip"}, "unknown TTA mode 'flip'; did you mean 'flips'"),
        ({"overlap": 0.96}, r"overlap must be in \[0, 0.95\]"),
        ({"overlap": -0.1}, r"overlap must be in \[0, 0.95\]"),
        ({"threshold": 1.5}, r"threshold must be in \[0, 1\]"),
        ({"device": "gpu"}, "unknown device 'gpu'"),
        ({"batch_size": 0}, "batch_size must be an integer >= 1"),
        ({"open_px": -1}, "open_px must be an integer >= 0"),
        ({"cache_mb": 0}, "cache_mb must be > 0"),
    ],
)
def test_config_errors(kw, match, tmp_path):
    with pytest.raises(ConfigError, match=match) as err:
        PredictConfig(checkpoints=(tmp_path / "c.pt",), fragments=("1",), out=tmp_path, **kw)
    assert isinstance(err.value, InkpipeError) and "\n" not in str(err.value)


def test_format_predictions(tmp_path):
    r = FragmentPrediction("1", (96, 80), 0.123, tmp_path, tmp_path, tmp_path, 1.25)
    text = format_predictions([r], tmp_path)
    lines = text.splitlines()
    assert lines[0].split() == ["fragment", "H", "x", "W", "ink", "seconds"]
    assert lines[2].split() == ["1", "96", "x", "80", "12.3%", "1.2"]
    assert f"submission: {tmp_path / 'submission.csv'}" in text


def test_evaluate_scores_the_prediction(store_run, tiny_store):
    from inkpipe.infer.evaluate import EvaluateConfig, evaluate

    results, out = store_run
    labels_dir = tiny_store.parent / "fragments" / "train"
    sub = out / "labelled.csv"
    rows = read_submission(out / "submission.csv")
    sub.write_text("Id,Predicted\n" + "".join(f"{i},{rows[i]}\n" for i in ("1", "2")))
    report = evaluate(EvaluateConfig(sub, labels_dir))
    for score in report.scores:
        pred = read_gray(out / f"{score.id}_mask.png")
        truth = read_gray(labels_dir / score.id / "inklabels.png")
        assert score.fbeta == pytest.approx(fbeta_score(pred, truth))


def test_a_failed_picture_write_fails_the_run_and_leaves_no_submission(
    tiny_store, ckpts, tmp_path, monkeypatch
):
    """The files are written by helper threads; what one of them meets still reaches the caller."""

    def full_disk(path, prob, fragment_id):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(predict_module, "write_probability_tiff", full_disk)
    out = tmp_path / "out"
    cfg = PredictConfig(
        checkpoints=(ckpts["a"],),
        fragments=("1",),
        out=out,
        store=tiny_store,
        save_probabilities=True,
        **QUIET,
    )
    with pytest.raises(OSError, match="disk is full writing the predictions"):
        predict(cfg, log=lambda s: None)
    assert not (out / "submission.csv").exists()
