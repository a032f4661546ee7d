"""``inkpipe predict``: checkpoints + fragments -> submission CSV, probability maps and pictures.

For each fragment the model's layer range is read lazily from the store through a bounded
chunk cache (:class:`~inkpipe.pipeline.volume.VolumeView`), predicted tile by tile with
Gaussian blending (:func:`~inkpipe.numerics.blending.sliding_window_predict`; windows without
papyrus are skipped), through TTA and an ensemble of checkpoints, then thresholded and cleaned
(:func:`~inkpipe.infer.postprocess.postprocess`) and run-length encoded. Raw fragment folders
are first ingested into ``OUT/.ingest.zarr`` with the ordinary ingest (unchanged fragments are
skipped on a rerun). Plain Zarr surface volumes (a path or fsspec URL, each with a ``--mask``
image) are read in place, without an ingest (:mod:`~inkpipe.infer.sources`).

Memory on a real fragment (8181 x 6330 px): the blend canvases (weighted sum, weights and the
result, float32, 207 MB each) stay in RAM up to ``canvas_budget_mb`` and go to memory maps in
a temporary folder inside ``OUT`` above it; the chunk cache is bounded by ``cache_mb``; the
2-D outputs are uint8 (1 byte per pixel), and the overlay is drawn at most 4096 px on its long
side. Axis order is (y, x) for images, (z, y, x) for volumes.

Outputs in ``OUT``: ``submission.csv`` (``Id,Predicted``, one row per fragment, in the order
given), per fragment ``<id>_probability.png`` (probability x 255), ``<id>_mask.png``
(0/255), ``<id>_overlay.png`` (RGB picture), and ``predict.json`` (the resolved settings and
per-fragment results, so the outputs say how they were made); on request the probability map
also as ``<id>_probability.tif`` (tiled, compressed) and ``<id>_probability.ome.zarr``
(OME-Zarr with a pyramid; :mod:`~inkpipe.infer.outputs`).
"""

from __future__ import annotations

import functools
import json
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image
from tqdm.auto import tqdm

from inkpipe.numerics.blending import sliding_window_predict
from inkpipe.pipeline import __version__
from inkpipe.pipeline.checks import check_int, check_number, repeated
from inkpipe.pipeline.disk import check_free, disk_full_as_error
from inkpipe.pipeline.errors import (
    ConfigError,
    InputNotFoundError,
    InvalidInputError,
    check_choice,
)
from inkpipe.pipeline.files import atomic_write
from inkpipe.pipeline.fragments import SLICE_DIR, discover_fragments, is_fragment_dir, list_slices
from inkpipe.pipeline.images import write_png
from inkpipe.pipeline.ingest import IngestConfig, ingest
from inkpipe.pipeline.layers import LayerRange
from inkpipe.pipeline.memory import retain_freed_memory
from inkpipe.pipeline.store import Fragment, open_fragment, open_store
from inkpipe.pipeline.text import format_table
from inkpipe.pipeline.volume import NormMode, VolumeView, normalizer_for
from inkpipe.pipeline.windows import grid_windows, holds_valid_pixel
from inkpipe.train.checkpoint import (
    DEVICES,
    Checkpoint,
    check_device,
    load_checkpoint,
    model_from_checkpoint,
    select_device,
)

from .engine import Precision, device_predictor, host_predictor
from .outputs import (
    ome_zarr_bytes_bound,
    tiff_bytes_bound,
    write_probability_ome_zarr,
    write_probability_tiff,
)
from .postprocess import postprocess
from .rle import encode_rle, write_submission
from .sources import ZarrFragment, is_zarr_source, open_zarr_fragments, summarize_sources
from .tta import TtaMode, ensemble, with_tta

__all__ = [
    "DEVICES",
    "FragmentPrediction",
    "PredictConfig",
    "count_windows",
    "format_predictions",
    "predict",
    "render_overlay",
    "stride_for",
]

MAX_OVERLAP = 0.95
OVERLAY_MAX_PX = 4096
INGEST_STORE = ".ingest.zarr"
SUBMISSION = "submission.csv"
RECORD = "predict.json"

# Overlay look: papyrus in gray, outside it darkened to 35 %, ink tinted magenta at alpha 0.5.
OVERLAY_DARKEN = 0.35
OVERLAY_ALPHA = 0.5
OVERLAY_COLOR = (255.0, 0.0, 200.0)

_ROWS = 1024  # rows per block in full-size conversions, to bound float temporaries
PNG_LEVEL = 1  # zlib level of the pictures: 2.5-5x faster than PIL's 6 at 2048 px, 20-50 % larger

Array2D = NDArray[np.uint8]
BatchPredictor = Callable[[NDArray[np.float32]], NDArray[np.float32]]


@dataclass(frozen=True)
class PredictConfig:
    """Everything ``predict`` needs.

    Attributes:
        checkpoints: one or more ``inkpipe train`` checkpoints; all must read the same layer
            range with the same tile size. Their probabilities are averaged (an ensemble).
        fragments: raw fragment folders (with ``surface_volume/``) and Zarr volumes (a path
            or fsspec URL of a (z, y, x) array or of a group holding one; see
            :mod:`~inkpipe.infer.sources`), or fragment ids when ``store`` is given.
            Submission rows follow this order.
        masks: one papyrus mask image per Zarr volume in ``fragments``, in the same order.
        out: output folder (created).
        store: predict fragments already ingested in this store (then ``fragments`` are ids).
        overlap: fraction of a tile shared by neighbouring windows, in [0, 0.95];
            ``stride_px = round(tile_px * (1 - overlap))``.
        tta: test-time augmentation: ``none``, ``flips`` (4 passes), ``flips+rot90`` (8).
        threshold: ink where probability >= threshold, in [0, 1]; None: the mean of the
            checkpoints' validation thresholds.
        open_px: radius of the morphological opening that removes specks (0: off).
        min_area: drop ink blobs smaller than this many pixels (0: keep all).
        batch_size: windows per model call.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (see :mod:`inkpipe.train.devices`).
        precision: the model's arithmetic (:class:`~inkpipe.infer.engine.Precision`):
            ``auto`` (float16 autocast on CUDA, float32 on the CPU), ``fp32``, ``fp16``,
            ``bf16``.
        compile: run the models through ``torch.compile`` (falls back to the uncompiled
            model, with a one-line warning, if compiling fails).
        cache_mb: budget of the decoded-chunk cache.
        canvas_budget_mb: blend canvases (sum, weights, result: 12 bytes per pixel) above this
            go to memory maps in a temporary folder inside ``out``, deleted afterwards.
        progress: show a progress bar over windows.
        trust_checkpoint: load checkpoints with the full pickle (it can run code they carry)
            instead of tensors and plain values only; for trusted files only.
        save_probabilities: also write each probability map as ``<id>_probability.tif``
            (uint8, tiled, zlib-compressed (Big)TIFF).
        save_ome_zarr: also write it as ``<id>_probability.ome.zarr`` (OME-Zarr 0.5 image
            with a 2x pyramid).
    """

    checkpoints: tuple[Path, ...]
    fragments: tuple[str, ...]
    out: Path
    store: Path | None = None
    overlap: float = 0.5
    tta: TtaMode = TtaMode.FLIPS
    threshold: float | None = None
    open_px: int = 1
    min_area: int = 0
    batch_size: int = 16
    device: str = "auto"
    precision: Precision = Precision.AUTO
    compile: bool = False
    cache_mb: float = 512
    canvas_budget_mb: float = 1024
    progress: bool = True
    trust_checkpoint: bool = False
    masks: tuple[Path, ...] = ()
    save_probabilities: bool = False
    save_ome_zarr: bool = False

    def __post_init__(self) -> None:
        """Normalize paths and check every value (raises :class:`ConfigError`)."""
        object.__setattr__(self, "checkpoints", tuple(Path(p) for p in self.checkpoints))
        object.__setattr__(self, "fragments", tuple(str(f) for f in self.fragments))
        object.__setattr__(self, "out", Path(self.out))
        object.__setattr__(self, "masks", tuple(Path(p) for p in self.masks))
        if self.store is not None:
            object.__setattr__(self, "store", Path(self.store))
            if self.masks:
                raise ConfigError(
                    "--mask is for Zarr volumes; fragments of --store have their masks "
                    "already: drop --mask, or drop --store and pass the Zarr volumes"
                )
        if not self.checkpoints:
            raise ConfigError(
                "no checkpoint given; pass --checkpoint RUN/best.pt (repeat it to ensemble "
                "several models)"
            )
        if not self.fragments:
            where = "fragment ids of the store" if self.store else "fragment folders"
            raise ConfigError(f"no fragment given; pass one or more {where}")
        dupes = repeated(self.fragments)
        if dupes:
            raise ConfigError(f"fragments given twice: {dupes}; pass each fragment once")
        object.__setattr__(self, "tta", check_choice("TTA mode", self.tta, TtaMode))
        check_device(self.device)
        check_number(
            "overlap", self.overlap, 0, MAX_OVERLAP, hint="0.5 (half a tile) is the usual choice"
        )
        if self.threshold is not None:
            check_number(
                "threshold",
                self.threshold,
                0,
                1,
                hint="omit it to use the checkpoints' validation threshold",
            )
        for name, minimum in (("open_px", 0), ("min_area", 0), ("batch_size", 1)):
            object.__setattr__(self, name, check_int(name, getattr(self, name), minimum))
        object.__setattr__(self, "precision", check_choice("precision", self.precision, Precision))
        check_number("cache_mb", self.cache_mb, 0, low_open=True, hint="e.g. 512")
        check_number("canvas_budget_mb", self.canvas_budget_mb, 0, hint="0 always uses memory maps")


@dataclass(frozen=True)
class FragmentPrediction:
    """What ``predict`` produced for one fragment.

    Attributes:
        id: fragment id; shape: (H, W) in pixels.
        ink_fraction: share of the papyrus (mask) pixels predicted as ink, in [0, 1].
        probability_png, mask_png, overlay_png: the pictures written.
        seconds: wall time for this fragment (prediction, post-processing, pictures).
        probability_tif, probability_ome_zarr: the probability map as TIFF and OME-Zarr,
            when asked for.
    """

    id: str
    shape: tuple[int, int]
    ink_fraction: float
    probability_png: Path
    mask_png: Path
    overlay_png: Path
    seconds: float
    probability_tif: Path | None = None
    probability_ome_zarr: Path | None = None


@dataclass(frozen=True)
class _Models:
    """Loaded checkpoints that agree on what they read."""

    checkpoints: tuple[Checkpoint, ...]
    layers: LayerRange
    tile_px: int
    normalize: NormMode


def stride_for(tile_px: int, overlap: float) -> int:
    """Return the window stride in pixels: ``round(tile_px * (1 - overlap))``, at least 1."""
    return max(1, round(tile_px * (1 - overlap)))


def load_models(paths: Sequence[Path], *, trust: bool = False) -> _Models:
    """Load checkpoints and check they read the same layers with the same tile size.

    Args:
        paths: the checkpoint files.
        trust: load them with the full pickle (see :func:`load_checkpoint`).

    Raises:
        InputNotFoundError: a checkpoint file is missing.
        InvalidInputError: a file is not an inkpipe checkpoint, or holds objects only a
            trusted load may read (``UnsafeCheckpointError``).
        ConfigError: two checkpoints disagree (both are named).
    """
    ckpts = tuple(load_checkpoint(p, trust=trust) for p in paths)
    first = ckpts[0]
    norms = [checkpoint_normalize(c) for c in ckpts]
    for other, norm in zip(ckpts[1:], norms[1:]):
        if norm is not norms[0]:
            raise ConfigError(
                f"checkpoints disagree: {first.path} normalises CT values per {norms[0]}, "
                f"{other.path} per {norm}; ensemble only models trained with the same "
                "--normalize"
            )
        if (other.layers, other.tile_px) != (first.layers, first.tile_px):
            raise ConfigError(
                f"checkpoints disagree: {first.path} reads layers {first.layers} with "
                f"{first.tile_px} px tiles, {other.path} reads layers {other.layers} with "
                f"{other.tile_px} px tiles; ensemble only models trained with the same "
                "--layers and tile size"
            )
    return _Models(ckpts, first.layers, first.tile_px, norms[0])


def checkpoint_normalize(ckpt: Checkpoint) -> NormMode:
    """Return how ``ckpt``'s model saw CT values: its ``normalize`` setting, else ``layer``.

    Checkpoints written before ``--normalize`` existed normalised each layer by itself.
    """
    return NormMode(ckpt.config.get("normalize", NormMode.LAYER))


def build_predictor(
    models: _Models,
    device: str,
    tta: TtaMode | str,
    precision: Precision | str = Precision.AUTO,
    compile: bool = False,
    warn: Callable[[str], None] | None = None,
) -> BatchPredictor:
    """Return ``(B, k, t, t) float32 -> (B, t, t) float32`` ink probabilities.

    Everything between one copy of the batch to the device and one copy of the probabilities
    back runs on the device (:mod:`~inkpipe.infer.engine`): each checkpoint's model gives
    probabilities (after the sigmoid) under the autocast of ``precision``, optionally
    compiled; TTA wraps each of them (so flips are undone on probabilities), and the ensemble
    averages them.

    Args:
        models: the loaded checkpoints.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        tta: a :class:`~inkpipe.infer.tta.TtaMode` or its value.
        precision: a :class:`~inkpipe.infer.engine.Precision` or its value.
        compile: run the models through ``torch.compile``.
        warn: where a failed compile's one-line warning goes (default: ``warnings.warn``).
    """
    dev = select_device(device)
    mode = check_choice("TTA mode", tta, TtaMode)
    members = [
        with_tta(device_predictor(model_from_checkpoint(ck), dev, precision, compile, warn), mode)
        for ck in models.checkpoints
    ]
    return host_predictor(ensemble(members), dev)


def _resolve_store_fragments(cfg: PredictConfig) -> list[Fragment]:
    """Open the requested fragments of ``cfg.store``, all of them checked before any is used."""
    assert cfg.store is not None
    root = open_store(cfg.store)
    return [open_fragment(root, fragment_id) for fragment_id in cfg.fragments]


def _check_folders(fragments: Sequence[str], layers: LayerRange) -> list[Path]:
    """Check the raw fragment folders cheaply (before ingesting) and return them resolved."""
    folders = []
    for given in fragments:
        folder = Path(given)
        if not folder.is_dir():
            raise InputNotFoundError(
                f"fragment folder not found: {folder}; pass fragment folders (holding "
                f"{SLICE_DIR}/), or fragment ids together with --store STORE"
            )
        if not is_fragment_dir(folder):
            inner = [c for c in sorted(folder.iterdir()) if is_fragment_dir(c)]
            hint = (
                f"it holds fragment folders: pass them, e.g. {' '.join(str(c) for c in inner[:3])}"
                if inner
                else f"a fragment folder holds {SLICE_DIR}/00.tif … and mask.png"
            )
            raise InvalidInputError(f"{folder} is not a fragment folder (no {SLICE_DIR}/); {hint}")
        folder = folder.resolve()
        (source,) = discover_fragments(folder)
        layers.check(len(list_slices(source)), where=f"fragment {source.id} ({folder})")
        folders.append(folder)
    dupes = repeated(f.name for f in folders)
    if dupes:
        raise InvalidInputError(
            f"several folders are named {dupes}; fragment ids come from folder names and must "
            "be unique in one prediction"
        )
    return folders


def resolve_fragments(
    cfg: PredictConfig,
    layers: LayerRange,
    log: Callable[[str], None] = print,
    normalize: NormMode = NormMode.FRAGMENT,
) -> list[Fragment | ZarrFragment]:
    """Return the fragments to predict, in the order given, ingesting raw folders first.

    Zarr volumes and folders are all checked before the first is ingested or read; then the
    volumes' layer statistics are computed inside their masks: of every layer for
    ``normalize`` ``fragment`` (as ingest stores them), else of ``layers``.

    Raises:
        StoreError: an id is not in the store (the message lists the ids there are).
        InputNotFoundError / InvalidInputError: a folder or volume is missing or is not a
            fragment (see :func:`~inkpipe.infer.sources.open_zarr_fragment`).
        ConfigError: the model's layers do not fit a fragment; not one mask per volume.
    """
    fragments: list[Fragment | ZarrFragment]
    if cfg.store is not None:
        fragments = list(_resolve_store_fragments(cfg))
    else:
        volumes = [f for f in cfg.fragments if is_zarr_source(f)]
        every = normalize is NormMode.FRAGMENT
        sources = {s.given: s for s in open_zarr_fragments(volumes, cfg.masks, layers, every)}
        given_folders = [f for f in cfg.fragments if f not in sources]
        folders = dict(zip(given_folders, _check_folders(given_folders, layers)))
        dupes = repeated([s.id for s in sources.values()] + [f.name for f in folders.values()])
        if dupes:
            raise InvalidInputError(
                f"several inputs have the fragment id {dupes}; ids come from the folder and "
                "Zarr volume names (without .zarr) and must be unique in one prediction"
            )
        if folders:
            store = cfg.out / INGEST_STORE
            for folder in folders.values():
                ingest(IngestConfig(root=folder, out=store, progress=cfg.progress), log=log)
            root = open_store(store)
        summarize_sources(list(sources.values()), log)
        fragments = [
            sources[f] if f in sources else open_fragment(root, folders[f].name)
            for f in cfg.fragments
        ]
    for frag in fragments:
        layers.check(frag.meta.layers, where=f"fragment {frag.id}")
    return fragments


def count_windows(valid: NDArray[Any], tile_px: int, stride_px: int) -> int:
    """Count the grid windows holding at least one valid pixel (those that get predicted).

    The windows :func:`~inkpipe.numerics.blending.sliding_window_predict` predicts: those of
    :func:`~inkpipe.pipeline.windows.grid_windows` that pass
    :func:`~inkpipe.pipeline.windows.holds_valid_pixel`.

    Args:
        valid: (H, W) bool or non-negative integer array, nonzero where valid (the papyrus
            mask).
        tile_px: window side in pixels; stride_px: step between windows.
    """
    origins = grid_windows(valid.shape[0], valid.shape[1], tile_px, stride_px)
    return int(np.count_nonzero(holds_valid_pixel(valid, origins, tile_px)))


def _with_progress(predictor: BatchPredictor, bar: Any) -> BatchPredictor:
    """Advance ``bar`` by the batch size after every predictor call."""

    def run(batch: NDArray[np.float32]) -> NDArray[np.float32]:
        out = predictor(batch)
        bar.update(len(batch))
        return out

    return run


def probability_to_uint8(prob: NDArray[np.float32]) -> Array2D:
    """Scale (H, W) float32 probabilities in [0, 1] to (H, W) uint8 0…255, rounded."""
    out = np.empty(prob.shape, dtype=np.uint8)
    for lo in range(0, prob.shape[0], _ROWS):
        block = prob[lo : lo + _ROWS] * np.float32(255)
        block += np.float32(0.5)
        np.clip(block, 0, 255, out=block)
        out[lo : lo + _ROWS] = block
    return out


def stretch_to_uint8(image: NDArray[Any], low: float, high: float) -> Array2D:
    """Map ``[low, high]`` of a (H, W) image linearly to 0…255 (clipped), as uint8."""
    span = max(float(high) - float(low), 1e-6)
    out = np.empty(image.shape, dtype=np.uint8)
    for lo in range(0, image.shape[0], _ROWS):
        block = image[lo : lo + _ROWS].astype(np.float32)
        block -= np.float32(low)
        block *= np.float32(255 / span)
        np.clip(block + np.float32(0.5), 0, 255, out=block)
        out[lo : lo + _ROWS] = block
    return out


def overlay_background(frag: Fragment | ZarrFragment, layers: LayerRange) -> tuple[Array2D, str]:
    """Return the gray picture under the overlay, (H, W) uint8, and what it is.

    The IR photo when the fragment has one; else the middle layer of the model's range,
    contrast-stretched to its p1…p99 inside the mask (the statistics stored at ingest).
    """
    ir = frag.ir()
    if ir is not None:
        return ir, "IR image"
    mid = layers.start + layers.k // 2
    stats = frag.layer_stats()[mid]
    layer = np.asarray(frag.volume[mid])
    return stretch_to_uint8(layer, stats[2], stats[3]), f"CT layer {mid}"


def _resize(image: Array2D, size: tuple[int, int]) -> Array2D:
    """Resize a uint8 (H, W) image to ``size`` = (W, H) with area averaging."""
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BOX))


@functools.cache
def _overlay_tables() -> tuple[NDArray[np.uint8], NDArray[np.uint8]]:
    """Look-up tables of :func:`render_overlay`, indexed by ``(a << 8) | b`` of two uint8.

    ``base[(gray << 8) | papyrus]`` is the gray darkened by how far the pixel lies outside the
    papyrus, (65536,) uint8; ``tint[(base << 8) | ink]`` is the RGB of that gray tinted by
    the ink's alpha, (65536, 3) uint8. Two look-ups per pixel instead of float arithmetic on
    three channels (several times faster), within one level of the float formula.
    """
    v = np.arange(256, dtype=np.float64)
    base = v[:, None] * (OVERLAY_DARKEN + (1 - OVERLAY_DARKEN) * v[None, :] / 255)
    alpha = v[None, :] * (OVERLAY_ALPHA / 255)
    tint = np.stack([v[:, None] * (1 - alpha) + c * alpha for c in OVERLAY_COLOR], axis=-1)

    def table(values: NDArray[np.float64]) -> NDArray[np.uint8]:
        return np.clip(values + 0.5, 0, 255).astype(np.uint8).reshape(65536, *values.shape[2:])

    return table(base), table(tint)


def render_overlay(
    gray: Array2D, papyrus: Array2D, ink: Array2D, max_px: int = OVERLAY_MAX_PX
) -> tuple[NDArray[np.uint8], float]:
    """Draw predicted ink over a gray picture of the fragment.

    Papyrus is shown in gray, the outside of the papyrus darkened, ink tinted magenta with
    alpha 0.5. Pictures larger than ``max_px`` on their long side are reduced first (area
    averaging, so thin strokes stay visible as a lighter tint).

    Args:
        gray: (H, W) uint8 picture (IR or a CT layer).
        papyrus: (H, W) uint8, nonzero on papyrus.
        ink: (H, W) uint8, nonzero where ink was predicted.
        max_px: longest side of the result.

    Returns:
        ((h, w, 3) uint8 RGB picture, scale = h / H <= 1).
    """
    height, width = gray.shape
    scale = min(1.0, max_px / max(height, width))
    papyrus_u8 = np.where(papyrus != 0, np.uint8(255), np.uint8(0))
    ink_u8 = np.where(ink != 0, np.uint8(255), np.uint8(0))
    if scale < 1:
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        gray, papyrus_u8, ink_u8 = (_resize(a, size) for a in (gray, papyrus_u8, ink_u8))
    base_of, tint_of = _overlay_tables()
    rgb = np.empty((*gray.shape, 3), dtype=np.uint8)
    for lo in range(0, gray.shape[0], _ROWS):
        rows = slice(lo, lo + _ROWS)
        pair = gray[rows].astype(np.uint16) << 8
        pair |= papyrus_u8[rows]
        base = base_of[pair]  # uint8 papyrus gray, or darkened outside
        pair = base.astype(np.uint16) << 8
        pair |= ink_u8[rows]
        rgb[rows] = tint_of[pair]
    return rgb, gray.shape[0] / height


def _spills(cfg: PredictConfig, shape: tuple[int, int]) -> bool:
    """Whether the blend canvases of a fragment exceed the budget (and go to memory maps)."""
    canvas_mb = 3 * 4 * shape[0] * shape[1] / 2**20  # sum, weights, result; float32
    return canvas_mb > cfg.canvas_budget_mb


def _canvas_dir(cfg: PredictConfig, shape: tuple[int, int]) -> Path | None:
    """Return a fresh temporary folder for memory-mapped canvases if they exceed the budget."""
    if not _spills(cfg, shape):
        return None
    return Path(tempfile.mkdtemp(prefix=".canvas-", dir=cfg.out))


def _png_bytes_bound(height: int, width: int, channels: int = 1) -> int:
    """Bound a PNG of incompressible rows: a filter byte per row, ~1 % deflate framing."""
    return int((height * (width * channels + 1)) * 1.01) + 8192


def output_bytes_bound(cfg: PredictConfig, shapes: Sequence[tuple[int, int]]) -> int:
    """Return an upper bound of the disk space ``predict`` needs for fragments of ``shapes``.

    Per fragment: the probability and mask PNGs and the overlay (and the TIFF and OME-Zarr
    probability maps when asked for); and the memory-mapped blend canvases (sum and weights,
    float32) of the largest fragment whose canvases exceed the budget; they are deleted after
    each fragment. The submission's size is known only at the
    end, and is checked then.
    """
    pictures, canvases = 0, 0
    for height, width in shapes:
        scale = min(1.0, OVERLAY_MAX_PX / max(height, width))
        small = (max(1, round(height * scale)), max(1, round(width * scale)))
        pictures += 2 * _png_bytes_bound(height, width) + _png_bytes_bound(*small, channels=3)
        if cfg.save_probabilities:
            pictures += tiff_bytes_bound(height, width)
        if cfg.save_ome_zarr:
            pictures += ome_zarr_bytes_bound(height, width)
        if _spills(cfg, (height, width)):
            canvases = max(canvases, 2 * (4 * height * width + 8192))
    return pictures + canvases


def _predict_fragment(
    frag: Fragment | ZarrFragment,
    predictor: BatchPredictor,
    models: _Models,
    cfg: PredictConfig,
    threshold: float,
    log: Callable[[str], None],
) -> tuple[FragmentPrediction, str]:
    """Predict, post-process and draw one fragment; return its result and its RLE."""
    t0 = time.perf_counter()
    layers, tile_px = models.layers, models.tile_px
    stride_px = stride_for(tile_px, cfg.overlap)
    mask = frag.mask()
    shape = (int(mask.shape[0]), int(mask.shape[1]))
    view = VolumeView(
        frag.volume,
        layers,
        normalizer_for(frag.layer_stats(), layers, models.normalize),
        cfg.cache_mb,
    )
    n_windows = count_windows(mask, tile_px, stride_px)
    spill = _canvas_dir(cfg, shape)
    if spill is not None:
        log(f"fragment {frag.id}: blend canvases memory-mapped in {spill} (above the budget)")
    bar = tqdm(
        total=n_windows,
        unit="win",
        desc=f"predict {frag.id}",
        disable=not cfg.progress,
        leave=False,
    )
    try:
        prob = sliding_window_predict(
            view,
            _with_progress(predictor, bar),
            tile_px,
            stride_px,
            cfg.batch_size,
            valid=mask,
            out_dir=spill,
        )
    finally:
        bar.close()
        if spill is not None:
            shutil.rmtree(spill, ignore_errors=True)
    del view  # frees the chunk cache
    np.multiply(prob, mask, out=prob)  # no probability outside the papyrus
    prob_u8 = probability_to_uint8(prob)
    # The files are written by two threads (PNG, TIFF and Zarr encoders release the GIL)
    # while this one finds the ink and draws the overlay.
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="inkpipe-outputs") as pool:
        prob_png = pool.submit(
            write_png, cfg.out / f"{frag.id}_probability.png", prob_u8, PNG_LEVEL
        )
        prob_tif = prob_zarr = None
        if cfg.save_probabilities:
            prob_tif = pool.submit(
                write_probability_tiff, cfg.out / f"{frag.id}_probability.tif", prob_u8, frag.id
            )
        if cfg.save_ome_zarr:
            prob_zarr = pool.submit(
                write_probability_ome_zarr,
                cfg.out / f"{frag.id}_probability.ome.zarr",
                prob_u8,
                frag.id,
            )
        del prob_u8  # the writers hold it until they are done
        ink = postprocess(prob, threshold, cfg.open_px, cfg.min_area, papyrus_mask=mask)
        del prob
        mask_png = pool.submit(
            write_png, cfg.out / f"{frag.id}_mask.png", ink * np.uint8(255), PNG_LEVEL
        )
        rle = encode_rle(ink)
        ink_px = int(np.count_nonzero(ink))
        papyrus_px = int(np.count_nonzero(mask))
        gray, what = overlay_background(frag, layers)
        overlay, scale = render_overlay(gray, mask, ink, OVERLAY_MAX_PX)
        del gray, ink
        overlay_png = write_png(cfg.out / f"{frag.id}_overlay.png", overlay, PNG_LEVEL)
    prob_png_path, mask_png_path = prob_png.result(), mask_png.result()  # raise what failed
    prob_tif_path = None if prob_tif is None else prob_tif.result()
    prob_zarr_path = None if prob_zarr is None else prob_zarr.result()
    if scale < 1:
        log(
            f"fragment {frag.id}: overlay reduced to {overlay.shape[1]}x{overlay.shape[0]} px "
            f"({scale:.2f}x) to keep its long side <= {OVERLAY_MAX_PX} px; the probability "
            "and mask pictures are full size"
        )
    seconds = time.perf_counter() - t0
    fraction = ink_px / max(papyrus_px, 1)
    log(
        f"fragment {frag.id}: {shape[0]}x{shape[1]} px, {n_windows} windows in {seconds:.1f} s "
        f"({shape[0] * shape[1] / 1e6 / max(seconds, 1e-9):.2f} Mpx/s), ink {fraction:.1%} of "
        f"the papyrus (overlay on the {what})"
    )
    result = FragmentPrediction(
        frag.id,
        shape,
        fraction,
        prob_png_path,
        mask_png_path,
        overlay_png,
        round(seconds, 3),
        probability_tif=prob_tif_path,
        probability_ome_zarr=prob_zarr_path,
    )
    return result, rle


def _write_record(
    cfg: PredictConfig,
    models: _Models,
    threshold: float,
    results: list[FragmentPrediction],
) -> Path:
    """Write ``predict.json``: the resolved settings and the per-fragment results."""
    record = {
        "version": __version__,
        "config": asdict(cfg),
        "resolved": {
            "layers": str(models.layers),
            "tile_px": models.tile_px,
            "stride_px": stride_for(models.tile_px, cfg.overlap),
            "threshold": threshold,
            "checkpoints": [
                {"path": str(c.path), "model": c.model.to_dict(), "threshold": c.threshold}
                for c in models.checkpoints
            ],
        },
        "fragments": [asdict(r) for r in results],
    }
    path = cfg.out / RECORD
    with atomic_write(path, "w", encoding="utf-8") as fh:
        fh.write(json.dumps(record, indent=2, default=str) + "\n")
    return path


def predict(cfg: PredictConfig, log: Callable[[str], None] = print) -> list[FragmentPrediction]:
    """Predict ink on every fragment of ``cfg``; write the submission and the pictures.

    Everything that can be checked is checked before the first window is predicted:
    checkpoints (present, readable, in agreement), fragments (present, layers fit).

    Returns:
        one :class:`FragmentPrediction` per fragment, in the order given.

    Raises:
        InkpipeError subclasses with a one-line message for every input problem.
    """
    if cfg.out.exists() and not cfg.out.is_dir():
        raise ConfigError(f"--out {cfg.out} is a file, expected a folder for the predictions")
    models = load_models(cfg.checkpoints, trust=cfg.trust_checkpoint)
    retain_freed_memory()  # tiles are allocated and freed thousands of times a second
    threshold = (
        cfg.threshold
        if cfg.threshold is not None
        else float(np.mean([c.threshold for c in models.checkpoints]))
    )
    cfg.out.mkdir(parents=True, exist_ok=True)
    fragments = resolve_fragments(cfg, models.layers, log, models.normalize)
    shapes = [(int(f.meta.shape[1]), int(f.meta.shape[2])) for f in fragments]
    check_free(
        cfg.out,
        output_bytes_bound(cfg, shapes),
        f"the predictions of {len(fragments)} fragment(s) in {cfg.out}",
        "free some space or pass another --out",
    )
    predictor = build_predictor(models, cfg.device, cfg.tta, cfg.precision, cfg.compile, warn=log)
    log(
        f"predicting {len(fragments)} fragment(s) with {len(models.checkpoints)} checkpoint(s): "
        f"layers {models.layers}, {models.tile_px} px tiles every "
        f"{stride_for(models.tile_px, cfg.overlap)} px, TTA {cfg.tta}, threshold {threshold:.3f}"
        f", precision {cfg.precision}{', compiled' if cfg.compile else ''}"
    )
    results: list[FragmentPrediction] = []
    rows: list[tuple[str, str]] = []
    again = "free some space and run the same command again"
    with disk_full_as_error(cfg.out, "the predictions", again):
        for frag in fragments:
            result, rle = _predict_fragment(frag, predictor, models, cfg, threshold, log)
            results.append(result)
            rows.append((frag.id, rle))
        csv_bytes = sum(len(i) + len(r) + 2 for i, r in rows) + 64
        check_free(cfg.out, csv_bytes, f"the submission {cfg.out / SUBMISSION}", again)
        write_submission(cfg.out / SUBMISSION, rows)
        _write_record(cfg, models, threshold, results)
    return results


def format_predictions(results: Sequence[FragmentPrediction], out: Path) -> str:
    """Return an aligned summary: one row per fragment, then where the files are."""
    header = ("fragment", "H x W", "ink", "seconds")
    rows = [
        (r.id, f"{r.shape[0]} x {r.shape[1]}", f"{r.ink_fraction:.1%}", f"{r.seconds:.1f}")
        for r in results
    ]
    out = Path(out)
    lines = [
        format_table(header, rows),
        f"submission: {out / SUBMISSION}",
        f"pictures:   {out}/<id>_probability.png, <id>_mask.png, <id>_overlay.png",
    ]
    saved = [
        name
        for name, present in (
            ("<id>_probability.tif", any(r.probability_tif for r in results)),
            ("<id>_probability.ome.zarr", any(r.probability_ome_zarr for r in results)),
        )
        if present
    ]
    if saved:
        lines.append(f"maps:       {out}/{', '.join(saved)}")
    lines += [
        f"settings:   {out / RECORD}",
    ]
    return "\n".join(lines)
