"""Defaults that learn on the machine at hand: the CPU plan and the GPU (winners') recipe.

Options left unset (``None``) in a :class:`TrainConfig` are chosen here from the device, and
the resolved configuration is what the run saves:

- **CPU**: the Kaggle 1st-place design shrunk to two cores: ``stem3d`` (a 3-D stem, 1 -> 8
  -> 16 -> 32 channels with two in-plane stride-2 convolutions, max over depth) in front of a
  small two-level 2-D U-Net, output at 1/4 resolution, 64 px tiles, batches of 32. A step
  takes well under a second, so tens of minutes are thousands of steps.
- **CUDA**: the same 3-D stem in front of an smp ``Unet`` (efficientnet-b0 encoder, scSE
  decoder attention), output at 1/4 resolution, 256 px tiles, batches of 16.

Without ``--epochs``, a run trains 40 epochs, or until ``--max-minutes`` are spent when a
budget is given. Given options are kept; only their combination is checked (the tile must suit
the model).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from inkpipe.pipeline.errors import ConfigError

from .config import TrainConfig
from .models import ModelName, ModelSpec, tile_multiple


@dataclass(frozen=True)
class Recipe:
    """What the recipe of one device type chooses for unset options."""

    model: ModelName
    encoder: str
    output_stride: int
    tile_px: int
    batch_size: int


EPOCHS = 40  # without a time budget (README "Held-out check": 20 were too few)
EPOCHS_WITHIN_BUDGET = 100_000  # with --max-minutes: train until the budget is spent

RECIPES = {
    "cpu": Recipe(ModelName.STEM3D, "small", 4, 64, 32),
    "cuda": Recipe(ModelName.STEM3D, "efficientnet-b0", 4, 256, 16),
}


def resolve(cfg: TrainConfig, device: torch.device) -> TrainConfig:
    """Return ``cfg`` with every unset option chosen for ``device`` (see the module doc).

    Raises:
        ConfigError: the tile does not suit the model (its side must be a multiple of
            :func:`inkpipe.train.models.tile_multiple`).
    """
    recipe = RECIPES["cuda" if device.type == "cuda" else "cpu"]
    model = cfg.model
    if model is None:
        model = ModelSpec(
            name=recipe.model,
            in_channels=cfg.layers.k,
            encoder=recipe.encoder,
            output_stride=cfg.output_stride or recipe.output_stride,
        )
    tile = cfg.tile_px if cfg.tile_px is not None else recipe.tile_px
    multiple = tile_multiple(model)
    if tile % multiple:
        fix = -(-tile // multiple) * multiple
        raise ConfigError(
            f"--tile {tile} does not suit model {model.name} (encoder {model.encoder}, output "
            f"stride {model.output_stride}): its side must be a multiple of {multiple}; "
            f"use --tile {fix}"
        )
    batch = cfg.batch_size if cfg.batch_size is not None else recipe.batch_size
    epochs = cfg.epochs
    if epochs is None:
        epochs = EPOCHS if cfg.max_minutes is None else EPOCHS_WITHIN_BUDGET
    return replace(
        cfg, model=model, output_stride=None, tile_px=tile, batch_size=batch, epochs=epochs
    )


def describe(cfg: TrainConfig, device: torch.device) -> str:
    """One line naming the resolved model, tile, output stride and batch for the log."""
    m = cfg.model
    assert m is not None
    return (
        f"{device.type} plan: model {m.name} (encoder {m.encoder}), tile {cfg.tile_px} px, "
        f"output stride {m.output_stride}, batch {cfg.batch_size}, layers {cfg.layers}"
        f"{f' ± {cfg.depth_shift}' if cfg.depth_shift else ''}, loss {cfg.loss.name}, "
        f"EMA {cfg.ema_decay or 'off'}"
    )
