"""Ink segmentation networks behind one factory: which network is a small frozen value.

Every model maps a batch of ``k`` contiguous CT layers to one ink logit map at ``1 / s`` of
the input resolution: ``(B, k, H, W)`` float -> ``(B, 1, H / s, W / s)`` logits, where ``s``
is the spec's ``output_stride`` (apply a sigmoid for probabilities; prediction upsamples).
The choice is a :class:`ModelSpec`, saved in checkpoints with :meth:`ModelSpec.to_dict` and
read back with :meth:`ModelSpec.from_dict`.

- ``attention-unet``: the original small 2-D network (:mod:`inkpipe.train.nets`).
- ``unet``: ``segmentation_models_pytorch.Unet`` with any smp encoder and scSE attention in
  the decoder; ImageNet or local encoder weights (:mod:`inkpipe.train.weights`).
- ``stem3d``: the Kaggle 2023 1st-place design, a 3-D stem max-pooled over depth in front of a
  2-D network: the small built-in U-Net (``encoder="small"``) or an smp Unet encoder.
- ``resnet3d``: the Grand Prize design, a torchvision video ResNet encoder whose per-scale
  features are max-pooled over depth into a 2-D decoder (:mod:`inkpipe.train.nets3d`).

For the 2-D networks a coarse output stride averages the full-resolution logits (no compute
saved); the 3-D networks stride early and save most of their compute.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from enum import StrEnum
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from inkpipe.pipeline.checks import check_int, check_number, is_int
from inkpipe.pipeline.errors import ConfigError, OfflineError, check_choice, closest

from .nets import AttentionGate, AttentionUNet, DoubleConv
from .nets3d import OUTPUT_STRIDES, DepthStem, SmallUNet, StemNet, VideoResNetUNet
from .weights import build_smp_unet, check_encoder_name

__all__ = [
    "AttentionGate",
    "AttentionUNet",
    "DoubleConv",
    "ModelName",
    "ModelSpec",
    "OUTPUT_STRIDES",
    "VideoResNet",
    "build_model",
    "check_encoder_name",
    "count_parameters",
]


class ModelName(StrEnum):
    """Which network to build (``--model``; see the module docstring)."""

    ATTENTION_UNET = "attention-unet"
    UNET = "unet"
    STEM3D = "stem3d"
    RESNET3D = "resnet3d"


class VideoResNet(StrEnum):
    """The torchvision video ResNets ``resnet3d`` takes as its encoder."""

    R3D_18 = "r3d_18"
    MC3_18 = "mc3_18"
    R2PLUS1D_18 = "r2plus1d_18"


# The encoder each model uses when none is named.
DEFAULT_ENCODERS = {
    ModelName.ATTENTION_UNET: "efficientnet-b0",  # unused
    ModelName.UNET: "efficientnet-b0",
    ModelName.STEM3D: "small",
    ModelName.RESNET3D: str(VideoResNet.R3D_18),
}
SMALL_2D = "small"
STEM_CHANNELS = (8, 16, 32)


@dataclass(frozen=True)
class ModelSpec:
    """Which network to build, with its hyper-parameters.

    Attributes:
        name: a :class:`ModelName` (text is turned into one; see the module docstring).
        in_channels: number of CT layers ``k`` in each input crop (>= 1).
        encoder: ``unet``: an smp encoder name (``smp.encoders.get_encoder_names()`` or
            ``"tu-<timm model>"``); ``stem3d``: ``"small"`` (built-in 2-D U-Net) or an smp
            encoder; ``resnet3d``: a :class:`VideoResNet` (``r3d_18``, ``mc3_18``,
            ``r2plus1d_18``). Always plain text. None: the model's default
            (:data:`DEFAULT_ENCODERS`).
        encoder_weights: ``"none"`` (random init), ``"imagenet"`` (downloaded by smp) or the
            path of a local encoder state dict, for smp encoders; ``"kinetics"``
            (downloaded by torchvision) for ``resnet3d``.
        output_stride: the logits are at ``1 / output_stride`` of the input resolution.
        widths: channels of the three encoder levels of ``attention-unet``; the bottleneck has
            twice the last one.
        dropout_encoder: ``Dropout2d`` probability after each encoder pooling
            (``attention-unet`` only).
        dropout_decoder: ``Dropout2d`` probability after each decoder block
            (``attention-unet`` only).
    """

    name: ModelName = ModelName.ATTENTION_UNET
    in_channels: int = 10
    encoder: str | None = None
    encoder_weights: str = "none"
    output_stride: int = 1
    widths: tuple[int, int, int] = (40, 80, 160)
    dropout_encoder: float = 0.1
    dropout_decoder: float = 0.15

    def __post_init__(self) -> None:
        object.__setattr__(self, "name", check_choice("model", self.name, ModelName))
        object.__setattr__(self, "in_channels", check_int("in_channels", self.in_channels, 1))
        widths = tuple(self.widths) if isinstance(self.widths, (list, tuple)) else None
        if widths is None or len(widths) != 3 or not all(is_int(w) and w >= 1 for w in widths):
            raise ConfigError(
                f"widths must be three positive integers like (40, 80, 160), got {self.widths!r}"
            )
        object.__setattr__(self, "widths", tuple(int(w) for w in widths))
        for field_name in ("dropout_encoder", "dropout_decoder"):
            check_number(field_name, getattr(self, field_name), 0.0, 1.0, high_open=True)
        if not isinstance(self.encoder_weights, str) or not self.encoder_weights.strip():
            raise ConfigError(
                "encoder_weights must be 'imagenet', 'none' or a path to a local encoder "
                f"state dict, got {self.encoder_weights!r}"
            )
        if self.encoder is None:
            object.__setattr__(self, "encoder", DEFAULT_ENCODERS[self.name])
        if not isinstance(self.encoder, str):
            raise ConfigError(
                f"encoder must be a name like 'efficientnet-b0', got {self.encoder!r}"
            )
        object.__setattr__(self, "encoder", str(self.encoder))  # plain text, also for a member
        if self.output_stride not in OUTPUT_STRIDES:
            raise ConfigError(
                f"output stride must be one of {', '.join(map(str, OUTPUT_STRIDES))}, got "
                f"{self.output_stride!r}"
            )
        weights = self.encoder_weights.lower()
        smp_encoder = self.name == ModelName.UNET or (
            self.name == ModelName.STEM3D and self.encoder != SMALL_2D
        )
        if smp_encoder:
            check_encoder_name(self.encoder)
        elif self.name == ModelName.RESNET3D:
            check_choice("video ResNet encoder", self.encoder, VideoResNet)
            if weights not in ("none", "kinetics"):
                raise ConfigError(
                    f"encoder weights '{self.encoder_weights}' do not fit resnet3d: pass "
                    "--encoder-weights kinetics (downloaded by torchvision) or none"
                )
        elif weights != "none":
            raise ConfigError(
                f"encoder weights '{self.encoder_weights}' need an smp encoder (--model unet, "
                f"or stem3d with --encoder efficientnet-b0); {self.name} with encoder "
                f"'{self.encoder}' has no pretrained encoder: pass --encoder-weights none"
            )

    def to_dict(self) -> dict[str, Any]:
        """Return the spec as a plain JSON/YAML-safe dict (``widths`` becomes a list)."""
        d = asdict(self)
        d["name"] = str(self.name)
        d["widths"] = list(self.widths)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelSpec:
        """Rebuild a spec from :meth:`to_dict` output; missing keys take their defaults.

        Raises:
            ConfigError: ``d`` is not a mapping, has an unknown key, or a bad value.
        """
        if not isinstance(d, Mapping):
            raise ConfigError(f"model spec must be a mapping, got {type(d).__name__}")
        known = [f.name for f in fields(cls)]
        for key in d:
            if key not in known:
                raise ConfigError(
                    f"unknown model spec key '{key}'{closest(str(key), known)} "
                    f"(known: {', '.join(known)})"
                )
        kwargs = dict(d)
        if "widths" in kwargs and isinstance(kwargs["widths"], list):
            kwargs["widths"] = tuple(kwargs["widths"])
        return cls(**kwargs)


# --------------------------------------------------------------------------------------------
# factory


def build_model(spec: ModelSpec) -> nn.Module:
    """Build the network a :class:`ModelSpec` describes.

    To restore a checkpoint, build from its spec with ``encoder_weights="none"``
    (``dataclasses.replace(spec, encoder_weights="none")``) and load the saved state dict:
    that avoids a download and does not need the original weights file.

    Args:
        spec: the model choice and its hyper-parameters.

    Returns:
        A module mapping ``(B, k, H, W)`` float to ``(B, 1, H / s, W / s)`` logits
        (``s = spec.output_stride``). ``H, W`` must be divisible by :func:`tile_multiple`.

    Raises:
        ConfigError: unknown encoder, no imagenet weights for it, or a weights file that
            doesn't fit the encoder.
        InputNotFoundError: the encoder weights file does not exist.
        InvalidInputError: the encoder weights file is not a readable state dict.
        OfflineError: ImageNet weights are needed, not cached, and the hub is unreachable.
    """
    assert spec.encoder is not None  # set by ModelSpec.__post_init__
    s = spec.output_stride
    if spec.name == ModelName.ATTENTION_UNET:
        net: nn.Module = AttentionUNet(
            in_channels=spec.in_channels,
            widths=spec.widths,
            dropout_encoder=spec.dropout_encoder,
            dropout_decoder=spec.dropout_decoder,
        )
        return net if s == 1 else CoarseLogits(net, s)
    if spec.name == ModelName.UNET:
        net = build_smp_unet(spec.encoder, spec.in_channels, spec.encoder_weights)
        return net if s == 1 else CoarseLogits(net, s)
    if spec.name == ModelName.STEM3D:
        stem = DepthStem(STEM_CHANNELS, stride=min(s, 2 ** len(STEM_CHANNELS)))
        net2d = (
            SmallUNet(stem.out_channels)
            if spec.encoder == SMALL_2D
            else build_smp_unet(spec.encoder, stem.out_channels, spec.encoder_weights)
        )
        return StemNet(stem, net2d, s)
    return VideoResNetUNet(spec.encoder, s, weights=_video_weights(spec))


def tile_multiple(spec: ModelSpec) -> int:
    """Return the number a tile side must be divisible by for ``spec``'s network.

    smp encoders downsample 32x (behind a 3-D stem of stride ``t``: ``32 t``); the other
    networks need the output stride to divide the tile, and their own poolings (8 for the
    attention U-Net, 4 for the small U-Net behind the stem, 16 for the video ResNets).
    """
    s = spec.output_stride
    if spec.name == ModelName.UNET:
        return max(32, s)
    if spec.name == ModelName.ATTENTION_UNET:
        return max(8, s)
    if spec.name == ModelName.STEM3D:
        stem_stride = min(s, 2 ** len(STEM_CHANNELS))
        return stem_stride * (32 if spec.encoder != SMALL_2D else 4) * (s // stem_stride)
    return max(16, s)


class CoarseLogits(nn.Module):
    """Average a full-resolution network's logits over ``stride x stride`` cells.

    ``(B, k, H, W) -> (B, 1, H / stride, W / stride)``; the wrapped network is ``.net``.
    """

    def __init__(self, net: nn.Module, stride: int) -> None:
        super().__init__()
        self.net, self.stride = net, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the pooled logits of ``self.net(x)``."""
        return F.avg_pool2d(self.net(x), self.stride)


def _video_weights(spec: ModelSpec) -> object | None:
    """Return torchvision's Kinetics-400 weights for ``spec``, or None; fail fast offline."""
    if spec.encoder_weights.lower() == "none":
        return None
    import urllib.error

    from torchvision.models import get_model_weights

    weights = get_model_weights(spec.encoder).KINETICS400_V1  # type: ignore[attr-defined]
    try:
        weights.get_state_dict(progress=False)  # downloads once into the torch hub cache
    except (urllib.error.URLError, OSError) as exc:
        raise OfflineError(
            f"could not download kinetics weights for {spec.encoder} (offline?): put them in "
            "the torch hub cache ($TORCH_HOME/hub/checkpoints) or pass --encoder-weights none"
        ) from exc
    return weights


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Return the number of parameters of ``model`` (only those with ``requires_grad``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
