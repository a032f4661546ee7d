"""Segmentation losses for ink logits, masked to the papyrus.

All losses take ``logits`` (B, 1, H, W) float of any dtype, ``target`` (B, 1, H, W) float in
{0, 1} and an optional ``valid`` (B, 1, H, W) float in {0, 1}, broadcastable to ``logits``:
pixels with ``valid == 0`` (outside the papyrus mask, padding) do not count at all. They are
computed in float32 with autocast disabled, so fp16/bf16 logits from a mixed-precision
forward give the same, finite values.

- ``bce``: binary cross-entropy from logits against the (optionally smoothed) target
  ``target * (1 - s) + 0.5 * s``; mean over valid pixels.
- ``focal``: sigmoid focal loss (Lin et al., 2017) ``alpha_t * (1 - p_t) ** gamma * bce``
  against the same smoothed target; mean over valid pixels. ``alpha_t`` is ``focal_alpha``
  for ink and ``1 - focal_alpha`` for background, so with ``focal_alpha <= 0.5`` each pixel's
  focal loss is at most its BCE.
- ``dice``: ``1 - (2 * sum(p * t) + 1) / (sum(p) + sum(t) + 1)`` on sigmoid probabilities and
  the unsmoothed target (smooth = 1), sums over valid pixels.
- ``bce+dice`` / ``focal+dice``: ``(1 - dice_weight) * bce_or_focal + dice_weight * dice``.

The scalar loss reduces over the whole batch (pixel mean over all valid pixels; dice from
batch-wide sums, as smp's ``DiceLoss`` does). :func:`per_sample_loss` computes the same loss
on each sample alone, so its mean is close to, but not exactly, the batch value.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

import torch
import torch.nn.functional as F

from inkpipe.pipeline.checks import check_number
from inkpipe.pipeline.errors import check_choice

__all__ = [
    "DICE_SMOOTH",
    "LossFn",
    "LossName",
    "LossSpec",
    "build_loss",
    "coarse_targets",
    "per_sample_loss",
]


class LossName(StrEnum):
    """Which loss to train with (``--loss``; see the module docstring)."""

    BCE = "bce"
    FOCAL = "focal"
    DICE = "dice"
    BCE_DICE = "bce+dice"
    FOCAL_DICE = "focal+dice"


DICE_SMOOTH = 1.0

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]
"""``loss(logits, target, valid) -> scalar``; see :func:`build_loss`."""


@dataclass(frozen=True)
class LossSpec:
    """Which loss to train with, and its parameters.

    Attributes:
        name: a :class:`LossName` (text is turned into one).
        focal_alpha: weight of ink pixels in the focal loss, in [0, 1] (background gets
            ``1 - focal_alpha``).
        focal_gamma: focusing exponent of the focal loss, >= 0 (0 gives alpha-weighted BCE).
        label_smoothing: ``s`` in [0, 1): BCE and focal targets become
            ``target * (1 - s) + 0.5 * s``; dice always uses the hard target.
        dice_weight: ``w`` in [0, 1] for the combinations:
            ``(1 - w) * bce_or_focal + w * dice``.
    """

    name: LossName = LossName.BCE_DICE
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    label_smoothing: float = 0.0
    dice_weight: float = 0.5

    def __post_init__(self) -> None:
        object.__setattr__(self, "name", check_choice("loss", self.name, LossName))
        check_number("focal_alpha", self.focal_alpha, 0.0, 1.0)
        check_number("focal_gamma", self.focal_gamma, 0.0)
        check_number("label_smoothing", self.label_smoothing, 0.0, 1.0, high_open=True)
        check_number("dice_weight", self.dice_weight, 0.0, 1.0)


class _Loss:
    """The callable :func:`build_loss` returns; a plain picklable object."""

    def __init__(self, spec: LossSpec) -> None:
        self.spec = spec

    def __call__(
        self, logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None
    ) -> torch.Tensor:
        return _loss(self.spec, logits, target, valid, per_sample=False)

    def __repr__(self) -> str:
        return f"Loss({self.spec})"


def build_loss(spec: LossSpec) -> LossFn:
    """Return ``loss(logits, target, valid=None) -> scalar`` for ``spec``.

    Args:
        spec: the loss choice and its parameters.

    Returns:
        A callable taking ``logits`` (B, 1, H, W) float (any dtype), ``target`` (B, 1, H, W)
        float in {0, 1} and optional ``valid`` (B, 1, H, W) float in {0, 1}, returning a
        float32 scalar tensor (differentiable w.r.t. ``logits``). A batch with no valid pixel
        gives 0 (BCE/focal) or ``1 - 1/1 = 0`` (dice).
    """
    return _Loss(spec)


def per_sample_loss(
    spec: LossSpec,
    logits: torch.Tensor,
    target: torch.Tensor,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Return the loss of each sample alone, for hard-negative mining.

    Args:
        spec: the loss choice and its parameters.
        logits: (B, 1, H, W) float, any dtype.
        target: (B, 1, H, W) float in {0, 1}.
        valid: optional (B, 1, H, W) float in {0, 1}; 0 excludes a pixel.

    Returns:
        (B,) float32 tensor; a sample with no valid pixel gets 0.
    """
    return _loss(spec, logits, target, valid, per_sample=True)


def _loss(
    spec: LossSpec,
    logits: torch.Tensor,
    target: torch.Tensor,
    valid: torch.Tensor | None,
    per_sample: bool,
) -> torch.Tensor:
    if logits.shape != target.shape:
        raise ValueError(
            f"logits and target must have the same shape, got {tuple(logits.shape)} and "
            f"{tuple(target.shape)}"
        )
    if logits.ndim < 2:
        raise ValueError(f"expected (B, 1, H, W) logits, got shape {tuple(logits.shape)}")
    # Autocast would run some of these ops in half precision; the sums need float32.
    with torch.autocast(device_type=logits.device.type, enabled=False):
        x = logits.float()
        t = target.float()
        v = torch.ones_like(x) if valid is None else torch.broadcast_to(valid.float(), x.shape)
        dims = tuple(range(1, x.ndim)) if per_sample else tuple(range(x.ndim))
        name = spec.name
        w = spec.dice_weight
        if name is LossName.DICE:
            return _dice(x, t, v, dims)
        pixelwise = _bce if name.startswith("bce") else _focal
        pixel_loss = _masked_mean(pixelwise(spec, x, t), v, dims)
        if "+dice" in name:
            return (1.0 - w) * pixel_loss + w * _dice(x, t, v, dims)
        return pixel_loss


def _smooth(spec: LossSpec, t: torch.Tensor) -> torch.Tensor:
    s = spec.label_smoothing
    return t * (1.0 - s) + 0.5 * s if s > 0 else t


def _bce(spec: LossSpec, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(x, _smooth(spec, t), reduction="none")


def _focal(spec: LossSpec, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    t = _smooth(spec, t)
    ce = F.binary_cross_entropy_with_logits(x, t, reduction="none")
    # 1 - p_t written without cancellation: sigmoid(-x) = 1 - sigmoid(x) stays accurate
    # where sigmoid(x) rounds to 1.
    one_minus_pt = t * torch.sigmoid(-x) + (1.0 - t) * torch.sigmoid(x)
    # The floor keeps the gradient of pow finite for gamma < 1 where 1 - p_t underflows to 0.
    one_minus_pt = one_minus_pt.clamp_min(1e-12)
    loss = ce * one_minus_pt.pow(spec.focal_gamma) if spec.focal_gamma else ce
    alpha_t = spec.focal_alpha * t + (1.0 - spec.focal_alpha) * (1.0 - t)
    return alpha_t * loss


def _masked_mean(values: torch.Tensor, v: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    return (values * v).sum(dim=dims) / v.sum(dim=dims).clamp_min(1.0)


def _dice(x: torch.Tensor, t: torch.Tensor, v: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    p = torch.sigmoid(x) * v
    t = t * v
    intersection = (p * t).sum(dim=dims)
    total = p.sum(dim=dims) + t.sum(dim=dims)
    return 1.0 - (2.0 * intersection + DICE_SMOOTH) / (total + DICE_SMOOTH)


def coarse_targets(
    target: torch.Tensor, valid: torch.Tensor, stride: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Area-downsample labels and validity to a model's output stride.

    Args:
        target: (B, 1, H, W) float in {0, 1}, ink.
        valid: (B, 1, H, W) float in {0, 1}, papyrus.
        stride: output stride ``s`` (1 returns the inputs); ``H, W`` divisible by ``s``.

    Returns:
        ``(target, valid)``, each (B, 1, H / s, W / s) float in [0, 1]: the ink fraction of the
        valid pixels of each cell, and the valid fraction of each cell (used as a weight).
    """
    if stride == 1:
        return target, valid
    v = F.avg_pool2d(valid, stride)
    t = F.avg_pool2d(target * valid, stride) / v.clamp_min(1e-6)
    return t, v
