"""``inkpipe train``: parse options into a :class:`TrainConfig` and call :func:`train`.

With ``--config FILE`` the config starts from the file's fields (the ``config.yaml`` a run
writes is one) and the options given on the command line override them.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import click

from inkpipe.pipeline.errors import ConfigError
from inkpipe.pipeline.layers import LayerRange, parse_layers
from inkpipe.pipeline.volume import NormMode
from inkpipe.train.augment import AugLevel
from inkpipe.train.config import TrainConfig, Validation, parse_validation
from inkpipe.train.losses import LossName, LossSpec
from inkpipe.train.models import OUTPUT_STRIDES, ModelName, ModelSpec
from inkpipe.train.recipe import EPOCHS

from .configfile import given_on_command_line, read_config_file
from .options import choice_of, default_of, device_option

AUTO = "auto"  # --model: the device's recipe (TrainConfig.model = None)
DEFAULT_OUT = Path("runs/train")
# field types written as text in a config file, parsed as on the command line
PARSERS = {LayerRange: (parse_layers, "'28:38'"), Validation: (parse_validation, "patches:64")}
# options that fill a field of the loss spec
LOSS_OPTIONS = {
    "loss": "name",
    "focal_alpha": "focal_alpha",
    "focal_gamma": "focal_gamma",
    "label_smoothing": "label_smoothing",
}
# options that need converting, or fill a nested spec; every other option fills its field
SPECIAL = frozenset(
    {"layers", "fragments", "model", "encoder", "encoder_weights", "output_stride", "val"}
    | {"quiet", "out"}
    | set(LOSS_OPTIONS)
)


def model_spec(name: str, k: int, encoder: str | None, encoder_weights: str) -> ModelSpec | None:
    """Return the spec of ``--model`` (None for ``auto``, unless an encoder option is given).

    ``--model auto --encoder X`` or ``--encoder-weights W`` would be silently ignored by the
    recipe, so they are refused.
    """
    if name != AUTO:
        return ModelSpec(name=name, in_channels=k, encoder=encoder, encoder_weights=encoder_weights)
    if encoder is not None or encoder_weights != default_of(ModelSpec, "encoder_weights"):
        from inkpipe.pipeline.errors import ConfigError

        raise ConfigError(
            "--encoder and --encoder-weights choose the encoder of a named model; add --model "
            "unet, stem3d or resnet3d"
        )
    return None


def train_config(
    params: dict[str, Any], given: frozenset[str], config_file: Path | None = None
) -> TrainConfig:
    """Return the :class:`TrainConfig` of the parsed options ``params``.

    Without ``config_file`` every option counts. With it, the config starts from the file's
    fields and only the options in ``given`` (those on the command line) override them: a
    nested spec keeps the file's other fields (``--focal-gamma`` changes only that field of
    the file's ``loss``; ``--encoder`` only the encoder of its ``model``).

    Raises:
        ConfigError: no store given, or a bad value (from :func:`read_config_file` with the
            file and key named, or from :class:`TrainConfig`).
    """
    p = dict(params)
    if config_file is None:
        fields: dict[str, Any] = {}
        given = frozenset(p)
    else:
        fields = read_config_file(config_file, TrainConfig, PARSERS)
        given &= frozenset(p)  # not --config itself
    base = dict(fields)
    fields.update({name: p[name] for name in given - SPECIAL})
    if "out" in given or "out" not in fields:
        fields["out"] = p["out"]
    if fields.get("store") is None:
        raise ConfigError(
            "no store given; pass --store STORE.zarr (written by 'inkpipe ingest'), or a "
            "--config file with a store: line"
        )
    if "layers" in given:
        fields["layers"] = parse_layers(p["layers"])
    if "fragments" in given:
        fields["fragments"] = p["fragments"] or None
    if {"model", "encoder", "encoder_weights"} & given:
        k = fields.get("layers", default_of(TrainConfig, "layers")).k
        if "model" in given or base.get("model") is None:
            fields["model"] = model_spec(p["model"], k, p["encoder"], p["encoder_weights"])
        else:
            changed = {n: p[n] for n in ("encoder", "encoder_weights") if n in given}
            fields["model"] = replace(base["model"], **changed)
    if "output_stride" in given:
        fields["output_stride"] = None if p["output_stride"] is None else int(p["output_stride"])
    loss_changes = {field: p[name] for name, field in LOSS_OPTIONS.items() if name in given}
    if loss_changes:
        fields["loss"] = replace(base.get("loss", LossSpec()), **loss_changes)
    if "val" in given:
        fields["val"] = parse_validation(p["val"])
    if "quiet" in given:
        fields["progress"] = not p["quiet"]
    return TrainConfig(**fields)


@click.command("train", short_help="Train a model on crops streamed from a store.")
@click.option(
    "--config",
    "config_file",
    type=click.Path(path_type=Path),
    help="YAML file of TrainConfig fields, e.g. the config.yaml a run writes; the options "
    "given on the command line override it.",
)
@click.option(
    "--store",
    type=click.Path(path_type=Path),
    help="Zarr store written by 'inkpipe ingest' (required unless --config names one).",
)
@click.option(
    "--out",
    default=DEFAULT_OUT,
    show_default=True,
    type=click.Path(path_type=Path),
    help="Run folder: best.pt, last.pt, metrics.csv, metrics.png, config.yaml.",
)
@click.option(
    "--layers",
    default=str(default_of(TrainConfig, "layers")),
    show_default=True,
    help="Contiguous CT layers START:STOP used as input channels (k = STOP - START).",
)
@click.option(
    "--fragment",
    "fragments",
    multiple=True,
    help="Train on this fragment id (repeatable; default: every labelled fragment).",
)
@click.option(
    "--model",
    default=AUTO,
    show_default=True,
    type=choice_of(ModelName, AUTO),
    help="auto: the device's recipe (CPU: stem3d with the small 2-D U-Net, 64 px tiles, "
    "output stride 4, batch 32; CUDA: stem3d with an efficientnet-b0 smp Unet, 256 px tiles, "
    "batch 16); stem3d: 3-D stem max-pooled over depth + 2-D net (Kaggle 1st place); "
    "resnet3d: video ResNet with depth-pooled skips (Grand Prize); attention-unet: the small "
    "original 2-D network; unet: smp Unet with --encoder.",
)
@click.option(
    "--encoder",
    default=default_of(ModelSpec, "encoder"),
    help="unet: any smp encoder [efficientnet-b0]; stem3d: small or an smp encoder [small]; "
    "resnet3d: r3d_18, mc3_18 or r2plus1d_18 [r3d_18].",
)
@click.option(
    "--encoder-weights",
    default=default_of(ModelSpec, "encoder_weights"),
    show_default=True,
    help="imagenet (download through smp, needs network), none, or PATH to a local "
    "encoder state dict (its first convolution is adapted to k channels); kinetics for "
    "resnet3d (download through torchvision).",
)
@click.option(
    "--tile",
    "tile_px",
    type=int,
    default=default_of(TrainConfig, "tile_px"),
    help="Training crop side, px [recipe: 64 on CPU, 256 on CUDA]; windows for a tile the "
    "store was not indexed with are derived from its mask and labels (no re-ingest).",
)
@click.option(
    "--output-stride",
    type=click.Choice([str(s) for s in OUTPUT_STRIDES]),
    default=default_of(TrainConfig, "output_stride"),
    help="The model predicts at 1/s resolution; the loss uses area-downsampled labels and "
    "prediction upsamples [recipe: 4; a named --model: 1].",
)
@click.option(
    "--normalize",
    default=default_of(TrainConfig, "normalize"),
    show_default=True,
    type=choice_of(NormMode),
    help="fragment: one mean, std and clipping range per fragment, pooled over its layers "
    "(keeps the depth profile); layer: each layer by its own statistics.",
)
@click.option(
    "--depth-shift",
    type=int,
    default=default_of(TrainConfig, "depth_shift"),
    show_default=True,
    help="Shift the layer window randomly by up to this many layers each way (0: off).",
)
@click.option(
    "--ema-decay",
    type=float,
    default=default_of(TrainConfig, "ema_decay"),
    show_default=True,
    help="Validate and save an exponential moving average of the weights (0: off).",
)
@click.option(
    "--loss", default=default_of(LossSpec, "name"), show_default=True, type=choice_of(LossName)
)
@click.option(
    "--focal-alpha",
    type=float,
    default=default_of(LossSpec, "focal_alpha"),
    show_default=True,
    help="Focal loss alpha.",
)
@click.option(
    "--focal-gamma",
    type=float,
    default=default_of(LossSpec, "focal_gamma"),
    show_default=True,
    help="Focal loss gamma.",
)
@click.option(
    "--label-smoothing",
    type=float,
    default=default_of(LossSpec, "label_smoothing"),
    show_default=True,
    help="BCE label smoothing.",
)
@click.option(
    "--aug",
    default=default_of(TrainConfig, "aug"),
    show_default=True,
    type=choice_of(AugLevel),
    help="none; light = flips + rot90; full = light + brightness/contrast, affine, cut-out.",
)
@click.option(
    "--epochs",
    type=int,
    default=default_of(TrainConfig, "epochs"),
    help=f"Epochs to train [recipe: {EPOCHS}; with --max-minutes, as many as the budget allows].",
)
@click.option(
    "--steps-per-epoch",
    type=int,
    default=default_of(TrainConfig, "steps_per_epoch"),
    show_default=True,
    help="Batches per epoch.",
)
@click.option(
    "--batch-size",
    type=int,
    default=default_of(TrainConfig, "batch_size"),
    help="Crops per step [recipe: 32 on CPU, 16 on CUDA].",
)
@click.option(
    "--lr",
    type=float,
    default=default_of(TrainConfig, "lr"),
    show_default=True,
    help="Peak learning rate (AdamW).",
)
@click.option(
    "--weight-decay",
    type=float,
    default=default_of(TrainConfig, "weight_decay"),
    show_default=True,
)
@click.option(
    "--warmup-steps",
    type=int,
    default=default_of(TrainConfig, "warmup_steps"),
    show_default=True,
    help="Linear warm-up steps.",
)
@click.option(
    "--restart-epochs",
    type=int,
    default=default_of(TrainConfig, "restart_epochs"),
    show_default=True,
    help="Period of the cosine warm restarts, in epochs.",
)
@click.option(
    "--grad-clip",
    type=float,
    default=default_of(TrainConfig, "grad_clip"),
    show_default=True,
    help="Max gradient norm (0: off).",
)
@click.option(
    "--pos-fraction",
    type=float,
    default=default_of(TrainConfig, "pos_fraction"),
    show_default=True,
    help="Share of crops drawn from windows with ink.",
)
@click.option(
    "--jitter",
    "jitter_px",
    type=int,
    default=default_of(TrainConfig, "jitter_px"),
    show_default=True,
    help="Random shift of crops around their window, px.",
)
@click.option(
    "--hard-negatives",
    type=float,
    default=default_of(TrainConfig, "hard_negatives"),
    show_default=True,
    help="Keep this fraction of the highest-loss negatives as the negative pool, "
    "re-mined before each epoch (e.g. 0.4; 0 = off).",
)
@click.option(
    "--hard-negative-sample",
    type=int,
    default=default_of(TrainConfig, "hard_negative_sample"),
    show_default=True,
    help="Negative windows scored for mining.",
)
@click.option(
    "--val",
    default=str(default_of(TrainConfig, "val")),
    show_default=True,
    help="regions[:F] (square blocks holding a share F of each training fragment's papyrus, "
    "default 0.15, excluded from training and predicted whole with blending; fragments too "
    "small for blocks fall back to 64 patches), patches:N (N held-out windows), fragment:ID, "
    "or none.",
)
@click.option(
    "--val-stride",
    "val_stride_px",
    type=int,
    default=default_of(TrainConfig, "val_stride_px"),
    help="Grid stride of fragment validation, px [tile/2].",
)
@click.option(
    "--folds",
    type=click.Choice(["loo"]),
    default=default_of(TrainConfig, "folds"),
    help="loo: one model per labelled fragment held out, in OUT/fold_<id>/.",
)
@click.option("--seed", type=int, default=default_of(TrainConfig, "seed"), show_default=True)
@device_option(TrainConfig)
@click.option(
    "--workers",
    type=int,
    default=default_of(TrainConfig, "workers"),
    show_default=True,
    help="DataLoader worker processes.",
)
@click.option(
    "--cache-mb",
    type=float,
    default=default_of(TrainConfig, "cache_mb"),
    show_default=True,
    help="Budget of the decoded-chunk cache (split between workers).",
)
@click.option(
    "--resume/--no-resume",
    default=default_of(TrainConfig, "resume"),
    help="Continue the run in --out from last.pt (--no-resume: start afresh, also when a "
    "--config file says resume: true).",
)
@click.option(
    "--trust-checkpoint",
    is_flag=True,
    help="With --resume: load last.pt with the full pickle, which can run code hidden in the "
    "file. Without it last.pt is read as tensors and plain values only (all that 'inkpipe "
    "train' writes) and a file holding anything else is refused. Only for files you trust.",
)
@click.option(
    "--max-minutes",
    type=float,
    default=default_of(TrainConfig, "max_minutes"),
    help="Time budget: training stops at the first step past it (inside an epoch), then "
    "validates and saves.",
)
@click.option(
    "--tensorboard",
    is_flag=True,
    default=default_of(TrainConfig, "tensorboard"),
    help="Also log the metrics to TensorBoard event files in --out (needs the tensorboard "
    "package: pip install 'inkpipe[tensorboard]').",
)
@click.option("--quiet", is_flag=True, help="No progress bars.")
def train_command(config_file: Path | None, **params: Any) -> None:
    """Train a model on crops streamed from a store; keep the best validation F0.5.

    Crops of the chosen layers are read straight from the Zarr store through a bounded
    chunk cache, so memory does not grow with the fragment size or the layer count.
    Launched under torchrun (e.g. torchrun --nproc-per-node 2 -m inkpipe.cli train ...)
    it trains with DistributedDataParallel, one GPU per process. With --config FILE (e.g.
    runs/a/config.yaml) the run starts from that file's settings; the options given on the
    command line override them.
    """
    from inkpipe.train.loop import train

    given = given_on_command_line(click.get_current_context())
    train(train_config(params, given, config_file), log=click.echo)
