"""Checkpoints: everything needed to predict without the command line, saved atomically.

A checkpoint is a dict saved with ``torch.save``: the model spec and weights, the layer range,
tile size, normalisation method, the threshold searched on validation, the validation metrics,
the inkpipe version and the full resolved training config; ``last.pt`` also holds the
optimiser, scheduler and scaler states for ``--resume``.

A checkpoint holds only tensors and plain values (dicts, lists, tuples, str, int, float, bool,
None): :func:`save_checkpoint` converts NumPy values, paths, enums and dataclasses to those, so
:func:`load_checkpoint` reads every file inkpipe writes with ``torch.load(weights_only=True)``,
which cannot run code hidden in a pickle. A file that needs more than that is refused unless
the caller trusts it (``--trust-checkpoint``).
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import pickle
import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path, PurePath
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn

from inkpipe.pipeline import __version__
from inkpipe.pipeline.disk import check_free
from inkpipe.pipeline.errors import InputNotFoundError, InvalidInputError, UnsafeCheckpointError
from inkpipe.pipeline.files import atomic_target
from inkpipe.pipeline.layers import LayerRange, parse_layers

from .devices import DEVICES as DEVICES  # re-exported: infer uses them from here
from .devices import check_device as check_device
from .devices import select_device as select_device
from .models import ModelSpec, build_model

FORMAT = "inkpipe-checkpoint/1"
NORMALIZATION = "per-layer: clip to the fragment's p01..p99, then (x - mean) / std"
TRUST_FLAG = "--trust-checkpoint"
_PLAIN = (str, int, float, bool, bytes, type(None), torch.Tensor, torch.dtype, torch.Size)


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


def plain(value: Any, where: str = "checkpoint") -> Any:
    """Return ``value`` made of tensors and plain values only, the types ``weights_only`` reads.

    NumPy scalars become Python numbers, NumPy arrays tensors, paths strings, enums their
    values, dataclasses dicts, sets sorted lists; dicts, lists and tuples are converted
    recursively (and returned unchanged, subclass and all, when nothing inside changed, so a
    state dict keeps its ``_metadata``).

    Args:
        value: what to save.
        where: the key path of ``value``, for the error message.

    Raises:
        TypeError: ``value`` holds something else (a bug in what inkpipe saves).
    """
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, enum.Enum):  # before _PLAIN: a StrEnum is a str weights_only refuses
        return plain(value.value, where)
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.array(value))
    if isinstance(value, PurePath):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return plain(dataclasses.asdict(value), where)
    if isinstance(value, set | frozenset):
        return sorted(plain(v, where) for v in value)
    if isinstance(value, Mapping):
        items = {k: plain(v, f"{where}[{k!r}]") for k, v in value.items()}
        same = isinstance(value, dict) and all(items[k] is value[k] for k in value)
        return value if same else items
    if isinstance(value, list | tuple):
        seq = [plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
        if all(a is b for a, b in zip(seq, value)):
            return value
        return tuple(seq) if isinstance(value, tuple) else seq
    raise TypeError(
        f"{where} is a {type(value).__qualname__}, which torch.load(weights_only=True) cannot "
        "read; convert it to tensors or plain values before saving"
    )


def save_checkpoint(path: Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` (plus format and version) to ``path`` atomically; return ``path``.

    The payload goes through :func:`plain` first, so the file loads with ``weights_only``.
    """
    path = Path(path)
    data = plain({"format": FORMAT, "version": __version__, **payload})
    # The new file is written beside the old one, which stays until the rename.
    check_free(
        path.parent,
        tensor_bytes(data) + PICKLE_SLACK_BYTES,
        f"checkpoint {path}",
        "free some space, then continue with --resume (the checkpoints already written are kept)",
    )
    with atomic_target(path) as tmp:
        torch.save(data, tmp)
    return path


PICKLE_SLACK_BYTES = 1 << 20  # what torch.save writes besides the tensors' bytes (keys, config)


def tensor_bytes(value: Any) -> int:
    """Return the bytes of all tensors in ``value`` (nested dicts, lists and tuples)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, Mapping):
        return sum(tensor_bytes(v) for v in value.values())
    if isinstance(value, list | tuple):
        return sum(tensor_bytes(v) for v in value)
    return 0


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


def _refused_pickle(exc: pickle.UnpicklingError) -> str:
    """Say in a few words what a ``weights_only`` load refused (the global it named)."""
    text = str(exc)
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:
        return f"a pickled reference to {found.group(1)}"
    found = re.search(r"Unsupported operand \d+", text)
    if found:
        return f"pickle code weights_only does not allow ({found.group(0).lower()})"
    return "pickled Python objects beyond tensors and plain values"


def load_checkpoint(path: Path, *, trust: bool = False) -> Checkpoint:
    """Read a checkpoint written by ``inkpipe train``.

    The file is read with ``torch.load(weights_only=True)``: tensors and plain values only,
    so a file whose pickle would run code is refused before anything in it runs.

    Args:
        path: the ``.pt`` file.
        trust: read it with the full pickle instead (``--trust-checkpoint``), for files from
            a trusted source that hold other objects (e.g. NumPy values saved by an older
            inkpipe). Loading such a file can run any code it carries.

    Raises:
        InputNotFoundError: no file at ``path``.
        UnsafeCheckpointError: the file holds objects only a trusted load may read.
        InvalidInputError: not an inkpipe checkpoint, or unreadable.
    """
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(
            f"checkpoint not found: {path}; train one with 'inkpipe train --out RUN' "
            "and pass RUN/best.pt"
        )
    try:
        with warnings.catch_warnings():
            # e.g. "Detected pickle protocol 4": noise before the one-line error below
            warnings.simplefilter("ignore", UserWarning)
            raw = torch.load(path, map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError as exc:
        if trust or "weights only" not in str(exc).lower():
            raise InvalidInputError(
                f"cannot read checkpoint {path}: {str(exc).strip().splitlines()[0]}; is it a "
                "file written by 'inkpipe train'?"
            ) from None
        raise UnsafeCheckpointError(
            f"checkpoint {path} holds {_refused_pickle(exc)}, expected only tensors and plain "
            "values (what 'inkpipe train' writes); loading it could run code, so it was not "
            f"loaded. If you trust its source, pass {TRUST_FLAG}"
        ) from None
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


@functools.lru_cache(maxsize=32)
def _bilinear_weights(n_in: int, n_out: int, device: torch.device) -> torch.Tensor:
    """Return the (n_out, n_in) float32 matrix of 1-D bilinear upsampling.

    The weights of ``F.interpolate(mode="bilinear", align_corners=False)`` given a size: output
    pixel ``i`` samples the input at ``(i + 0.5) * n_in / n_out - 0.5`` (clamped at 0) between
    its two nearest pixels (the last one repeated at the edge).
    """
    src = ((torch.arange(n_out, dtype=torch.float64) + 0.5) * (n_in / n_out) - 0.5).clamp(min=0)
    lo = src.floor().long().clamp(max=n_in - 1)
    hi = (lo + 1).clamp(max=n_in - 1)
    frac = src - lo
    weights = torch.zeros(n_out, n_in, dtype=torch.float64)
    rows = torch.arange(n_out)
    weights.index_put_((rows, lo), 1 - frac, accumulate=True)
    weights.index_put_((rows, hi), frac, accumulate=True)
    return weights.to(device, torch.float32)


def upsample_bilinear(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Upsample (B, C, h, w) logits to (B, C, H, W) bilinearly, in float32.

    The same numbers as ``F.interpolate(logits, size, mode="bilinear", align_corners=False)``
    (to float32 rounding), as two small matrix products: on a CPU about 15 times faster for
    the one-channel logits of a coarse model, which keeps this step out of the way of the
    model in prediction. Runs outside autocast, so it stays float32 on a GPU too.
    """
    rows = _bilinear_weights(logits.shape[-2], size[0], logits.device)
    cols = _bilinear_weights(logits.shape[-1], size[1], logits.device)
    with torch.autocast(device_type=logits.device.type, enabled=False):
        return rows @ logits.float() @ cols.T


def probability_map(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Return the ink probabilities of a batch: ``sigmoid`` of the logits upsampled to the tile.

    Logits of a coarse model (output stride > 1) are upsampled bilinearly to the input's
    (t, t) before the sigmoid (:func:`upsample_bilinear`), in float32, so blending, TTA and
    scoring see full-resolution probabilities.

    Args:
        model: the network (or a compiled form of it); call it under the caller's grad and
            autocast modes.
        x: (B, k, t, t) float tensor on the model's device.

    Returns:
        (B, t, t) float32 tensor of probabilities in [0, 1], on the same device.
    """
    logits = model(x).float()
    if logits.shape[-2:] != x.shape[-2:]:
        logits = upsample_bilinear(logits, (int(x.shape[-2]), int(x.shape[-1])))
    return torch.sigmoid(logits)[:, 0]


def make_predictor(
    model: nn.Module, device: torch.device
) -> Callable[[NDArray[np.float32]], NDArray[np.float32]]:
    """Wrap a model as ``(B, k, t, t) float32 -> (B, t, t) float32`` ink probabilities.

    Runs in eval mode under ``torch.inference_mode``, with float16 autocast on CUDA; the
    probabilities are :func:`probability_map`'s.
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
            prob = probability_map(model, x)
        return prob.cpu().numpy().astype(np.float32)

    return predict
