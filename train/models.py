"""Ink segmentation networks: a small attention U-Net and an smp U-Net, behind one factory.

Every model maps a batch of ``k`` contiguous CT layers to one ink logit map:
``(B, k, H, W)`` float -> ``(B, 1, H, W)`` logits (apply a sigmoid for probabilities).
The choice is a :class:`ModelSpec`, a small frozen value saved in checkpoints with
:meth:`ModelSpec.to_dict` and read back with :meth:`ModelSpec.from_dict`.

- ``attention-unet``: the original small network (3.1 M parameters at the default widths):
  three encoder levels, a bottleneck at 1/8 resolution and three decoder levels whose skip
  connections pass through additive attention gates (Oktay et al., 2018).
- ``unet``: ``segmentation_models_pytorch.Unet`` with any smp encoder (``tu-<timm name>``
  included) and scSE attention in the decoder. Its encoder can start from ImageNet weights
  (downloaded by smp from the Hugging Face Hub) or from a local encoder state dict.
"""

from __future__ import annotations

import contextlib
import difflib
import os
import socket
import urllib.error
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from torch import nn

from inkpipe.pipeline.errors import (
    ConfigError,
    InputNotFoundError,
    InvalidInputError,
    OfflineError,
    check_choice,
    closest,
)

__all__ = [
    "MODEL_NAMES",
    "AttentionGate",
    "AttentionUNet",
    "DoubleConv",
    "ModelSpec",
    "build_model",
    "check_encoder_name",
    "count_parameters",
]

MODEL_NAMES = ("attention-unet", "unet")

# Seconds to wait for a TCP connection to the model hub before calling it offline. A refused
# connection or a failed DNS lookup returns at once; only a silently dropping firewall waits.
HUB_PROBE_TIMEOUT_S = 3.0

_TRUE = {"1", "on", "yes", "true"}


@dataclass(frozen=True)
class ModelSpec:
    """Which network to build, with its hyper-parameters.

    Attributes:
        name: ``"attention-unet"`` (the original small network) or ``"unet"`` (smp).
        in_channels: number of CT layers ``k`` in each input crop (>= 1).
        encoder: smp encoder name (``smp.encoders.get_encoder_names()`` or
            ``"tu-<timm model>"``); used by ``unet`` only.
        encoder_weights: ``"none"`` (random init), ``"imagenet"`` (downloaded by smp) or the
            path of a local encoder state dict; ``unet`` only.
        widths: channels of the three encoder levels of ``attention-unet``; the bottleneck has
            twice the last one.
        dropout_encoder: ``Dropout2d`` probability after each encoder pooling
            (``attention-unet`` only).
        dropout_decoder: ``Dropout2d`` probability after each decoder block
            (``attention-unet`` only).
    """

    name: str = "attention-unet"
    in_channels: int = 10
    encoder: str = "efficientnet-b0"
    encoder_weights: str = "none"
    widths: tuple[int, int, int] = (40, 80, 160)
    dropout_encoder: float = 0.1
    dropout_decoder: float = 0.15

    def __post_init__(self) -> None:
        check_choice("model", self.name, MODEL_NAMES)
        if not _is_int(self.in_channels) or self.in_channels < 1:
            raise ConfigError(f"in_channels must be an integer >= 1, got {self.in_channels!r}")
        widths = tuple(self.widths) if isinstance(self.widths, (list, tuple)) else None
        if widths is None or len(widths) != 3 or not all(_is_int(w) and w >= 1 for w in widths):
            raise ConfigError(
                f"widths must be three positive integers like (40, 80, 160), got {self.widths!r}"
            )
        object.__setattr__(self, "widths", widths)
        for field_name in ("dropout_encoder", "dropout_decoder"):
            p = getattr(self, field_name)
            if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0.0 <= p < 1.0:
                raise ConfigError(f"{field_name} must be in [0, 1), got {p!r}")
        if not isinstance(self.encoder_weights, str) or not self.encoder_weights.strip():
            raise ConfigError(
                "encoder_weights must be 'imagenet', 'none' or a path to a local encoder "
                f"state dict, got {self.encoder_weights!r}"
            )
        if not isinstance(self.encoder, str):
            raise ConfigError(
                f"encoder must be a name like 'efficientnet-b0', got {self.encoder!r}"
            )
        if self.name == "unet":
            check_encoder_name(self.encoder)
        elif self.encoder_weights.lower() != "none":
            raise ConfigError(
                f"encoder weights '{self.encoder_weights}' need model 'unet'; attention-unet "
                "has no pretrained encoder: pass --model unet or --encoder-weights none"
            )

    def to_dict(self) -> dict[str, Any]:
        """Return the spec as a plain JSON/YAML-safe dict (``widths`` becomes a list)."""
        d = asdict(self)
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


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


# --------------------------------------------------------------------------------------------
# attention U-Net


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


# --------------------------------------------------------------------------------------------
# smp U-Net


def check_encoder_name(encoder: str) -> str:
    """Return ``encoder`` if smp can build it, else raise :class:`ConfigError` with a hint.

    Valid names are ``smp.encoders.get_encoder_names()`` and ``"tu-<timm model name>"``.
    """
    if encoder.startswith("tu-"):
        import timm

        if timm.is_model(encoder[3:]):
            return encoder
        hint = _closest_names(encoder[3:], timm.list_models())
        hint = [f"tu-{h}" for h in hint]
    else:
        names = smp.encoders.get_encoder_names()
        if encoder in names:
            return encoder
        hint = _closest_names(encoder, names)
    suggestion = f"; did you mean '{hint[0]}'?" if hint else ""
    similar = f" (similar: {', '.join(hint[1:])})" if len(hint) > 1 else ""
    raise ConfigError(
        f"unknown encoder '{encoder}'{suggestion}{similar}; choose a name from "
        "segmentation_models_pytorch.encoders.get_encoder_names() or 'tu-<timm model>'"
    )


def _closest_names(given: str, names: list[str], n: int = 3) -> list[str]:
    """Return up to ``n`` names most similar to ``given``; ties keep registry order.

    ``difflib.get_close_matches`` breaks ties by reverse alphabetical order, which for
    ``efficientnet-b9x`` suggests ``efficientnet-b7``; registry order suggests ``-b0`` first.
    """
    scored = []
    for name in names:
        m = difflib.SequenceMatcher(None, given, name)
        if m.real_quick_ratio() >= 0.5 and m.quick_ratio() >= 0.5 and m.ratio() >= 0.5:
            scored.append((m.ratio(), name))
    scored.sort(key=lambda s: -s[0])  # stable: equal scores stay in registry order
    return [name for _, name in scored[:n]]


def _build_unet(spec: ModelSpec) -> nn.Module:
    weights = spec.encoder_weights
    if weights.lower() == "none":
        return _smp_unet(spec.encoder, spec.in_channels, None)
    if weights.lower() == "imagenet":
        return _unet_from_hub(spec)
    return _unet_from_file(spec, Path(weights).expanduser())


def _smp_unet(encoder: str, in_channels: int, weights: str | bool | None) -> nn.Module:
    return smp.Unet(
        encoder_name=encoder,
        encoder_weights=weights,  # type: ignore[arg-type]  # smp takes True for tu- encoders
        in_channels=in_channels,
        classes=1,
        decoder_attention_type="scse",
    )


def _offline_message(encoder: str) -> str:
    return (
        f"could not download imagenet weights for {encoder} (offline?): pass --encoder-weights "
        "PATH to a local encoder state dict, or --encoder-weights none"
    )


def _unet_from_hub(spec: ModelSpec) -> nn.Module:
    """Build the smp U-Net with ImageNet encoder weights, failing fast when offline.

    smp downloads with ``huggingface_hub``, which offline retries for about 23 s before
    giving up. So first decide whether the hub is usable: ``HF_HUB_OFFLINE`` (read now, not
    just when ``huggingface_hub`` was imported) or a quick TCP probe of the hub endpoint. If
    not, the download runs in the hub's offline mode: weights already in the local cache still
    load, missing ones fail at once and become an :class:`OfflineError`.
    """
    import huggingface_hub.errors as hf_errors

    encoder = spec.encoder
    if not encoder.startswith("tu-"):
        available = list(smp.encoders.encoders[encoder]["pretrained_settings"])
        if "imagenet" not in available:
            raise ConfigError(
                f"encoder '{encoder}' has no imagenet weights in smp (it has: "
                f"{', '.join(available) or 'none'}): pass --encoder-weights PATH or none"
            )
    offline = _hub_offline_requested() or not _hub_reachable()
    network_errors: tuple[type[BaseException], ...] = (
        hf_errors.LocalEntryNotFoundError,
        hf_errors.OfflineModeIsEnabled,
        ConnectionError,
        TimeoutError,
        socket.gaierror,
        urllib.error.URLError,
    )
    with contextlib.suppress(ImportError):
        import httpx2

        network_errors += (httpx2.TransportError,)
    # smp warns unless tu- encoders get a bool: their pretrained tag is part of the name.
    weights: str | bool = True if encoder.startswith("tu-") else "imagenet"
    try:
        with _hub_offline_mode(offline):
            return _smp_unet(encoder, spec.in_channels, weights)
    except network_errors as exc:
        raise OfflineError(_offline_message(encoder)) from exc


def _hub_offline_requested() -> bool:
    """Return whether ``HF_HUB_OFFLINE``/``TRANSFORMERS_OFFLINE`` asks for offline mode."""
    from huggingface_hub import constants

    env = (os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or "").strip()
    return env.lower() in _TRUE or bool(constants.HF_HUB_OFFLINE)


def _hub_reachable(timeout_s: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """Return whether a TCP connection to the Hugging Face Hub endpoint opens in time.

    Behind a proxy a direct connection says nothing, so this answers True and lets the hub
    client decide.
    """
    from huggingface_hub import constants

    proxies = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HTTP_PROXY", "http_proxy")
    if any(os.environ.get(name) for name in proxies):
        return True
    url = urlparse(constants.ENDPOINT)  # what the hub client will use (HF_ENDPOINT at import)
    host = url.hostname or "huggingface.co"
    port = url.port or (80 if url.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def _hub_offline_mode(enabled: bool) -> Iterator[None]:
    """Put ``huggingface_hub`` in offline mode for the duration, if ``enabled``.

    ``huggingface_hub`` reads ``HF_HUB_OFFLINE`` once at import into
    ``constants.HF_HUB_OFFLINE`` and consults that constant on every request, so setting the
    environment variable later has no effect; the constant is what must change.
    """
    if not enabled:
        yield
        return
    from huggingface_hub import constants

    previous = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = previous


def _unet_from_file(spec: ModelSpec, path: Path) -> nn.Module:
    """Build the smp U-Net with its encoder loaded from a local state dict.

    The encoder is built for 3 input channels, loaded, then adapted to ``k`` channels the way
    smp adapts ImageNet weights (``set_in_channels(k, pretrained=True)``: the 3-channel kernel
    is tiled over the ``k`` inputs and scaled by ``3 / k``; for ``k = 1`` summed). A state dict
    whose first conv already takes ``k`` channels is loaded as is.
    """
    if not path.is_file():
        raise InputNotFoundError(
            f"encoder weights file not found: {path}; pass --encoder-weights PATH to a local "
            "encoder state dict, imagenet or none"
        )
    state = _read_encoder_state(path)
    model = _smp_unet(spec.encoder, 3, None)
    encoder = model.get_submodule("encoder")
    k = spec.in_channels
    first = _first_conv_name(encoder)
    first_key = f"{first}.weight" if first is not None else None
    state_in = None
    if first_key is not None and first_key in state and state[first_key].ndim == 4:
        state_in = int(state[first_key].shape[1])
    already_k = k != 3 and state_in == k
    if already_k:
        _set_in_channels(encoder, k, pretrained=False)
    _check_state_fits(encoder, state, path, spec.encoder)
    encoder.load_state_dict(state)
    if not already_k:
        _set_in_channels(encoder, k, pretrained=True)
    return model


def _read_encoder_state(path: Path) -> dict[str, torch.Tensor]:
    """Read a state dict (``torch.save`` or ``.safetensors``) and select the encoder part.

    Accepts a raw state dict or a checkpoint dict holding it under ``"state_dict"`` or
    ``"model"``; strips a ``"module."`` prefix (DataParallel); if keys start with
    ``"encoder."`` (a whole smp model), keeps only those, without the prefix.
    """
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path), device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch/pickle/safetensors raise many unrelated types
        raise InvalidInputError(
            f"cannot read encoder weights {path}: {exc}; expected a state dict saved with "
            "torch.save(model.encoder.state_dict(), PATH) or a .safetensors file"
        ) from None
    for _ in range(2):
        if isinstance(obj, Mapping):
            inner = next((obj[key] for key in ("state_dict", "model") if key in obj), None)
            if isinstance(inner, Mapping):
                obj = inner
    if not isinstance(obj, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise InvalidInputError(
            f"encoder weights {path} hold no state dict (a mapping of names to tensors); save "
            "one with torch.save(model.encoder.state_dict(), PATH)"
        )
    state = {(k[7:] if k.startswith("module.") else k): v for k, v in obj.items()}
    if any(k.startswith("encoder.") for k in state):
        state = {k[8:]: v for k, v in state.items() if k.startswith("encoder.")}
    return state


def _first_conv_name(encoder: nn.Module) -> str | None:
    """Name of the first 3-input-channel conv, the one smp's ``patch_first_conv`` adapts."""
    for name, module in encoder.named_modules():
        if isinstance(module, nn.Conv2d) and module.in_channels == 3:
            return name
    return None


def _set_in_channels(encoder: nn.Module, k: int, pretrained: bool) -> None:
    """Adapt the encoder's first conv from 3 to ``k`` input channels."""
    set_in_channels = getattr(encoder, "set_in_channels", None)
    if callable(set_in_channels):
        set_in_channels(k, pretrained=pretrained)
        return
    # timm universal ("tu-") encoders lack set_in_channels; use the same smp helper.
    if k == 3:
        return
    from segmentation_models_pytorch.encoders._utils import patch_first_conv

    patch_first_conv(encoder, new_in_channels=k, pretrained=pretrained)
    setattr(encoder, "_in_channels", k)  # noqa: B010  # a private attribute of smp's encoders
    out_channels = getattr(encoder, "_out_channels", None)
    if isinstance(out_channels, list) and out_channels and out_channels[0] == 3:
        out_channels[0] = k


def _check_state_fits(
    encoder: nn.Module, state: Mapping[str, torch.Tensor], path: Path, name: str
) -> None:
    """Raise :class:`ConfigError` naming the first mismatching keys if ``state`` won't load."""
    expected = encoder.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape", shapes)):
        if items:
            more = f", +{len(items) - 3} more" if len(items) > 3 else ""
            problems.append(f"{len(items)} {label} ({', '.join(items[:3])}{more})")
    if problems:
        raise ConfigError(
            f"encoder weights {path} do not fit encoder '{name}': {'; '.join(problems)}; "
            "pass the state dict of the same encoder (e.g. model.encoder.state_dict())"
        )


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
        A module mapping ``(B, k, H, W)`` float to ``(B, 1, H, W)`` logits. The smp ``unet``
        needs ``H, W`` divisible by 32 (224 is); ``attention-unet`` takes any ``H, W >= 8``.

    Raises:
        ConfigError: unknown encoder, no imagenet weights for it, or a weights file that
            doesn't fit the encoder.
        InputNotFoundError: the encoder weights file does not exist.
        InvalidInputError: the encoder weights file is not a readable state dict.
        OfflineError: ImageNet weights are needed, not cached, and the hub is unreachable.
    """
    if spec.name == "attention-unet":
        return AttentionUNet(
            in_channels=spec.in_channels,
            widths=spec.widths,
            dropout_encoder=spec.dropout_encoder,
            dropout_decoder=spec.dropout_decoder,
        )
    return _build_unet(spec)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Return the number of parameters of ``model`` (only those with ``requires_grad``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
