"""Two-dimensional ink networks: the small attention U-Net of the original design.

``(B, k, H, W)`` float -> ``(B, 1, H, W)`` logits; ``k`` CT layers are the input channels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["AttentionGate", "AttentionUNet", "DoubleConv"]


class DoubleConv(nn.Sequential):
    """Two ``conv3x3 -> BatchNorm -> ReLU`` layers: ``(B, c_in, H, W) -> (B, c_out, H, W)``."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )
        self.in_channels = in_channels
        self.out_channels = out_channels


class AttentionGate(nn.Module):
    """Additive attention gate on a skip connection (Oktay et al., 2018).

    The gating signal ``g`` (decoder features) and the skip features ``x`` (encoder features)
    each go through a 1x1 conv to ``inter_channels``; their sum passes a ReLU, a 1x1 conv to
    one channel and a sigmoid, giving a per-pixel multiplier ``alpha`` in (0, 1) that scales
    ``x``. ``alpha`` is computed by :attr:`psi`, so a forward hook on it sees the multiplier.
    """

    def __init__(self, gate_channels: int, skip_channels: int, inter_channels: int) -> None:
        super().__init__()
        self.w_gate = nn.Sequential(
            nn.Conv2d(gate_channels, inter_channels, 1, bias=False),
            nn.BatchNorm2d(inter_channels),
        )
        self.w_skip = nn.Sequential(
            nn.Conv2d(skip_channels, inter_channels, 1, bias=False),
            nn.BatchNorm2d(inter_channels),
        )
        self.relu = nn.ReLU(inplace=True)
        self.psi = nn.Sequential(
            nn.Conv2d(inter_channels, 1, 1),
            nn.BatchNorm2d(1),
            nn.Sigmoid(),
        )

    def forward(self, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Gate ``x`` (B, C_skip, H, W) with ``g`` (B, C_gate, h, w); returns ``x``'s shape."""
        if g.shape[-2:] != x.shape[-2:]:
            g = F.interpolate(g, size=x.shape[-2:], mode="bilinear", align_corners=False)
        alpha = self.psi(self.relu(self.w_gate(g) + self.w_skip(x)))
        return x * alpha


class _DecoderLevel(nn.Module):
    """Upsample to the skip's size, gate the skip, concatenate, ``DoubleConv``, dropout."""

    def __init__(self, in_channels: int, skip_channels: int, dropout: float) -> None:
        super().__init__()
        self.gate = AttentionGate(in_channels, skip_channels, max(1, skip_channels // 2))
        self.conv = DoubleConv(in_channels + skip_channels, skip_channels)
        self.drop = nn.Dropout2d(dropout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        # Upsampling to the skip's exact size (not a fixed x2) is what lets odd sizes through.
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        x = torch.cat([x, self.gate(x, skip)], dim=1)
        return self.drop(self.conv(x))


class AttentionUNet(nn.Module):
    """The original small attention U-Net for ink detection.

    Encoder: three levels of ``DoubleConv`` (``widths``, default 40 -> 80 -> 160 channels),
    each followed by 2x2 max pooling and ``Dropout2d(dropout_encoder)``; a ``DoubleConv``
    bottleneck with ``2 * widths[-1]`` (320) channels at 1/8 resolution. Decoder: three levels
    of bilinear upsampling, an :class:`AttentionGate` on the skip connection, concatenation,
    ``DoubleConv`` and ``Dropout2d(dropout_decoder)``. Head: 1x1 conv to one logit channel.

    Input ``(B, k, H, W)`` float, any ``H, W >= 8`` (multiples of 8 avoid resampling; odd sizes
    are handled by upsampling to each skip's size). Output ``(B, 1, H, W)`` logits.
    """

    def __init__(
        self,
        in_channels: int = 10,
        widths: tuple[int, int, int] = (40, 80, 160),
        dropout_encoder: float = 0.1,
        dropout_decoder: float = 0.15,
    ) -> None:
        super().__init__()
        w1, w2, w3 = widths
        self.enc1 = DoubleConv(in_channels, w1)
        self.enc2 = DoubleConv(w1, w2)
        self.enc3 = DoubleConv(w2, w3)
        self.bottleneck = DoubleConv(w3, 2 * w3)
        self.pool = nn.MaxPool2d(2)
        self.drop = nn.Dropout2d(dropout_encoder)
        self.dec3 = _DecoderLevel(2 * w3, w3, dropout_decoder)
        self.dec2 = _DecoderLevel(w3, w2, dropout_decoder)
        self.dec1 = _DecoderLevel(w2, w1, dropout_decoder)
        self.head = nn.Conv2d(w1, 1, 1)

    @property
    def gates(self) -> tuple[AttentionGate, AttentionGate, AttentionGate]:
        """The attention gates on the skips, deepest first (1/4, 1/2, full resolution)."""
        return (self.dec3.gate, self.dec2.gate, self.dec1.gate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(B, k, H, W)`` float to ``(B, 1, H, W)`` ink logits."""
        if x.shape[-1] < 8 or x.shape[-2] < 8:
            raise ValueError(f"AttentionUNet needs H, W >= 8, got {tuple(x.shape[-2:])}")
        s1 = self.enc1(x)
        s2 = self.enc2(self.drop(self.pool(s1)))
        s3 = self.enc3(self.drop(self.pool(s2)))
        b = self.bottleneck(self.drop(self.pool(s3)))
        y = self.dec3(b, s3)
        y = self.dec2(y, s2)
        y = self.dec1(y, s1)
        return self.head(y)
