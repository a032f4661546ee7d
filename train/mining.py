"""Hard-negative mining: score a sample of negative windows, keep the highest-loss ones."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from .config import TrainConfig
from .data import CropDataset, CropTable, WindowSampler
from .losses import coarse_targets, per_sample_loss


def mine_hard_negatives(
    model: nn.Module,
    sampler: WindowSampler,
    dataset: CropDataset,
    cfg: TrainConfig,
    device: torch.device,
    epoch: int,
) -> CropTable:
    """Score a random sample of negative windows and return the highest-loss fraction.

    Returns:
        (m, 3) int64 crops, m = ceil(hard_negatives x sample size).
    """
    assert cfg.model is not None and cfg.batch_size is not None
    rng = np.random.default_rng([cfg.seed, epoch, 11])
    negatives = sampler.negatives
    if len(negatives) == 0:
        return negatives
    sample = negatives[
        rng.choice(len(negatives), min(cfg.hard_negative_sample, len(negatives)), replace=False)
    ]
    losses = []
    model.eval()
    with torch.inference_mode():
        for i in range(0, len(sample), cfg.batch_size):
            keys = [tuple(k) for k in sample[i : i + cfg.batch_size].tolist()]
            items = dataset.batch(keys, augment=False)
            x = torch.stack([it["image"] for it in items]).to(device)
            y = torch.stack([it["label"] for it in items]).to(device)
            v = torch.stack([it["valid"] for it in items]).to(device)
            y, v = coarse_targets(y, v, cfg.model.output_stride)
            losses.append(per_sample_loss(cfg.loss, model(x).float(), y, v).cpu())
    model.train()
    keep = max(1, math.ceil(cfg.hard_negatives * len(sample)))
    order = torch.cat(losses).argsort(descending=True)[:keep].numpy()
    return sample[order]
