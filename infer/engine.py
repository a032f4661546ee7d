"""Run a model on its device for tiled prediction: precision, ``torch.compile``, one copy each way.

A *device predictor* maps a (B, k, t, t) float32 tensor on the model's device to (B, t, t)
float32 ink probabilities on that device (:func:`device_predictor`). TTA
(:func:`~inkpipe.infer.tta.with_tta`) and ensembles (:func:`~inkpipe.infer.tta.ensemble`)
wrap it there, so flips, un-flips and averages never leave the device; :func:`host_predictor`
then adapts the whole stack to the NumPy predictor that
:func:`~inkpipe.numerics.blending.sliding_window_predict` calls: one host -> device copy of the
batch in and one device -> host copy of the probabilities out. On CUDA both copies go through
pinned (page-locked) host memory and are ``non_blocking``.

Precision (``--precision``): ``auto`` is float16 autocast on CUDA (as before) and float32
elsewhere; ``fp16`` / ``bf16`` autocast on any device; ``fp32`` never autocasts. Logits are
upsampled and passed through the sigmoid in float32 whatever the precision. A CPU with
bfloat16 instructions may run a model faster with ``bf16`` (the README's prediction benchmark
measures it), at slightly different probabilities, so the CPU default stays float32.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from enum import StrEnum

import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn

from inkpipe.pipeline.errors import check_choice
from inkpipe.train.checkpoint import probability_map

__all__ = [
    "DevicePredictor",
    "HostPredictor",
    "Precision",
    "autocast_dtype",
    "compiled",
    "device_predictor",
    "host_predictor",
]

DevicePredictor = Callable[[torch.Tensor], torch.Tensor]
"""(B, k, t, t) float32 tensor on the device -> (B, t, t) float32 probabilities there."""

HostPredictor = Callable[[NDArray[np.float32]], NDArray[np.float32]]
"""(B, k, t, t) float32 NumPy batch -> (B, t, t) float32 NumPy probabilities."""


class Precision(StrEnum):
    """Arithmetic of the model's forward pass (``--precision``)."""

    AUTO = "auto"  # float16 autocast on CUDA, float32 elsewhere
    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"


_AUTOCAST = {
    Precision.FP32: None,
    Precision.FP16: torch.float16,
    Precision.BF16: torch.bfloat16,
}


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """Return the autocast dtype of ``precision`` on ``device``, or None for float32.

    Raises:
        ConfigError: unknown ``precision`` (the message suggests the closest one).
    """
    chosen = check_choice("precision", precision, Precision)
    if chosen is Precision.AUTO:
        return torch.float16 if device.type == "cuda" else None
    return _AUTOCAST[chosen]


def compiled(
    model: nn.Module, warn: Callable[[str], None] | None = None
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Return ``torch.compile(model)``, falling back to ``model`` itself if compiling fails.

    ``torch.compile`` compiles lazily, at the first call (and again for a new batch shape,
    e.g. a fragment's last, smaller batch), so the calls are guarded too: if the compiled
    model raises (no C++ compiler, an unsupported operation, an old GPU), ``warn`` gets one
    line saying so and the uncompiled model runs the batch, and every later one. An error
    of the model itself is raised again by the uncompiled run.

    Args:
        model: the network, on its device, in eval mode.
        warn: where the one-line warning goes; default :func:`warnings.warn`.
    """

    def fall_back(exc: BaseException) -> None:
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        message = (
            f"torch.compile failed ({type(exc).__name__}: {first}); running the model "
            "uncompiled (omit --compile to skip the attempt)"
        )
        if warn is None:
            warnings.warn(message, RuntimeWarning, stacklevel=3)
        else:
            warn(f"warning: {message}")

    try:
        fast = torch.compile(model)
    except Exception as exc:  # noqa: BLE001  # any failure means: run uncompiled
        fall_back(exc)
        return model
    current: Callable[[torch.Tensor], torch.Tensor] = fast

    def forward(x: torch.Tensor) -> torch.Tensor:
        nonlocal current
        if current is model:
            return model(x)
        try:
            return current(x)
        except Exception as exc:  # noqa: BLE001  # compiling happens in calls (new shapes too)
            fall_back(exc)
            current = model
            return model(x)

    return forward


def device_predictor(
    model: nn.Module,
    device: torch.device,
    precision: str = Precision.AUTO,
    compile: bool = False,
    warn: Callable[[str], None] | None = None,
) -> DevicePredictor:
    """Wrap a model as a device predictor: (B, k, t, t) -> (B, t, t) probabilities, on ``device``.

    Runs in eval mode under ``torch.inference_mode`` and the autocast of ``precision``;
    logits of a coarse model (output stride > 1) are upsampled bilinearly to t x t before the
    sigmoid (:func:`~inkpipe.train.checkpoint.probability_map`, as in training's validation).

    Args:
        model: the network (moved to ``device``).
        device: where it runs.
        precision: a :class:`Precision` value.
        compile: run it through ``torch.compile`` (see :func:`compiled`).
        warn: where a failed compile's one-line warning goes.
    """
    dtype = autocast_dtype(precision, device)
    model = model.to(device).eval()
    forward: Callable[[torch.Tensor], torch.Tensor] = compiled(model, warn) if compile else model

    def predict(x: torch.Tensor) -> torch.Tensor:
        with (
            torch.inference_mode(),
            torch.autocast(
                device_type=device.type, dtype=dtype or torch.float32, enabled=dtype is not None
            ),
        ):
            return probability_map(forward, x)

    return predict


def host_predictor(predictor: DevicePredictor, device: torch.device) -> HostPredictor:
    """Adapt a device predictor (possibly wrapped by TTA or an ensemble) to NumPy batches.

    One copy in and one copy out per call: on CUDA the batch is staged in pinned host memory
    and sent with ``non_blocking``, and the probabilities come back the same way (the call
    waits for that copy before it returns); on the CPU the batch is used in place.

    Args:
        predictor: (B, k, t, t) -> (B, t, t) tensors on ``device``.
        device: where ``predictor`` runs.

    Returns:
        (B, k, t, t) float32 -> (B, t, t) float32 NumPy callable.
    """
    cuda = device.type == "cuda"

    def predict(batch: NDArray[np.float32]) -> NDArray[np.float32]:
        with torch.inference_mode():
            host = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
            if cuda:
                # page-locked memory lets the copy run asynchronously (cached by torch)
                staged = torch.empty(host.shape, dtype=host.dtype, pin_memory=True)
                staged.copy_(host)
                host = staged
            prob = predictor(host.to(device, non_blocking=cuda))
            if not cuda:
                return prob.to("cpu", torch.float32).numpy()
            out = torch.empty(prob.shape, dtype=torch.float32, pin_memory=True)
            out.copy_(prob, non_blocking=True)
            torch.cuda.current_stream(device).synchronize()
            return out.numpy()

    return predict
