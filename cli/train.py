"""``inkpipe train``: parse options into a :class:`TrainConfig` and call :func:`train`."""

from __future__ import annotations

from pathlib import Path

import click

from inkpipe.pipeline.layers import parse_layers
from inkpipe.train.augment import AUG_LEVELS
from inkpipe.train.config import TrainConfig, parse_validation
from inkpipe.train.losses import LOSS_NAMES, LossSpec
from inkpipe.train.models import MODEL_NAMES, OUTPUT_STRIDES, ModelSpec

from .options import default_of, device_option

AUTO = "auto"  # --model: the device's recipe (TrainConfig.model = None)


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


@click.command("train", short_help="Train a model on crops streamed from a store.")
@click.option(
    "--store",
    required=True,
    type=click.Path(path_type=Path),
    help="Zarr store written by 'inkpipe ingest'.",
)
@click.option(
    "--out",
    default=Path("runs/train"),
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
    type=click.Choice((AUTO, *MODEL_NAMES)),
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
    "--loss", default=default_of(LossSpec, "name"), show_default=True, type=click.Choice(LOSS_NAMES)
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
    type=click.Choice(AUG_LEVELS),
    help="none; light = flips + rot90; full = light + brightness/contrast, affine, cut-out.",
)
@click.option("--epochs", type=int, default=default_of(TrainConfig, "epochs"), show_default=True)
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
    help="patches:N (N held-out windows, excluded from training), fragment:ID, or none.",
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
@click.option("--resume", is_flag=True, help="Continue the run in --out from last.pt.")
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
@click.option("--quiet", is_flag=True, help="No progress bars.")
def train_command(
    store: Path,
    out: Path,
    layers: str,
    fragments: tuple[str, ...],
    model: str,
    encoder: str | None,
    encoder_weights: str,
    output_stride: str | None,
    loss: str,
    focal_alpha: float,
    focal_gamma: float,
    label_smoothing: float,
    val: str,
    quiet: bool,
    **options: object,
) -> None:
    """Train a model on crops streamed from a store; keep the best validation F0.5.

    Crops of the chosen layers are read straight from the Zarr store through a bounded
    chunk cache, so memory does not grow with the fragment size or the layer count.
    Launched under torchrun (e.g. torchrun --nproc-per-node 2 -m inkpipe.cli train ...)
    it trains with DistributedDataParallel.
    """
    from inkpipe.train.loop import train

    layer_range = parse_layers(layers)
    cfg = TrainConfig(
        store=store,
        out=out,
        layers=layer_range,
        fragments=fragments or None,
        model=model_spec(model, layer_range.k, encoder, encoder_weights),
        output_stride=None if output_stride is None else int(output_stride),
        loss=LossSpec(
            name=loss,
            focal_alpha=focal_alpha,
            focal_gamma=focal_gamma,
            label_smoothing=label_smoothing,
        ),
        val=parse_validation(val),
        progress=not quiet,
        **options,  # type: ignore[arg-type]
    )
    train(cfg, log=click.echo)
