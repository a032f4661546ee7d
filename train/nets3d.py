"""3D→2D ink networks: 3D convolutions over the layer stack, max-pooled over depth.

Both winning designs of the Vesuvius ink-detection challenges read the layers as a volume and
pool over depth, which makes a model indifferent to where in the stack the ink lies:

- :class:`StemNet` (Kaggle 2023 1st place, ainatersol/Vesuvius-InkDetection): a few ``Conv3d``
  layers (1 -> 8 -> 16 -> 32 channels) with in-plane strides, a max over depth, then a 2-D
  encoder-decoder (a small built-in U-Net, or any smp ``Unet`` encoder).
- :class:`VideoResNetUNet` (Grand Prize, younader/Vesuvius-Grandprize-Winner): a 3-D CNN
  encoder (torchvision's video ResNets ``r3d_18``, ``mc3_18``, ``r2plus1d_18``) whose features
  at every scale are max-pooled over depth and decoded by a small 2-D U-Net decoder.

Every network maps ``(B, k, H, W)`` float to ``(B, 1, H / s, W / s)`` logits, where ``s`` is
its ``output_stride`` (1, 2, 4, 8 or 16): labels are blobby at pixel scale, so a coarse map
costs little F0.5 and the strides in front save most of the compute.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .nets import DoubleConv

__all__ = [
    "OUTPUT_STRIDES",
    "VIDEO_RESNETS",
    "DepthStem",
    "SmallUNet",
    "StemNet",
    "VideoResNetUNet",
]

OUTPUT_STRIDES = (1, 2, 4, 8, 16)
VIDEO_RESNETS = ("r3d_18", "mc3_18", "r2plus1d_18")


def _log2(stride: int) -> int:
    if stride not in OUTPUT_STRIDES:
        raise ValueError(f"output stride must be one of {OUTPUT_STRIDES}, got {stride}")
    return stride.bit_length() - 1


class DepthStem(nn.Module):
    """``Conv3d -> BatchNorm3d -> ReLU`` layers over the layer stack, then a max over depth.

    ``(B, k, H, W)`` float -> ``(B, channels[-1], H / stride, W / stride)``: the input is one
    3-D channel of depth ``k``; the first ``log2(stride)`` convolutions (at most 3) have
    in-plane stride 2, depth is never strided, and the max over depth comes last.
    """

    def __init__(self, channels: tuple[int, ...] = (8, 16, 32), stride: int = 4) -> None:
        super().__init__()
        halvings = _log2(stride)
        if halvings > len(channels):
            raise ValueError(
                f"a stem of {len(channels)} convolutions can stride at most "
                f"{2 ** len(channels)}, got {stride}"
            )
        layers: list[nn.Module] = []
        c_in = 1
        for i, c in enumerate(channels):
            s = 2 if i < halvings else 1
            layers += [
                nn.Conv3d(c_in, c, 3, stride=(1, s, s), padding=1, bias=False),
                nn.BatchNorm3d(c),
                nn.ReLU(inplace=True),
            ]
            c_in = c
        self.body = nn.Sequential(*layers)
        self.out_channels = c_in
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(B, k, H, W)`` to ``(B, C, H / stride, W / stride)`` (max over depth)."""
        return self.body(x.unsqueeze(1)).amax(dim=2)


class SmallUNet(nn.Module):
    """A small 2-D U-Net: ``levels`` poolings, ``DoubleConv`` blocks, skips, a 1x1 head.

    ``(B, c_in, h, w)`` -> ``(B, 1, h, w)`` logits; any ``h, w >= 2 ** levels``.
    """

    def __init__(self, in_channels: int, width: int = 32, levels: int = 2) -> None:
        super().__init__()
        widths = [width * 2**i for i in range(levels + 1)]
        self.down = nn.ModuleList(
            [DoubleConv(in_channels, widths[0])]
            + [DoubleConv(widths[i], widths[i + 1]) for i in range(levels)]
        )
        self.up = nn.ModuleList(
            [DoubleConv(widths[i + 1] + widths[i], widths[i]) for i in reversed(range(levels))]
        )
        self.head = nn.Conv2d(widths[0], 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(B, c_in, h, w)`` features to ``(B, 1, h, w)`` logits."""
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        skips.pop()
        for block in self.up:
            skip = skips.pop()
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([x, skip], dim=1))
        return self.head(x)


class StemNet(nn.Module):
    """The Kaggle 1st-place design: :class:`DepthStem`, then a 2-D segmentation network.

    Args:
        stem: the 3-D stem; its stride is the network's output stride up to 8.
        net2d: ``(B, stem.out_channels, h, w) -> (B, 1, h, w)`` logits.
        output_stride: 1, 2, 4, 8 or 16; beyond the stem's stride the features are max-pooled.
    """

    def __init__(self, stem: DepthStem, net2d: nn.Module, output_stride: int) -> None:
        super().__init__()
        if output_stride % stem.stride:
            raise ValueError(
                f"output stride {output_stride} is not a multiple of the stem's {stem.stride}"
            )
        self.stem, self.net2d = stem, net2d
        self.pool = output_stride // stem.stride
        self.output_stride = output_stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(B, k, H, W)`` to ``(B, 1, H / s, W / s)`` logits."""
        f = self.stem(x)
        if self.pool > 1:
            f = F.max_pool2d(f, self.pool)
        return self.net2d(f)


class VideoResNetUNet(nn.Module):
    """The Grand Prize design: a torchvision video ResNet, depth-pooled skips, a 2-D decoder.

    The ResNet's stem takes one channel (its RGB kernel summed, for loaded weights); depth is
    strided by the ResNet itself (by 8 at the deepest of its four stages). The features of each
    stage (in-plane strides 2, 4, 8, 16) are max-pooled over depth; the decoder upsamples from
    the deepest with ``DoubleConv`` blocks on concatenated skips up to the output stride (a
    final bilinear upsampling for stride 1).

    Args:
        arch: ``"r3d_18"``, ``"mc3_18"`` or ``"r2plus1d_18"``.
        output_stride: 1, 2, 4, 8 or 16.
        decoder_width: channels of the finest decoder block (doubling towards coarse).
        weights: a torchvision weights enum value for the video ResNet, or None.
    """

    def __init__(
        self,
        arch: str = "r3d_18",
        output_stride: int = 4,
        decoder_width: int = 32,
        weights: object | None = None,
    ) -> None:
        super().__init__()
        from torchvision.models import video

        if arch not in VIDEO_RESNETS:
            raise ValueError(f"video ResNet must be one of {VIDEO_RESNETS}, got {arch}")
        net = getattr(video, arch)(weights=weights)
        conv = net.stem[0]
        one = nn.Conv3d(
            1, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, bias=False
        )
        with torch.no_grad():
            one.weight.copy_(conv.weight.sum(dim=1, keepdim=True))
        net.stem[0] = one
        self.stem, self.stages = (
            net.stem,
            nn.ModuleList([net.layer1, net.layer2, net.layer3, net.layer4]),
        )
        self.output_stride = output_stride
        stage_channels = [64, 128, 256, 512]
        # stage i has in-plane stride 2 ** (i + 1); decode down to stride max(s, 2)
        self.finest = max(_log2(output_stride), 1) - 1
        self.decoder = nn.ModuleList()
        c = stage_channels[-1]
        for i in reversed(range(self.finest, 3)):
            w = decoder_width * 2 ** (i - self.finest)
            self.decoder.append(DoubleConv(c + stage_channels[i], w))
            c = w
        self.head = nn.Conv2d(c, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(B, k, H, W)`` to ``(B, 1, H / s, W / s)`` logits."""
        h, w = x.shape[-2:]
        f = self.stem(x.unsqueeze(1))
        feats = []
        for stage in self.stages:
            f = stage(f)
            feats.append(f.amax(dim=2))
        y = feats[-1]
        for block, skip in zip(self.decoder, reversed(feats[self.finest : 3])):
            y = F.interpolate(y, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            y = block(torch.cat([y, skip], dim=1))
        y = self.head(y)
        size = (h // self.output_stride, w // self.output_stride)
        if y.shape[-2:] != size:
            y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
        return y
