import csv
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from inkpipe.pipeline.errors import ConfigError, TrainingError
from inkpipe.pipeline.ingest import IngestConfig, ingest
from inkpipe.pipeline.layers import LayerRange
from inkpipe.pipeline.windows import X0, Y0
from inkpipe.train import loop as loop_mod
from inkpipe.train.checkpoint import load_checkpoint, model_from_checkpoint
from inkpipe.train.config import TrainConfig, parse_validation
from inkpipe.train.loop import train
from inkpipe.train.models import ModelSpec
from inkpipe.train.split import exclude_near, pick_held_out, plan_run
from tests.conftest import TINY, write_fragment


def cfg_for(store, out, **kw):
    base = dict(
        store=store,
        out=out,
        layers=LayerRange(2, 6),
        epochs=2,
        steps_per_epoch=2,
        batch_size=4,
        tile_px=32,
        warmup_steps=1,
        val=parse_validation("patches:4"),
        progress=False,
        aug="light",
        jitter_px=4,
    )
    base.update(kw)
    return TrainConfig(**base)


def quiet(_):
    pass


def test_train_writes_a_complete_run(tiny_store, tmp_path):
    out = tmp_path / "run"
    (result,) = train(cfg_for(tiny_store, out), log=quiet)
    for name in ("best.pt", "last.pt", "metrics.csv", "metrics.png", "config.yaml"):
        assert (out / name).is_file()
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert all(0 <= float(r["val_f05"]) <= 1 for r in rows)
    best = load_checkpoint(out / "best.pt")
    assert best.layers == LayerRange(2, 6) and best.tile_px == 32
    assert best.threshold == result.threshold
    assert best.config["layers"] == "2:6" and best.model.in_channels == 4
    assert "val_f05" in best.metrics and best.version
    assert best.model.name == "stem3d" and best.model.output_stride == 4  # the CPU recipe
    model = model_from_checkpoint(best)
    assert model(torch.zeros(1, 4, 32, 32)).shape == (1, 1, 8, 8)


def test_training_is_reproducible_on_cpu(tiny_store, tmp_path):
    a = train(cfg_for(tiny_store, tmp_path / "a", epochs=1), log=quiet)[0]
    b = train(cfg_for(tiny_store, tmp_path / "b", epochs=1), log=quiet)[0]
    sa = load_checkpoint(a.last_path).state_dict
    sb = load_checkpoint(b.last_path).state_dict
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    c = train(cfg_for(tiny_store, tmp_path / "c", epochs=1, seed=5), log=quiet)[0]
    sc = load_checkpoint(c.last_path).state_dict
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_resume_continues_and_refuses_to_clobber(tiny_store, tmp_path):
    out = tmp_path / "run"
    train(cfg_for(tiny_store, out, epochs=1), log=quiet)
    with pytest.raises(ConfigError, match="--resume"):
        train(cfg_for(tiny_store, out, epochs=2), log=quiet)
    (res,) = train(cfg_for(tiny_store, out, epochs=2, resume=True), log=quiet)
    assert res.epochs_run == 2
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    with pytest.raises(ConfigError, match="layers"):
        train(cfg_for(tiny_store, out, epochs=3, resume=True, layers=LayerRange(0, 4)), log=quiet)


def test_fragment_validation_and_loo_folds(tiny_store, tmp_path):
    (res,) = train(
        cfg_for(tiny_store, tmp_path / "f", epochs=1, val=parse_validation("fragment:2")), log=quiet
    )
    assert load_checkpoint(res.best_path).config["val"] == "fragment:2"
    results = train(cfg_for(tiny_store, tmp_path / "loo", epochs=1, folds="loo"), log=quiet)
    assert [r.out.name for r in results] == ["fold_1", "fold_2"]
    assert all((r.out / "best.pt").is_file() for r in results)


def test_held_out_patches_do_not_overlap_and_are_excluded(tiny_store):
    plan = plan_run(cfg_for(tiny_store, Path("unused"), val=parse_validation("patches:3")))
    held = plan.val_windows
    assert 1 <= len(held) <= 3
    for i in range(len(held)):
        for j in range(i + 1, len(held)):
            a, b = held[i], held[j]
            assert a[0] != b[0] or abs(a[1] - b[1]) >= 32 or abs(a[2] - b[2]) >= 32
    for s in plan.train_sets:
        for _, y, x in held[held[:, 0] == s.fragment]:
            near = (np.abs(s.windows[:, Y0] - y) < 36) & (np.abs(s.windows[:, X0] - x) < 36)
            assert not near.any()


def test_pick_and_exclude_helpers():
    from inkpipe.train.data import WindowSet

    win = np.array([[0, 0, 1, 5], [0, 10, 1, 0], [50, 50, 1, 0], [100, 100, 1, 3]], np.int32)
    sets = [WindowSet(0, (200, 200), win)]
    held = pick_held_out(sets, 2, 32, np.random.default_rng(0))
    assert len(held) == 1  # a second one would leave fewer than half the windows to train
    grid = np.array(
        [[y, x, 1, (y + x) % 200] for y in range(0, 400, 100) for x in range(0, 400, 100)], np.int32
    )
    held = pick_held_out([WindowSet(0, (500, 500), grid)], 3, 32, np.random.default_rng(0))
    assert len(held) == 3
    kept = exclude_near(sets, np.array([[0, 0, 0]]), 40)[0].windows
    assert [tuple(r[:2]) for r in kept] == [(50, 50), (100, 100)]


def test_nan_loss_stops_with_a_clear_message(tiny_store, tmp_path, monkeypatch):
    real = loop_mod.build_loss

    def nan_loss(spec):
        fn = real(spec)
        return lambda logits, y, v: fn(logits, y, v) * float("nan")

    monkeypatch.setattr(loop_mod, "build_loss", nan_loss)
    with pytest.raises(TrainingError, match="loss became nan at epoch 1, step 1.*--lr"):
        train(cfg_for(tiny_store, tmp_path / "nan"), log=quiet)


def test_config_errors(tiny_store, tmp_path):
    with pytest.raises(ConfigError, match="has 12 layers"):
        train(cfg_for(tiny_store, tmp_path / "x", layers=LayerRange(10, 20)), log=quiet)
    with pytest.raises(ConfigError, match="no ink labels"):
        train(cfg_for(tiny_store, tmp_path / "x", fragments=("a",)), log=quiet)
    with pytest.raises(ConfigError, match="validation fragment 'a'"):
        train(cfg_for(tiny_store, tmp_path / "x", val=parse_validation("fragment:a")), log=quiet)
    with pytest.raises(ConfigError, match="patches:N"):
        parse_validation("patches:zero")


def test_store_without_ink_is_an_error(tmp_path):
    write_fragment(tmp_path / "f" / "train" / "9", seed=9)
    (tmp_path / "f" / "train" / "9" / "inklabels.png").unlink()
    from PIL import Image

    Image.fromarray(np.zeros((96, 80), np.uint8)).save(
        tmp_path / "f" / "train" / "9" / "inklabels.png"
    )
    store = tmp_path / "s.zarr"
    ingest(IngestConfig(root=tmp_path / "f", out=store, settings=TINY, progress=False), log=quiet)
    with pytest.raises(TrainingError, match="no training window .* contains ink"):
        train(cfg_for(store, tmp_path / "run"), log=quiet)


def test_both_models_and_losses_train(tiny_store, tmp_path):
    cfg = cfg_for(
        tiny_store,
        tmp_path / "u",
        epochs=1,
        steps_per_epoch=1,
        model=ModelSpec(name="unet", in_channels=4),
        aug="full",
        hard_negatives=0.5,
        hard_negative_sample=4,
    )
    cfg = replace(cfg, loss=replace(cfg.loss, name="focal+dice"))
    # the smp Unet needs multiples of 32: the tiny store's tile is 32
    (res,) = train(cfg, log=quiet)
    assert load_checkpoint(res.best_path).model.name == "unet"
