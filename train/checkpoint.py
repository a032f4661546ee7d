"""Checkpoints: everything needed to predict without the command line, saved atomically.

A checkpoint is a dict saved with ``torch.save``: the model spec and weights, the layer range,
tile size, normalisation method, the threshold searched on validation, the validation metrics,
the inkpipe version and the full resolved training config; ``last.pt`` also holds the
optimiser, scheduler and scaler states for ``--resume``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray
from torch import nn

from inkpipe.pipeline import __version__
from inkpipe.pipeline.errors import InputNotFoundError, InvalidInputError
from inkpipe.pipeline.files import atomic_target
from inkpipe.pipeline.layers import LayerRange, parse_layers

from .devices import DEVICES as DEVICES  # re-exported: infer uses them from here
from .devices import select_device as select_device
from .models import ModelSpec, build_model

FORMAT = "inkpipe-checkpoint/1"
NORMALIZATION = "per-layer: clip to the fragment's p01..p99, then (x - mean) / std"


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint.

    Attributes:
        path: where it was read from.
        model: the network spec; state_dict: its weights.
        layers: CT layer range the model reads; tile_px: its crop size.
        threshold: probability threshold searched on validation.
        metrics: validation metrics of this checkpoint (f05, precision, recall, …).
        config: the resolved training config (a dict).
        version: inkpipe version that wrote it.
        extra: the rest of the saved dict (optimiser state etc.).
    """

    path: Path
    model: ModelSpec
    state_dict: dict[str, torch.Tensor]
    layers: LayerRange
    tile_px: int
    threshold: float
    metrics: dict[str, Any]
    config: dict[str, Any]
    version: str
    extra: dict[str, Any]


def save_checkpoint(path: Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` (plus format and version) to ``path`` atomically; return ``path``."""
    path = Path(path)
    with atomic_target(path) as tmp:
        torch.save({"format": FORMAT, "version": __version__, **payload}, tmp)
    return path


def checkpoint_payload(
    model: nn.Module,
    spec: ModelSpec,
    layers: LayerRange,
    tile_px: int,
    threshold: float,
    metrics: dict[str, Any],
    config: dict[str, Any],
    **extra: Any,
) -> dict[str, Any]:
    """Assemble the dict :func:`save_checkpoint` writes."""
    module: Any = getattr(model, "module", model)  # unwrap DistributedDataParallel
    return {
        "model": spec.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in module.state_dict().items()},
        "layers": str(layers),
        "tile_px": int(tile_px),
        "threshold": float(threshold),
        "normalization": NORMALIZATION,
        "metrics": metrics,
        "config": config,
        **extra,
    }


def load_checkpoint(path: Path) -> Checkpoint:
    """Read a checkpoint written by ``inkpipe train``.

    Raises:
        InputNotFoundError: no file at ``path``.
        InvalidInputError: not an inkpipe checkpoint, or unreadable.
    """
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(
            f"checkpoint not found: {path}; train one with 'inkpipe train --out RUN' "
            "and pass RUN/best.pt"
        )
    try:
        raw = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise InvalidInputError(
            f"cannot read checkpoint {path}: {exc}; is it a file written by 'inkpipe train'?"
        ) from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise InvalidInputError(
            f"{path} is not an inkpipe checkpoint (format {FORMAT}); pass best.pt or last.pt "
            "from an 'inkpipe train' run folder"
        )
    known = {
        "format",
        "version",
        "model",
        "state_dict",
        "layers",
        "tile_px",
        "threshold",
        "metrics",
        "config",
    }
    return Checkpoint(
        path=path,
        model=ModelSpec.from_dict(raw["model"]),
        state_dict=raw["state_dict"],
        layers=parse_layers(raw["layers"]),
        tile_px=int(raw["tile_px"]),
        threshold=float(raw["threshold"]),
        metrics=dict(raw.get("metrics", {})),
        config=dict(raw.get("config", {})),
        version=str(raw.get("version", "?")),
        extra={k: v for k, v in raw.items() if k not in known},
    )


def model_from_checkpoint(ckpt: Checkpoint) -> nn.Module:
    """Build the network of a checkpoint and load its weights (no download: weights are in it)."""
    spec = replace(ckpt.model, encoder_weights="none")
    model = build_model(spec)
    try:
        model.load_state_dict(ckpt.state_dict)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise InvalidInputError(f"checkpoint {ckpt.path} does not fit its model: {first}") from None
    return model.eval()


def make_predictor(
    model: nn.Module, device: torch.device
) -> Callable[[NDArray[np.float32]], NDArray[np.float32]]:
    """Wrap a model as ``(B, k, t, t) float32 -> (B, t, t) float32`` ink probabilities.

    Runs in eval mode under ``torch.inference_mode``, with float16 autocast on CUDA. Logits
    of a coarse model (output stride > 1) are upsampled bilinearly to ``t x t`` before the
    sigmoid, so blending, TTA and scoring see full-resolution probabilities.
    """
    model = model.to(device).eval()

    def predict(batch: NDArray[np.float32]) -> NDArray[np.float32]:
        x = torch.from_numpy(np.ascontiguousarray(batch)).to(device)
        with (
            torch.inference_mode(),
            torch.autocast(
                device_type=device.type, dtype=torch.float16, enabled=device.type == "cuda"
            ),
        ):
            logits = model(x).float()
            if logits.shape[-2:] != x.shape[-2:]:
                logits = F.interpolate(
                    logits, size=x.shape[-2:], mode="bilinear", align_corners=False
                )
            prob = torch.sigmoid(logits)
        return prob[:, 0].cpu().numpy().astype(np.float32)

    return predict
