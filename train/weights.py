"""The smp U-Net and where its encoder weights come from: random, ImageNet (hub) or a file.

smp downloads ImageNet weights from the Hugging Face Hub. Offline, the hub client retries for
about 23 s; :func:`build_smp_unet` decides first whether the hub is usable and fails at once
with an :class:`OfflineError` naming the fix. A local encoder state dict is adapted to ``k``
input channels the way smp adapts ImageNet weights.
"""

from __future__ import annotations

import contextlib
import difflib
import os
import socket
import urllib.error
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import segmentation_models_pytorch as smp
import torch
from torch import nn

from inkpipe.pipeline.errors import (
    ConfigError,
    InputNotFoundError,
    InvalidInputError,
    OfflineError,
)

__all__ = ["HUB_PROBE_TIMEOUT_S", "build_smp_unet", "check_encoder_name"]

# Seconds to wait for a TCP connection to the model hub before calling it offline. A refused
# connection or a failed DNS lookup returns at once; only a silently dropping firewall waits.
HUB_PROBE_TIMEOUT_S = 3.0

_TRUE = {"1", "on", "yes", "true"}


def build_smp_unet(encoder: str, in_channels: int, weights: str) -> nn.Module:
    """Build ``smp.Unet(encoder, classes=1, decoder_attention_type="scse")`` for ``in_channels``.

    Args:
        encoder: an smp encoder name or ``"tu-<timm model>"``.
        in_channels: input channels (k CT layers, or the features of a 3D stem).
        weights: ``"none"``, ``"imagenet"`` (downloaded by smp) or a local state dict path.

    Raises:
        ConfigError, InputNotFoundError, InvalidInputError, OfflineError: see
            :func:`inkpipe.train.models.build_model`.
    """
    if weights.lower() == "none":
        return _smp_unet(encoder, in_channels, None)
    if weights.lower() == "imagenet":
        return _unet_from_hub(encoder, in_channels)
    return _unet_from_file(encoder, in_channels, Path(weights).expanduser())


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


def _unet_from_hub(encoder: str, in_channels: int) -> nn.Module:
    """Build the smp U-Net with ImageNet encoder weights, failing fast when offline.

    smp downloads with ``huggingface_hub``, which offline retries for about 23 s before
    giving up. So first decide whether the hub is usable: ``HF_HUB_OFFLINE`` (read now, not
    just when ``huggingface_hub`` was imported) or a quick TCP probe of the hub endpoint. If
    not, the download runs in the hub's offline mode: weights already in the local cache still
    load, missing ones fail at once and become an :class:`OfflineError`.
    """
    import huggingface_hub.errors as hf_errors

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
            return _smp_unet(encoder, in_channels, weights)
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


def _unet_from_file(encoder_name: str, in_channels: int, path: Path) -> nn.Module:
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
    model = _smp_unet(encoder_name, 3, None)
    encoder = model.get_submodule("encoder")
    k = in_channels
    first = _first_conv_name(encoder)
    first_key = f"{first}.weight" if first is not None else None
    state_in = None
    if first_key is not None and first_key in state and state[first_key].ndim == 4:
        state_in = int(state[first_key].shape[1])
    already_k = k != 3 and state_in == k
    if already_k:
        _set_in_channels(encoder, k, pretrained=False)
    _check_state_fits(encoder, state, path, encoder_name)
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
