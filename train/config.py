"""The training configuration: one frozen value that says how a run is made.

It is saved (as a dict) in every checkpoint and as ``config.yaml`` in the run folder, so a
checkpoint says how it was made and ``--resume`` can check it continues the same run.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

from inkpipe.pipeline.checks import check_int, check_number
from inkpipe.pipeline.errors import ConfigError, check_choice
from inkpipe.pipeline.layers import LayerRange, parse_layers
from inkpipe.pipeline.volume import NormMode

from .augment import AugLevel
from .devices import check_device
from .losses import LossSpec
from .models import OUTPUT_STRIDES, ModelSpec


class ValidationKind(StrEnum):
    """What a run validates on (the part of ``--val`` before the colon; see :class:`Validation`)."""

    REGIONS = "regions"
    PATCHES = "patches"
    FRAGMENT = "fragment"
    NONE = "none"


@dataclass(frozen=True)
class Validation:
    """How a run is validated.

    Attributes:
        kind: a :class:`ValidationKind` (text is turned into one): ``"regions"`` (square
            blocks covering ``fraction`` of each training fragment's papyrus, excluded from
            training and predicted whole, as ``inkpipe predict`` does), ``"patches"`` (N
            held-out windows of the training fragments), ``"fragment"`` (a whole held-out
            fragment) or ``"none"``.
        patches: N for ``patches``.
        fragment: the held-out fragment id for ``fragment``.
        fraction: the held-out share of the papyrus for ``regions``, in (0, 0.5].
    """

    kind: ValidationKind = ValidationKind.REGIONS
    patches: int = 64
    fragment: str | None = None
    fraction: float = 0.15

    def __post_init__(self) -> None:
        kind = check_choice("validation kind", self.kind, ValidationKind)
        object.__setattr__(self, "kind", kind)

    def __str__(self) -> str:
        """Return the ``--val`` text, e.g. ``regions:0.15`` (what config.yaml saves)."""
        if self.kind is ValidationKind.REGIONS:
            return f"regions:{self.fraction:g}"
        if self.kind is ValidationKind.PATCHES:
            return f"patches:{self.patches}"
        if self.kind is ValidationKind.FRAGMENT:
            return f"fragment:{self.fragment}"
        return "none"


def parse_validation(text: str) -> Validation:
    """Parse ``regions[:F]``, ``patches:N``, ``fragment:ID`` or ``none``."""
    kind, _, arg = str(text).partition(":")
    if kind == ValidationKind.NONE and not arg:
        return Validation(ValidationKind.NONE, 0)
    if kind == ValidationKind.REGIONS:
        try:
            fraction = float(arg) if arg else Validation.fraction
        except ValueError:
            fraction = -1.0
        if 0 < fraction <= 0.5:
            return Validation(ValidationKind.REGIONS, fraction=fraction)
    if kind == ValidationKind.PATCHES and arg.isdigit() and int(arg) > 0:
        return Validation(ValidationKind.PATCHES, int(arg))
    if kind == ValidationKind.FRAGMENT and arg:
        return Validation(ValidationKind.FRAGMENT, 0, arg)
    raise ConfigError(
        "expected --val regions[:F] (0 < F <= 0.5), patches:N (N > 0), fragment:ID or none, "
        f"got '{text}'"
    )


# integer fields (None: unset, for the optional ones) and their smallest valid value
_INT_MINIMUMS = {
    "epochs": 1,
    "steps_per_epoch": 1,
    "batch_size": 1,
    "tile_px": 1,
    "workers": 0,
    "depth_shift": 0,
}
# fields whose command-line option is not the field name with dashes
_OPTION_NAMES = {"tile_px": "--tile"}


def _option(field_name: str) -> str:
    """Return the command-line option that sets ``field_name``, e.g. ``--steps-per-epoch``."""
    return _OPTION_NAMES.get(field_name, "--" + field_name.replace("_", "-"))


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs; defaults work on CPU and GPU.

    Attributes:
        store: the Zarr store from ``inkpipe ingest``.
        out: the run folder (``best.pt``, ``last.pt``, ``metrics.csv``, ``metrics.png``,
            ``config.yaml``).
        layers: contiguous CT layer range; ``k = stop - start`` input channels.
        fragments: training fragment ids (None: every fragment with ink labels).
        model: network spec (``in_channels`` is set from ``layers``); None: the device's
            recipe (see :mod:`inkpipe.train.recipe`).
        tile_px: side of the training crops (None: the recipe's); windows for a tile the
            store was not indexed with are derived from its mask and labels.
        output_stride: the model predicts at ``1 / output_stride`` resolution and the loss
            compares with area-downsampled labels (None: the recipe's, or the model's own).
        loss: loss spec.
        normalize: how CT values are normalised (:class:`~inkpipe.pipeline.volume.NormMode`).
        aug: augmentation level.
        depth_shift: random shift of the layer window, up to this many layers each way
            (clipped to the layers a fragment has); 0: off.
        ema_decay: decay of the exponential moving average of the weights that is validated
            and saved (0: off, the raw weights are).
        epochs, steps_per_epoch, batch_size: schedule (samples/epoch = steps x batch;
            None: the recipe's: 40 epochs, or as many as ``max_minutes`` allow).
        lr: peak learning rate after warm-up; weight_decay: AdamW decay.
        warmup_steps: linear warm-up length; restart_epochs: first period of the cosine
            warm restarts (doubling afterwards).
        grad_clip: max gradient norm (0: off).
        pos_fraction: share of crops drawn from windows with ink.
        jitter_px: random shift of crops around their window.
        hard_negatives: fraction of scored negatives kept as the hard-negative pool (0: off).
        hard_negative_sample: negatives scored before each epoch for mining.
        val: validation scheme; val_stride_px: grid stride of fragment validation
            (None: tile // 2).
        folds: ``None`` or ``"loo"``: one run per labelled fragment held out.
        seed: seeds every random draw; device: auto, cpu, cuda (under torchrun: the GPU of
            each process's LOCAL_RANK) or cuda:N; workers: DataLoader workers.
        cache_mb: decoded-block cache budget (split between workers).
        resume: continue from ``out/last.pt``.
        trust_checkpoint: with ``resume``, load ``last.pt`` with the full pickle (it can run
            code the file carries) instead of tensors and plain values only.
        max_minutes: wall-clock budget: training stops at the first step past it (inside an
            epoch), then validates and saves once more (None: no limit).
        tensorboard: also write the per-epoch metrics as TensorBoard event files in ``out``
            (needs the optional ``tensorboard`` package).
        progress: show progress bars.
    """

    store: Path
    out: Path
    layers: LayerRange = field(default_factory=lambda: LayerRange(28, 38))
    fragments: tuple[str, ...] | None = None
    model: ModelSpec | None = None
    tile_px: int | None = None
    output_stride: int | None = None
    loss: LossSpec = field(default_factory=LossSpec)
    aug: AugLevel = AugLevel.FULL
    normalize: NormMode = NormMode.FRAGMENT
    depth_shift: int = 2
    ema_decay: float = 0.99
    epochs: int | None = None
    steps_per_epoch: int = 100
    batch_size: int | None = None
    lr: float = 1e-3
    weight_decay: float = 3e-5
    warmup_steps: int = 100
    restart_epochs: int = 10
    grad_clip: float = 1.0
    pos_fraction: float = 0.5
    jitter_px: int = 32
    hard_negatives: float = 0.0
    hard_negative_sample: int = 256
    val: Validation = field(default_factory=Validation)
    val_stride_px: int | None = None
    folds: str | None = None
    seed: int = 0
    device: str = "auto"
    workers: int = 0
    cache_mb: float = 1024
    resume: bool = False
    trust_checkpoint: bool = False
    max_minutes: float | None = None
    tensorboard: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "aug", check_choice("augmentation", self.aug, AugLevel))
        object.__setattr__(self, "normalize", check_choice("--normalize", self.normalize, NormMode))
        check_device(self.device)
        if self.folds not in (None, "loo"):
            raise ConfigError(f"expected --folds loo or nothing, got '{self.folds}'")
        # messages name the command-line option: "--epochs must be an integer >= 1, got 0"
        for name, minimum in _INT_MINIMUMS.items():
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, check_int(_option(name), value, minimum))
        check_number("--lr", self.lr, 0, low_open=True)
        for name in ("hard_negatives", "ema_decay"):
            check_number(_option(name), getattr(self, name), 0, 1, high_open=True)
        if self.output_stride is not None and self.output_stride not in OUTPUT_STRIDES:
            raise ConfigError(
                f"--output-stride must be one of {', '.join(map(str, OUTPUT_STRIDES))}, got "
                f"{self.output_stride}"
            )
        if self.model is not None:
            stride = self.output_stride or self.model.output_stride
            if (self.model.in_channels, self.model.output_stride) != (self.layers.k, stride):
                model = replace(self.model, in_channels=self.layers.k, output_stride=stride)
                object.__setattr__(self, "model", model)
            object.__setattr__(self, "output_stride", stride)

    def to_dict(self) -> dict[str, Any]:
        """Return a YAML/JSON-able dict of the resolved configuration (choices as plain text)."""
        d = asdict(self)
        d["store"], d["out"] = str(self.store), str(self.out)
        d["aug"] = str(self.aug)
        d["normalize"] = str(self.normalize)
        d["loss"]["name"] = str(self.loss.name)
        d["layers"] = str(self.layers)
        d["model"] = None if self.model is None else self.model.to_dict()
        d["val"] = str(self.val)
        d["fragments"] = list(self.fragments) if self.fragments else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_dict`.

        A config saved before ``normalize`` existed loads as ``layer``, what that run did.
        """
        d = dict(d)
        d.setdefault("normalize", NormMode.LAYER)
        d["store"], d["out"] = Path(d["store"]), Path(d["out"])
        d["layers"] = parse_layers(d["layers"])
        d["model"] = None if d.get("model") is None else ModelSpec.from_dict(d["model"])
        d["loss"] = LossSpec(**d["loss"])
        d["val"] = parse_validation(d["val"])
        d["fragments"] = tuple(d["fragments"]) if d.get("fragments") else None
        return cls(**d)
