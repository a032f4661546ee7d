"""``inkpipe predict``: parse options into a config, call one function."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from inkpipe.infer.engine import Precision
from inkpipe.infer.predict import RECORD, PredictConfig, format_predictions, predict
from inkpipe.infer.tta import TtaMode
from inkpipe.pipeline.errors import ConfigError

from .configfile import given_on_command_line, read_config_file
from .options import choice_of, default_of, device_option


def predict_config(
    params: dict[str, Any], given: frozenset[str], config_file: Path | None = None
) -> PredictConfig:
    """Return the :class:`PredictConfig` of the parsed options ``params``.

    Without ``config_file`` every option counts. With it, the config starts from the file's
    fields (a YAML file of PredictConfig fields, or the ``predict.json`` of an earlier
    prediction) and only the options in ``given`` (those on the command line) override them;
    FRAGMENT arguments replace the file's list, and so do ``--checkpoint`` options.

    Raises:
        ConfigError: no output folder given, or a bad value.
    """
    p = dict(params)
    quiet = p.pop("quiet")
    if config_file is None:
        fields: dict[str, Any] = {}
        given = frozenset(p) | {"quiet"}
    else:
        fields = read_config_file(config_file, PredictConfig, section="config")
        given &= frozenset(p) | {"quiet"}  # not --config itself
    fields.update({name: p[name] for name in given - {"quiet"}})
    if "quiet" in given:
        fields["progress"] = not quiet
    if fields.get("out") is None:
        raise ConfigError(
            "no output folder given; pass --out OUT, or a --config file with an out: line"
        )
    fields.setdefault("checkpoints", ())
    fields.setdefault("fragments", ())
    return PredictConfig(**fields)


@click.command("predict", short_help="Predict ink on fragments; write submission.csv and pictures.")
@click.argument("fragments", nargs=-1)
@click.option(
    "--config",
    "config_file",
    type=click.Path(path_type=Path),
    help=f"YAML file of PredictConfig fields, or the {RECORD} of an earlier prediction; the "
    "options and FRAGMENT arguments given on the command line override it.",
)
@click.option(
    "--checkpoint",
    "checkpoints",
    multiple=True,
    type=click.Path(path_type=Path),
    help="Checkpoint written by 'inkpipe train' (e.g. runs/a/best.pt). Required; repeat it to "
    "average an ensemble of models trained with the same --layers and tile size.",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    help="Output folder: submission.csv, <id>_probability.png, <id>_mask.png, "
    "<id>_overlay.png, predict.json.",
)
@click.option(
    "--store",
    type=click.Path(path_type=Path),
    default=default_of(PredictConfig, "store"),
    help="Predict fragments already ingested in this store; FRAGMENT are then fragment ids. "
    "Without it, FRAGMENT are fragment folders, ingested into OUT/.ingest.zarr first, or Zarr "
    "volumes, read in place.",
)
@click.option(
    "--mask",
    "masks",
    multiple=True,
    type=click.Path(path_type=Path),
    help="Papyrus mask image (white = papyrus) of a Zarr volume FRAGMENT, of its (y, x) size; "
    "one per Zarr volume, in the same order.",
)
@click.option(
    "--save-probabilities",
    is_flag=True,
    help="Also write each probability map as OUT/<id>_probability.tif: uint8 (probability x "
    "255), 256 px tiles, zlib-compressed, BigTIFF when large.",
)
@click.option(
    "--save-ome-zarr",
    is_flag=True,
    help="Also write each probability map as OUT/<id>_probability.ome.zarr: an OME-Zarr 0.5 "
    "image (uint8) with 2x downsampled levels down to below 1024 px, for napari or "
    "neuroglancer.",
)
@click.option(
    "--overlap",
    type=float,
    default=default_of(PredictConfig, "overlap"),
    show_default=True,
    help="Fraction of a tile shared by neighbouring windows, 0…0.95 (stride = tile x (1 - "
    "overlap)).",
)
@click.option(
    "--tta",
    default=default_of(PredictConfig, "tta"),
    show_default=True,
    type=choice_of(TtaMode),
    help="Test-time augmentation: none (1 pass), flips (4 passes), flips+rot90 (8 passes).",
)
@click.option(
    "--threshold",
    type=float,
    default=default_of(PredictConfig, "threshold"),
    help="Ink where probability >= THRESHOLD, 0…1. Default: the mean of the checkpoints' "
    "validation thresholds.",
)
@click.option(
    "--open-px",
    type=int,
    default=default_of(PredictConfig, "open_px"),
    show_default=True,
    help="Radius of the morphological opening that removes specks, px (0: off).",
)
@click.option(
    "--min-area",
    type=int,
    default=default_of(PredictConfig, "min_area"),
    show_default=True,
    help="Drop ink blobs smaller than this many pixels (0: keep all).",
)
@click.option(
    "--batch-size",
    type=int,
    default=default_of(PredictConfig, "batch_size"),
    show_default=True,
    help="Windows per model call.",
)
@device_option(PredictConfig)
@click.option(
    "--precision",
    default=default_of(PredictConfig, "precision"),
    show_default=True,
    type=choice_of(Precision),
    help="The model's arithmetic: auto (float16 autocast on CUDA, float32 on the CPU), fp32, "
    "fp16 or bf16 (autocast).",
)
@click.option(
    "--compile",
    is_flag=True,
    default=default_of(PredictConfig, "compile"),
    help="Run the models through torch.compile (slow to start, faster per window on a GPU); "
    "if compiling fails, a one-line warning and the uncompiled model.",
)
@click.option(
    "--cache-mb",
    type=float,
    default=default_of(PredictConfig, "cache_mb"),
    show_default=True,
    help="Budget of the decoded-chunk cache, MB.",
)
@click.option(
    "--canvas-budget-mb",
    type=float,
    default=default_of(PredictConfig, "canvas_budget_mb"),
    show_default=True,
    help="Blend canvases above this many MB are memory-mapped in a temporary folder in OUT.",
)
@click.option(
    "--trust-checkpoint",
    is_flag=True,
    help="Load checkpoints with the full pickle, which can run code hidden in the file. "
    "Without it a checkpoint is read as tensors and plain values only (all that 'inkpipe "
    "train' writes) and a file holding anything else is refused. Only for files you trust.",
)
@click.option("--quiet", is_flag=True, help="No progress bars.")
def predict_command(config_file: Path | None, **params: Any) -> None:
    """Predict ink on fragments; write submission.csv and pictures to OUT.

    FRAGMENT is a fragment folder (surface_volume/00.tif …, mask.png, optional ir.png), a
    fragment id of --store, or a Zarr surface volume: a path or fsspec URL (s3://, https://,
    memory://) of a (z, y, x) uint16 or uint8 array, or of a group holding one (an OME-Zarr
    image: its level 0), given with its --mask image and read in place (only the model's
    layers; no ingest). Each fragment is predicted tile by tile with Gaussian blending, TTA
    and the average of the checkpoints, thresholded, cleaned and run-length encoded.

    \b
    Examples:
      inkpipe predict --checkpoint runs/a/best.pt data/test/a data/test/b --out pred/
      inkpipe predict --checkpoint runs/a/best.pt s3://bucket/segment.zarr --mask mask.png \\
        --save-probabilities --save-ome-zarr --out pred/
      inkpipe predict --checkpoint f1.pt --checkpoint f2.pt --store store.zarr a --out pred/
      inkpipe predict --config pred/predict.json --tta none --out pred2/
    """  # noqa: D301  (a real backspace: click's marker for "do not rewrap")
    given = given_on_command_line(click.get_current_context())
    cfg = predict_config(params, given, config_file)
    results = predict(cfg, log=click.echo)
    click.echo(format_predictions(results, cfg.out))
