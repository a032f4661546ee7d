"""``inkpipe synth``, ``inkpipe ingest`` and ``inkpipe info``: the commands of ``pipeline``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from inkpipe.pipeline.ingest import IngestConfig
from inkpipe.pipeline.store import Codec, Shuffle, StoreSettings
from inkpipe.pipeline.synth import SynthConfig

from .options import choice_of, default_of


def _setting_help(text: str, name: str, tail: str = ".") -> str:
    """Return ``text`` with the default of ``StoreSettings.name`` in brackets, then ``tail``."""
    return f"{text} [{default_of(StoreSettings, name)}]{tail}"


@click.command("synth")
@click.argument("out", type=click.Path(path_type=Path))
@click.option(
    "--train",
    "n_train",
    type=int,
    default=default_of(SynthConfig, "n_train"),
    show_default=True,
    help="Training fragments.",
)
@click.option(
    "--test",
    "n_test",
    type=int,
    default=default_of(SynthConfig, "n_test"),
    show_default=True,
    help="Test fragments.",
)
@click.option(
    "--height",
    "height_px",
    type=int,
    default=default_of(SynthConfig, "height_px"),
    show_default=True,
    help="Rows (real: 8181).",
)
@click.option(
    "--width",
    "width_px",
    type=int,
    default=default_of(SynthConfig, "width_px"),
    show_default=True,
    help="Columns (real: 6330).",
)
@click.option(
    "--layers",
    type=int,
    default=default_of(SynthConfig, "layers"),
    show_default=True,
    help="CT layers per fragment.",
)
@click.option(
    "--seed",
    type=int,
    default=default_of(SynthConfig, "seed"),
    show_default=True,
    help="Random seed (same seed, same files).",
)
def synth_command(
    out: Path, n_train: int, n_test: int, height_px: int, width_px: int, layers: int, seed: int
) -> None:
    """Write synthetic fragments in the real Kaggle layout to OUT.

    OUT/train/<id>/ get surface_volume/00.tif…, mask.png, inklabels.png and ir.png;
    OUT/test/<id>/ the same without labels, whose truth goes to OUT/truth/<id>.png.
    """
    from inkpipe.pipeline.synth import synthesize

    cfg = SynthConfig(
        out=out,
        n_train=n_train,
        n_test=n_test,
        height_px=height_px,
        width_px=width_px,
        layers=layers,
        seed=seed,
    )
    for frag in synthesize(cfg, progress=True):
        click.echo(f"{frag.split:5s} fragment {frag.id}: {frag.path}")


# The store settings default to None: an option given overrides the manifest's ``ingest:``
# section, which overrides StoreSettings (see resolve_settings); the help shows the latter.
@click.command("ingest")
@click.argument("fragments", type=click.Path(path_type=Path))
@click.option(
    "--out",
    required=True,
    type=click.Path(path_type=Path),
    help="The Zarr store to create or update (e.g. store.zarr).",
)
@click.option(
    "--manifest",
    type=click.Path(path_type=Path),
    default=default_of(IngestConfig, "manifest"),
    help="YAML naming the fragments, their paths, shapes and groups "
    "(see data_manifest.yaml). Default: discover fragments in FRAGMENTS.",
)
@click.option(
    "--fragment", "fragment_ids", multiple=True, help="Only ingest this fragment id (repeatable)."
)
@click.option(
    "--workers",
    type=int,
    default=default_of(IngestConfig, "workers"),
    show_default=True,
    help="Parallel dask threads.",
)
@click.option(
    "--scheduler",
    default=default_of(IngestConfig, "scheduler"),
    help="Address of a dask.distributed scheduler (e.g. tcp://host:8786).",
)
@click.option("--overwrite", is_flag=True, help="Redo fragments even if unchanged.")
@click.option(
    "--direct-io/--no-direct-io",
    default=default_of(IngestConfig, "direct_io"),
    show_default=True,
    help="Read the slices and write the chunks past the page cache (O_DIRECT) where the file "
    "system allows it: each byte passes once, at a fraction of the CPU. --no-direct-io goes "
    "through the page cache.",
)
@click.option(
    "--chunk-layers", type=int, default=None, help=_setting_help("Layers per chunk", "chunk_layers")
)
@click.option(
    "--chunk-px",
    type=int,
    default=None,
    help=_setting_help("Chunk height and width in px", "chunk_px"),
)
@click.option(
    "--codec",
    type=choice_of(Codec),
    default=None,
    help=_setting_help("Blosc compressor", "codec"),
)
@click.option(
    "--clevel", type=int, default=None, help=_setting_help("Compression level 0-9", "clevel")
)
@click.option(
    "--shuffle",
    type=choice_of(Shuffle),
    default=None,
    help=_setting_help(
        "Blosc pre-filter", "shuffle", ": bitshuffle stores ~7 % less but decodes 4x slower."
    ),
)
@click.option(
    "--tile", "tile_px", type=int, default=None, help=_setting_help("Window size in px", "tile_px")
)
@click.option(
    "--stride",
    "stride_px",
    type=int,
    default=None,
    help=_setting_help("Window stride in px", "stride_px"),
)
@click.option(
    "--min-coverage",
    type=float,
    default=None,
    help=_setting_help("Minimum papyrus fraction of a valid window", "min_coverage"),
)
@click.option("--quiet", is_flag=True, help="No progress bars.")
def ingest_command(
    fragments: Path,
    out: Path,
    manifest: Path | None,
    fragment_ids: tuple[str, ...],
    workers: int,
    scheduler: str | None,
    overwrite: bool,
    direct_io: bool,
    quiet: bool,
    **settings: Any,
) -> None:
    """Turn fragment folders into one chunked, compressed Zarr store.

    FRAGMENTS is a folder laid out like the Kaggle data (train/<id>/, test/<id>/), a folder
    of fragment folders, or one fragment folder. Each fragment gets its volume, mask, labels,
    IR image, an index of valid windows with their ink-pixel counts, and per-layer statistics.
    Re-running skips unchanged fragments and redoes any left incomplete by an interruption.
    """
    # Looked up at call time, so tests can replace ``inkpipe.pipeline.ingest.ingest``.
    from inkpipe.pipeline.ingest import ingest, resolve_settings

    cfg = IngestConfig(
        root=fragments,
        out=out,
        manifest=manifest,
        settings=resolve_settings(manifest, settings),
        workers=workers,
        scheduler=scheduler,
        overwrite=overwrite,
        fragment_ids=fragment_ids or None,
        progress=not quiet,
        direct_io=direct_io,
    )
    results = ingest(cfg, log=click.echo)
    done = sum(r.status == "ingested" for r in results)
    click.echo(f"store {out}: {done} fragment(s) ingested, {len(results) - done} unchanged")


@click.command("info")
@click.argument("store", type=click.Path(path_type=Path))
def info_command(store: Path) -> None:
    """Show the fragments of a store: shapes, windows, size on disk, compression."""
    from inkpipe.pipeline.info import format_summaries, summarize_store

    click.echo(format_summaries(summarize_store(store)))
