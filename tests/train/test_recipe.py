"""The device recipes, 3-D models, coarse outputs, depth shift and the in-epoch time budget."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from inkpipe.cli import cli
from inkpipe.pipeline.errors import ConfigError
from inkpipe.pipeline.layers import LayerRange
from inkpipe.train.augment import build_augment
from inkpipe.train.checkpoint import load_checkpoint
from inkpipe.train.config import TrainConfig
from inkpipe.train.losses import coarse_targets
from inkpipe.train.models import ModelSpec, build_model, tile_multiple
from inkpipe.train.recipe import RECIPES, resolve
from tests.train.test_loop import cfg_for, quiet


@pytest.mark.parametrize("name", ["stem3d", "resnet3d", "attention-unet"])
@pytest.mark.parametrize("stride", [1, 4, 16])
def test_models_predict_at_their_output_stride(name, stride):
    spec = ModelSpec(name=name, in_channels=5, output_stride=stride)
    t = max(tile_multiple(spec), 16)
    model = build_model(spec).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 5, t, t))
    assert out.shape == (2, 1, t // stride, t // stride)


def test_cpu_recipe_fills_only_unset_options():
    cfg = TrainConfig(store=Path("s"), out=Path("o"), layers=LayerRange(26, 36))
    got = resolve(cfg, torch.device("cpu"))
    r = RECIPES["cpu"]
    assert got.model is not None and got.model.name == r.model and got.model.encoder == r.encoder
    assert got.model.output_stride == got.output_stride == r.output_stride
    assert (got.tile_px, got.batch_size, got.epochs) == (r.tile_px, r.batch_size, 40)
    assert got.model.in_channels == 10
    mine = TrainConfig(
        store=Path("s"),
        out=Path("o"),
        model=ModelSpec(name="unet"),
        tile_px=96,
        batch_size=3,
        max_minutes=1,
    )
    got = resolve(mine, torch.device("cpu"))
    assert (got.model.name, got.model.output_stride, got.tile_px, got.batch_size) == (
        "unet",
        1,
        96,
        3,
    )
    assert got.epochs > 1000  # a budget decides


def test_recipe_refuses_a_tile_the_model_cannot_take():
    cfg = TrainConfig(store=Path("s"), out=Path("o"), model=ModelSpec(name="unet"), tile_px=48)
    with pytest.raises(ConfigError, match="multiple of 32; use --tile 64"):
        resolve(cfg, torch.device("cpu"))


def test_auto_model_with_an_encoder_option_is_refused(tmp_path):
    res = CliRunner().invoke(
        cli, ["train", "--store", str(tmp_path / "s.zarr"), "--encoder", "efficientnet-b0"]
    )
    assert res.exit_code == 1 and "add --model" in res.output and "Traceback" not in res.output


def test_coarse_targets_are_area_fractions_of_the_valid_pixels():
    t = torch.zeros(1, 1, 4, 4)
    v = torch.ones(1, 1, 4, 4)
    t[..., :2, :2] = 1
    v[..., 2:, 2:] = 0
    t[..., 0, 2] = 1  # one ink pixel of four in the top-right cell
    tc, vc = coarse_targets(t, v, 2)
    np.testing.assert_allclose(tc[0, 0].numpy(), [[1, 0.25], [0, 0]])
    np.testing.assert_allclose(vc[0, 0].numpy(), [[1, 1], [1, 0]])
    assert coarse_targets(t, v, 1) == (t, v)


def test_depth_shift_keeps_k_consecutive_layers():
    image = np.arange(9, dtype=np.float32)[:, None, None] * np.ones((9, 8, 8), np.float32)
    aug = build_augment("none", 8, seed=0)
    starts = set()
    for _ in range(40):
        out, _ = aug(image, np.zeros((8, 8), np.uint8), depth=5)
        assert out.shape == (5, 8, 8)
        first = int(out[0, 0, 0])
        np.testing.assert_array_equal(out[:, 0, 0], np.arange(first, first + 5))
        starts.add(first)
    assert starts == {0, 1, 2, 3, 4}


def test_time_budget_stops_inside_an_epoch_then_saves(tiny_store, tmp_path):
    out = tmp_path / "budget"
    cfg = cfg_for(tiny_store, out, epochs=None, steps_per_epoch=500, max_minutes=1e-4)
    (res,) = train_run(cfg)
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert res.epochs_run == 1 and len(rows) == 1 and int(rows[0]["steps"]) < 500
    last = load_checkpoint(out / "last.pt")
    assert "train_state_dict" in last.extra  # EMA: the raw weights kept for --resume
    assert last.extra["ema_updates"] == int(rows[0]["steps"])


def train_run(cfg):
    from inkpipe.train.loop import train

    return train(cfg, log=quiet)
