"""TrainConfig: choices become StrEnum members, saved as plain text; checks name the option."""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from inkpipe.pipeline.errors import ConfigError
from inkpipe.pipeline.layers import LayerRange
from inkpipe.train.augment import AugLevel
from inkpipe.train.checkpoint import checkpoint_payload, load_checkpoint, save_checkpoint
from inkpipe.train.config import TrainConfig, Validation, ValidationKind, parse_validation
from inkpipe.train.losses import LossName, LossSpec
from inkpipe.train.models import ModelName, ModelSpec, build_model

# as an inkpipe from before the StrEnums wrote it into config.yaml: plain text everywhere
OLD_CONFIG_YAML = """\
store: s.zarr
out: runs/a
layers: '2:6'
fragments: ['1', '2']
model: {name: attention-unet, in_channels: 4, encoder: efficientnet-b0, encoder_weights: none,
  output_stride: 2, widths: [4, 8, 16], dropout_encoder: 0.1, dropout_decoder: 0.15}
tile_px: 32
output_stride: 2
loss: {name: focal+dice, focal_alpha: 0.25, focal_gamma: 1.5, label_smoothing: 0.0,
  dice_weight: 0.3}
aug: light
depth_shift: 2
ema_decay: 0.99
epochs: 3
steps_per_epoch: 100
batch_size: 4
lr: 0.0003
weight_decay: 3.0e-05
warmup_steps: 100
restart_epochs: 10
grad_clip: 1.0
pos_fraction: 0.5
jitter_px: 32
hard_negatives: 0.0
hard_negative_sample: 256
val: patches:8
val_stride_px: null
folds: null
seed: 0
device: auto
workers: 0
cache_mb: 1024
resume: false
trust_checkpoint: false
max_minutes: 2.5
tensorboard: false
progress: false
"""


def _enums(value: Any, where: str = "config") -> list[str]:
    """Return the key paths of every enum member (or other str subclass) inside ``value``."""
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in _enums(v, f"{where}.{k}")]
    if isinstance(value, list | tuple):
        return [p for i, v in enumerate(value) for p in _enums(v, f"{where}[{i}]")]
    odd = isinstance(value, enum.Enum) or (isinstance(value, str) and type(value) is not str)
    return [where] if odd else []


def test_text_becomes_members() -> None:
    cfg = TrainConfig.from_dict(yaml.safe_load(OLD_CONFIG_YAML))
    assert cfg.aug is AugLevel.LIGHT and cfg.val.kind is ValidationKind.PATCHES
    assert cfg.loss.name is LossName.FOCAL_DICE
    assert cfg.model is not None and cfg.model.name is ModelName.ATTENTION_UNET
    # members compare equal to their text, so older code reading them keeps working
    assert cfg.aug == "light" and cfg.model.name == "attention-unet"


def test_an_old_config_yaml_loads_and_saves_back_the_same() -> None:
    old = yaml.safe_load(OLD_CONFIG_YAML)
    cfg = TrainConfig.from_dict(old)
    saved = cfg.to_dict()
    assert _enums(saved) == []
    assert saved == {**old, "normalize": "layer"}  # what a run before --normalize did
    again = TrainConfig.from_dict(yaml.safe_load(yaml.safe_dump(saved, sort_keys=False)))
    assert again == cfg


def test_members_given_by_code_are_saved_as_text() -> None:
    cfg = TrainConfig(
        store=Path("s.zarr"),
        out=Path("o"),
        model=ModelSpec(name=ModelName.STEM3D),
        loss=LossSpec(name=LossName.DICE),
        aug=AugLevel.NONE,
        val=Validation(ValidationKind.FRAGMENT, 0, "2"),
    )
    saved = cfg.to_dict()
    assert _enums(saved) == []
    assert (saved["aug"], saved["loss"]["name"], saved["model"]["name"], saved["val"]) == (
        "none",
        "dice",
        "stem3d",
        "fragment:2",
    )
    assert TrainConfig.from_dict(yaml.safe_load(yaml.safe_dump(saved))) == cfg


def test_a_checkpoint_with_the_config_loads_with_weights_only(tmp_path: Path) -> None:
    cfg = TrainConfig.from_dict(yaml.safe_load(OLD_CONFIG_YAML))
    assert cfg.model is not None
    payload = checkpoint_payload(
        build_model(cfg.model),
        cfg.model,
        LayerRange(2, 6),
        tile_px=32,
        threshold=0.5,
        metrics={},
        config=cfg.to_dict(),
        choices={"aug": cfg.aug, "loss": cfg.loss.name},  # raw members, made plain on saving
    )
    path = save_checkpoint(tmp_path / "best.pt", payload)
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert _enums({k: v for k, v in raw.items() if k != "state_dict"}) == []
    assert raw["choices"] == {"aug": "light", "loss": "focal+dice"}
    ck = load_checkpoint(path)
    assert ck.model.name is ModelName.ATTENTION_UNET and ck.model == cfg.model
    assert TrainConfig.from_dict(ck.config) == cfg


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"aug": "ful"}, "unknown augmentation 'ful'; did you mean 'full'?"),
        ({"normalize": "fragmnt"}, "unknown --normalize 'fragmnt'; did you mean 'fragment'?"),
        ({"epochs": 0}, "--epochs must be an integer >= 1, got 0"),
        ({"tile_px": 0}, "--tile must be an integer >= 1, got 0"),
        ({"batch_size": 2.5}, "--batch-size must be an integer >= 1, got 2.5"),
        ({"workers": -1}, "--workers must be an integer >= 0, got -1"),
        ({"depth_shift": -1}, "--depth-shift must be an integer >= 0, got -1"),
        ({"lr": 0}, "--lr must be > 0, got 0"),
        ({"hard_negatives": 1.0}, "--hard-negatives must be in [0, 1), got 1.0"),
        ({"ema_decay": -0.1}, "--ema-decay must be in [0, 1), got -0.1"),
    ],
)
def test_bad_values_name_the_option(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        TrainConfig(store=Path("s.zarr"), out=Path("o"), **kwargs)
    assert str(err.value).startswith(message)


def test_validation_kind_is_checked() -> None:
    assert parse_validation("none") == Validation("none", 0)
    with pytest.raises(ConfigError, match=r"unknown validation kind 'region'; did you mean"):
        Validation("region")
