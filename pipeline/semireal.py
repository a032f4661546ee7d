"""Write semi-real fragments: real CT texture, real ink-label geometry, an injected ink signal.

Models trained on :mod:`inkpipe.pipeline.synth` data see synthetic fibres and synthetic letters.
This generator keeps the layout, markers and return type of :func:`~.synth.synthesize` but takes
its texture from a real CT crop and its ink shapes from real Scroll 1 ink labels (the pieces in
``shared/realdata``, see :func:`default_realdata_dir`), so a model's score on it says whether it
copes with real texture and generalises to letter shapes it has not seen::

    OUT/train/<id>/surface_volume/00.tif … 64.tif   uint16 slices, one page each, uncompressed
    OUT/train/<id>/mask.png                          8-bit, 255 = papyrus
    OUT/train/<id>/inklabels.png                     8-bit, 255 = ink
    OUT/train/<id>/ir.png                            8-bit infrared photo, ink darker
    OUT/test/<id>/…                                  the same without inklabels.png
    OUT/truth/<id>.png                               the hidden ink labels of test fragments

The model, per voxel (z, y, x) of a fragment (axis order (z, y, x) everywhere):

* Geometry. Each fragment takes its ink from one real label image, area-downscaled by
  ``label_scale`` (PIL ``BOX``; 1/4 by default, where strokes are 24–30 px wide and letters
  about 100 px high: the real labels are drawn with a ~100 px brush, so 1/4 is the smallest
  scale at which a 1024 x 768 crop fits in all three images), turned by a random multiple of
  90° and maybe flipped, then cropped at random to H x W where the crop holds ink. A pixel is
  ink where the downscaled label is > 127 and papyrus. Train fragments take their labels from
  all images but the held-out one(s), test fragments from the held-out one(s) (a seeded choice),
  so a test score measures generalisation to new letter shapes. The outline is the irregular,
  holed mask of :mod:`~.synth`.
* Texture. The 11 real layers (papyrus in 0–7, the sheet's back surface between 7 and 8, the
  gap to the next wrap in 8–10) are mirror-tiled in-plane with a random offset, flip and
  transpose per fragment. The sheet lies below a smooth surface ``surface_z(y, x)`` (30 ± 4
  layers). Slice ``z`` at depth ``d = z - surface_z`` samples real layer ``r = 7.5 - d``,
  mirrored at 0 (``r = |7.5 - d|``), so the real back surface becomes the inked front surface,
  the sheet is 15 layers thick and both its faces are real interfaces; beyond layer 10 (2.5
  layers above the surface, 17.5 below) the real gap texture fades into smooth CT noise with
  the gap's mean and standard deviation ("air"). Between two real layers the texture is
  interpolated linearly with the deviation from the layer mean rescaled so its standard
  deviation stays that of the real layers: the real statistics (layer means ~36k–44k in the
  sheet, ~26k in the gap, std ~11k–12k) are kept, not renormalised. Outside the mask is air.
* Ink. An additive density bump, like carbon ink adding attenuation on top of the papyrus:
  ``ink_contrast * sigma(r) * density(y, x) * exp(-(d - 1)^2 / (2 * 0.85^2))``, confined to
  two or three layers around ``surface_z + 1``. ``sigma(r)`` is the local per-voxel standard
  deviation of the real layer the voxel samples: its std after removing an 8 px Gaussian blur,
  ~4.4k in the sheet (the global std, ~12k, is dominated by slow density changes, and ink of
  0.8 of it is visible by eye). ``density`` is the anti-aliased label / 255 slightly blurred,
  faded in smooth patches (0.5–1.5) and zero outside the labelled pixels, so the written labels
  are exactly where ink was injected. Additive rather than multiplicative: ink adds its own
  attenuation whatever the papyrus density beneath.
* IR. Bright papyrus (real surface texture, smooth light), ink 70 grey levels darker, dark
  ground.

Hardness, measured on the test fragment of seed 0 at 1024 x 768 (label 20230520175435, ink
11 % of the papyrus), F0.5 inside the mask. "Best layer": the best per-pixel threshold on any
one slice (either polarity, 99 rank thresholds). "Depth filter": the texture at the true ink
depth minus its least-squares prediction from 3, 4 and 5 layers below the surface, blurred
7 px, best threshold; roughly what a small CNN with depth and spatial context can learn. At
contrast 0 the best layer already beats predicting ink everywhere, because the label crop
happens to lie on brighter real texture: 0.18, not 0.135, is this fragment's chance level.

=============  ========  ==========  ============
ink_contrast   all ink   best layer  depth filter
=============  ========  ==========  ============
0 (no ink)     0.135     0.184       0.192
0.5            0.135     0.202       0.343
0.8 (default)  0.135     0.212       0.435
1.0            0.135     0.232       0.490
1.5            0.135     0.293       0.610
2.0            0.135     0.357       0.687
=============  ========  ==========  ============

Every random draw comes from a generator seeded by ``(seed, purpose)`` through
:class:`numpy.random.SeedSequence` (one per slice for the noise), so the same seed and inputs
give byte-identical files; the marker records the crc32 of the real inputs. Slices are rendered
and written one by one (temporaries of a few (H, W) float32 arrays); files are written
atomically and a fragment is marked complete last, as in :mod:`~.synth`.
"""

from __future__ import annotations

import json
import math
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
from numpy.typing import NDArray
from PIL import Image
from scipy import ndimage
from tqdm import tqdm

from .checks import check_int, check_number
from .errors import InputNotFoundError, InvalidInputError
from .files import atomic_write
from .images import read_gray, write_png
from .synth import (
    COMPLETE_MARKER,
    INK_OFFSET_Z,
    INK_SIGMA_Z,
    MIN_SIDE_PX,
    STARTED_MARKER,
    SynthFragment,
    _band_rows,
    _check_counts,
    _is_complete,
    _make_mask,
    _prepare_folder,
    _read_marker,
    _rng,
    _smooth_grid,
    _smooth_noise,
)

__all__ = [
    "DEFAULT_INK_CONTRAST",
    "DEFAULT_LABEL_SCALE",
    "LAYERS",
    "RealTexture",
    "SemiRealConfig",
    "assign_sources",
    "choose_crop",
    "default_realdata_dir",
    "list_label_images",
    "load_label",
    "load_texture",
    "mirror_indices",
    "read_params",
    "real_layer_index",
    "synthesize_semireal",
]

F32 = NDArray[np.float32]
U8 = NDArray[np.uint8]
U16 = NDArray[np.uint16]
Intp = NDArray[np.intp]

LAYERS = 65
REAL_LAYERS = 11  # the ct_crop of shared/realdata
FORMAT_VERSION = 1
DEFAULT_INK_CONTRAST = 0.8
DEFAULT_LABEL_SCALE = 0.25
LABEL_GLOB = "*_inklabels.png"

# Where the real crop's back surface lies (between real layers 7 and 8); it becomes the
# fragment's front surface, the one that carries ink.
SURFACE_REAL_LAYER = 7.5
_GAP_LAYERS = (9, 10)  # real layers of the gap below the sheet: the statistics of "air"
_SURFACE_MEAN_Z = 30.0
_SURFACE_AMPLITUDE_Z = 4.0
_AIR_FADE_LAYERS = 2.0  # beyond the real layers the gap texture fades into noise over this
_AIR_NOISE_SIGMA_PX = 2.5  # neighbouring gap pixels correlate ~0.96, as this blur gives
_LOCAL_STD_PX = 8.0
_MASK_EDGE_PX = 0.7
_INK_BLUR_PX = 0.7
_MAX_VARIANCE_GAIN = 2.0
_IR_INK_DARKENING = 70.0
_CROP_TRIES = 64

# Seed keys: every random draw uses a generator derived from (seed, key).
_KEY_MASK, _KEY_DEPTH, _KEY_LABEL, _KEY_TILE, _KEY_DENSITY, _KEY_IR, _KEY_SLICE = range(7)
_KEY_TRAIN, _KEY_TEST, _KEY_SOURCES = 0, 1, 2


# --------------------------------------------------------------------------- configuration


def default_realdata_dir() -> Path:
    """Return the ``shared/realdata`` folder next to the repository or the working directory.

    Looks for ``<D>/shared/realdata`` holding ``ct_crop/`` and ``labels/`` for every ancestor
    ``D`` of this file and of the current directory (so ``<repo>/../shared/realdata`` is found).

    Raises:
        InputNotFoundError: no such folder; the message says where it looked and the fix.
    """
    here = Path(__file__).resolve().parent
    cwd = Path.cwd().resolve()
    looked: list[Path] = []
    for base in (here, *here.parents, cwd, *cwd.parents):
        candidate = base / "shared" / "realdata"
        if candidate in looked:
            continue
        looked.append(candidate)
        if (candidate / "ct_crop").is_dir() and (candidate / "labels").is_dir():
            return candidate
    raise InputNotFoundError(
        "real data folder not found: looked for shared/realdata (with ct_crop/ and labels/) "
        f"above {here} and above {cwd}; pass the folders explicitly "
        "(--texture DIR/ct_crop --labels DIR/labels, or texture_dir= and labels_dir=)"
    )


@dataclass(frozen=True)
class SemiRealConfig:
    """What :func:`synthesize_semireal` writes.

    Attributes:
        out: the output root; ``train/``, ``test/`` and ``truth/`` are created under it.
        texture_dir: folder of the 11 real CT layers ``00.tif`` … ``10.tif``; ``None`` means
            ``default_realdata_dir() / "ct_crop"``.
        labels_dir: folder of real ``*_inklabels.png`` images; ``None`` means
            ``default_realdata_dir() / "labels"``.
        n_train: number of train fragments, ids ``"1"``, ``"2"``, ….
        n_test: number of test fragments, ids ``"a"``, ``"b"``, … (at most 26).
        height_px: image height H of every fragment, at least 64.
        width_px: image width W of every fragment, at least 64.
        seed: root seed; each fragment gets its own seed derived from it.
        ink_contrast: peak ink density in units of the local per-voxel standard deviation of the
            real texture at that depth, in [0, 10]; 0.8 is about chance for one-layer
            thresholds but learnable with depth context (see the module docstring); 0 writes
            no ink signal.
        label_scale: area-downscaling factor of the real label images, in (0, 1].
    """

    out: Path
    texture_dir: Path | None = None
    labels_dir: Path | None = None
    n_train: int = 2
    n_test: int = 1
    height_px: int = 1024
    width_px: int = 768
    seed: int = 0
    ink_contrast: float = DEFAULT_INK_CONTRAST
    label_scale: float = DEFAULT_LABEL_SCALE

    def __post_init__(self) -> None:
        object.__setattr__(self, "out", Path(self.out))
        _check_counts(self.n_train, self.n_test)
        check_int("height_px", self.height_px, MIN_SIDE_PX)
        check_int("width_px", self.width_px, MIN_SIDE_PX)
        check_int("seed", self.seed, 0)
        check_number(
            "ink_contrast",
            self.ink_contrast,
            0.0,
            10.0,
            kind="a number",
            hint=(
                f"in local real-texture standard deviations, {DEFAULT_INK_CONTRAST} is the default"
            ),
        )
        check_number(
            "label_scale",
            self.label_scale,
            0.0,
            1.0,
            low_open=True,
            kind="a number",
            hint=f"the label images' downscaling factor, {DEFAULT_LABEL_SCALE} is the default",
        )
        for name, sub in (("texture_dir", "ct_crop"), ("labels_dir", "labels")):
            value = getattr(self, name)
            path = default_realdata_dir() / sub if value is None else Path(value)
            object.__setattr__(self, name, path)

    @property
    def texture(self) -> Path:
        """The resolved texture folder."""
        assert self.texture_dir is not None  # set by __post_init__
        return self.texture_dir

    @property
    def labels(self) -> Path:
        """The resolved label folder."""
        assert self.labels_dir is not None  # set by __post_init__
        return self.labels_dir


# --------------------------------------------------------------------------- real inputs


@dataclass(frozen=True)
class RealTexture:
    """The real CT layers and their statistics.

    Attributes:
        layers: (11, h, w) uint16 real layers, papyrus in 0–7, gap in 8–10.
        mean: (11,) float64 mean of each layer.
        std: (11,) float64 standard deviation of each layer.
        corr: (10,) float64 correlation of layer k with layer k + 1 (per pixel).
        local_std: (11,) float64 standard deviation of each layer minus its 8 px Gaussian blur:
            the voxel-scale fluctuation (noise, fibres), without the slow density changes that
            dominate ``std``; the unit of ``ink_contrast``.
        crc32: crc32 of the layer files' bytes, for the provenance marker.
    """

    layers: U16
    mean: NDArray[np.float64]
    std: NDArray[np.float64]
    corr: NDArray[np.float64]
    local_std: NDArray[np.float64]
    crc32: int

    @property
    def air_mean(self) -> float:
        """Mean grey value of the gap layers, used for air."""
        return float(np.mean(self.mean[list(_GAP_LAYERS)]))

    @property
    def air_std(self) -> float:
        """Per-voxel standard deviation of the gap layers, used for air noise."""
        return float(np.sqrt(np.mean(self.std[list(_GAP_LAYERS)] ** 2)))


def load_texture(texture_dir: Path) -> RealTexture:
    """Read the 11 real CT layers ``00.tif`` … ``10.tif`` of ``texture_dir``.

    Returns:
        The layers ((11, h, w) uint16, h and w at least 16) and their statistics.

    Raises:
        InputNotFoundError: the folder or a layer file is missing.
        InvalidInputError: a file is unreadable or not a 2-D uint16 image of the common shape.
    """
    texture_dir = Path(texture_dir)
    fix = "point texture_dir/--texture at the ct_crop/ folder of shared/realdata"
    if not texture_dir.is_dir():
        raise InputNotFoundError(f"real texture folder not found: {texture_dir}; {fix}")
    files = [texture_dir / f"{k:02d}.tif" for k in range(REAL_LAYERS)]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        found = sorted(p.name for p in texture_dir.glob("*.tif"))
        raise InputNotFoundError(
            f"{texture_dir}: missing {', '.join(missing)}; expected the {REAL_LAYERS} layers "
            f"00.tif … {REAL_LAYERS - 1}.tif, found {len(found)} .tif files; {fix}"
        )
    layers: list[U16] = []
    crc = 0
    for f in files:
        data = f.read_bytes()
        crc = zlib.crc32(data, crc)
        try:
            arr = tifffile.imread(f)
        except Exception as exc:  # tifffile raises many kinds on damaged files
            raise InvalidInputError(f"cannot read real CT layer {f}: {exc}; {fix}") from None
        shape = layers[0].shape if layers else None
        if arr.dtype != np.uint16 or arr.ndim != 2 or min(arr.shape) < 16:
            raise InvalidInputError(
                f"{f}: got a {arr.dtype} array of shape {arr.shape}, expected a 2-D uint16 "
                f"layer at least 16 x 16; {fix}"
            )
        if shape is not None and arr.shape != shape:
            raise InvalidInputError(f"{f}: shape {arr.shape} differs from 00.tif's {shape}")
        layers.append(arr)
    stack = np.stack(layers)
    flat = stack.reshape(REAL_LAYERS, -1).astype(np.float64)
    mean = flat.mean(axis=1)
    std = flat.std(axis=1)
    if np.any(std == 0):
        raise InvalidInputError(f"{texture_dir}: a layer is constant, expected real CT texture")
    dev = (flat - mean[:, None]) / std[:, None]
    corr = np.mean(dev[:-1] * dev[1:], axis=1)
    local_std = np.array(
        [np.std(a - ndimage.gaussian_filter(a, _LOCAL_STD_PX)) for a in stack.astype(np.float32)],
        dtype=np.float64,
    )
    return RealTexture(stack, mean, std, corr, local_std, crc)


def list_label_images(labels_dir: Path) -> list[Path]:
    """Return the ``*_inklabels.png`` files of ``labels_dir``, sorted by name.

    Raises:
        InputNotFoundError: the folder is missing or holds no such file.
    """
    labels_dir = Path(labels_dir)
    fix = "point labels_dir/--labels at the labels/ folder of shared/realdata"
    if not labels_dir.is_dir():
        raise InputNotFoundError(f"real ink-label folder not found: {labels_dir}; {fix}")
    found = sorted(labels_dir.glob(LABEL_GLOB))
    if not found:
        raise InputNotFoundError(f"no {LABEL_GLOB} images in {labels_dir}; {fix}")
    return found


def load_label(path: Path, scale: float) -> U8:
    """Read a real ink-label image and area-downscale it.

    Args:
        path: an 8-bit label image (0–255, anti-aliased, ink bright).
        scale: downscaling factor in (0, 1]; the result has ``round(scale * side)`` pixels per
            side (at least 1), each the box average of the pixels it covers.

    Returns:
        (h, w) uint8 soft label, 0–255.

    Raises:
        InputNotFoundError, InvalidInputError: the file is missing or unreadable.
    """
    full = read_gray(Path(path), "real ink labels")
    if scale == 1.0:
        return full
    h, w = full.shape
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    small = Image.fromarray(full).resize(size, Image.Resampling.BOX)
    return np.asarray(small, dtype=np.uint8).copy()


def _file_crc32(path: Path) -> int:
    return zlib.crc32(Path(path).read_bytes())


# --------------------------------------------------------------------------- geometry


def assign_sources(
    n_images: int, n_train: int, n_test: int, rng: np.random.Generator
) -> tuple[list[int], list[int]]:
    """Choose the label image of every fragment, holding images out for the test fragments.

    With at least two images and both splits present, a seeded share of the images (about
    ``n_test / (n_train + n_test)``, at least one, never all) is used only by test fragments
    and the rest only by train fragments; fragments cycle through their split's images, so
    they share an image only when there are more fragments than images.

    Returns:
        ``(train, test)``: lists of image indices, ``n_train`` and ``n_test`` long.
    """
    order = [int(i) for i in rng.permutation(n_images)]
    if n_images >= 2 and n_train > 0 and n_test > 0:
        k = min(n_images - 1, max(1, round(n_images * n_test / (n_train + n_test))))
        held, pool = order[:k], order[k:]
    else:
        held = pool = order
    train = [pool[i % len(pool)] for i in range(n_train)]
    test = [held[j % len(held)] for j in range(n_test)]
    return train, test


def _orient(image: U8, turns: int, flip: bool) -> U8:
    out = np.rot90(image, turns)
    return np.ascontiguousarray(out[:, ::-1] if flip else out)


def choose_crop(
    label: U8, height_px: int, width_px: int, rng: np.random.Generator
) -> tuple[U8, dict[str, Any]]:
    """Turn, flip and crop a downscaled label image to (H, W), holding ink.

    Orientations in which the image covers the crop are preferred; if there is none, the image
    is padded with zeros (blank papyrus) at a random place. Of up to 64 random windows, the
    first whose ink fraction (> 127) is at least half the image's is taken, else the inkiest.

    Args:
        label: (h, w) uint8 soft label, 0–255.
        height_px: crop height H.
        width_px: crop width W.
        rng: the generator of this choice.

    Returns:
        The (H, W) uint8 soft-label crop and its placement as a JSON-ready dict: ``turns``
        quarter turns (``np.rot90``), then a left-right flip if ``flip``, then zero padding
        ``pad`` = [top, left] if the image is smaller than the crop, then the window at
        (``y0``, ``x0``).
    """
    options = [(t, f) for t in range(4) for f in (False, True)]
    # An odd number of quarter turns swaps the image's height and width.
    fits = [
        (t, f)
        for t, f in options
        if label.shape[t % 2] >= height_px and label.shape[1 - t % 2] >= width_px
    ]
    turns, flip = (fits or options)[int(rng.integers(len(fits or options)))]
    image = _orient(label, turns, flip)
    h, w = image.shape
    pad_y, pad_x = max(0, height_px - h), max(0, width_px - w)
    top = int(rng.integers(pad_y + 1))
    left = int(rng.integers(pad_x + 1))
    if pad_y or pad_x:
        image = np.pad(image, ((top, pad_y - top), (left, pad_x - left)))
        h, w = image.shape
    ink = (image > 127).astype(np.int64)
    total = np.zeros((h + 1, w + 1), dtype=np.int64)  # summed-area table
    total[1:, 1:] = ink.cumsum(0).cumsum(1)
    wanted = 0.5 * float(ink.mean())
    best: tuple[float, int, int] = (-1.0, 0, 0)
    for _ in range(_CROP_TRIES):
        y0 = int(rng.integers(h - height_px + 1))
        x0 = int(rng.integers(w - width_px + 1))
        y1, x1 = y0 + height_px, x0 + width_px
        count = total[y1, x1] - total[y0, x1] - total[y1, x0] + total[y0, x0]
        frac = float(count) / (height_px * width_px)
        if frac > best[0]:
            best = (frac, y0, x0)
        if frac >= wanted and frac > 0:
            break
    _, y0, x0 = best
    crop = np.ascontiguousarray(image[y0 : y0 + height_px, x0 : x0 + width_px])
    placement = {"turns": turns, "flip": flip, "pad": [top, left], "y0": y0, "x0": x0}
    return crop, placement


def mirror_indices(n_out: int, n_src: int, offset: int, flip: bool) -> Intp:
    """Return source indices that mirror-tile ``n_src`` pixels to ``n_out`` pixels.

    Like ``np.pad(mode="reflect")`` repeated (period ``2 * n_src - 2``, edges not doubled),
    started ``offset`` pixels into the period and reversed if ``flip``.

    Returns:
        (n_out,) intp indices in ``[0, n_src)``.
    """
    period = max(1, 2 * n_src - 2)
    k = (np.arange(n_out, dtype=np.intp) + offset) % period
    idx = np.where(k < n_src, k, period - k)
    return (n_src - 1 - idx) if flip else idx


def real_layer_index(depth: F32, top_layer: int = REAL_LAYERS - 1) -> tuple[F32, F32]:
    """Map depth below the surface to a fractional real layer and the layers beyond them.

    ``r = |7.5 - depth|``: above the surface the real gap (8–10), just below it the real back
    surface turned over, then papyrus 7 … 0 … 7 and the far interface; where ``r`` exceeds
    ``top_layer`` the excess ``e = r - top_layer`` is returned and ``r`` bounces between
    ``top_layer - 1`` and ``top_layer`` (a triangle wave, continuous).

    Args:
        depth: float32 array, layers below the surface (negative above it).
        top_layer: the last real layer index (10).

    Returns:
        ``(r, excess)``: float32 arrays of depth's shape, ``r`` in ``[0, top_layer]``,
        ``excess >= 0``.
    """
    r = np.abs(np.float32(SURFACE_REAL_LAYER) - depth)
    excess = np.maximum(r - np.float32(top_layer), np.float32(0))
    phase = np.mod(excess, np.float32(2))
    bounce = np.where(phase <= 1, phase, np.float32(2) - phase)
    r = np.where(excess > 0, np.float32(top_layer) - bounce, r)
    return r.astype(np.float32, copy=False), excess.astype(np.float32, copy=False)


def _sample_texture(tex: RealTexture, src: U16, r: F32, pix: Intp) -> tuple[F32, F32, F32]:
    """Sample the real texture at fractional layers ``r``, keeping its standard deviation.

    Args:
        tex: the real texture's statistics.
        src: (11, h * w) uint16 real layers in the fragment's orientation, flattened.
        r: (n, W) float32 fractional layer index in [0, 10].
        pix: (n, W) intp flat source pixel of each output pixel.

    Returns:
        ``(value, mean, local_std)``: (n, W) float32 texture, the interpolated layer mean and
        local standard deviation (:attr:`RealTexture.local_std`) at ``r``.
    """
    top = src.shape[0] - 1
    lo = np.minimum(np.floor(r).astype(np.intp), top - 1)
    t = r - lo.astype(np.float32)
    s = np.float32(1) - t
    mean_lo, mean_hi = tex.mean[lo].astype(np.float32), tex.mean[lo + 1].astype(np.float32)
    std_lo, std_hi = tex.std[lo].astype(np.float32), tex.std[lo + 1].astype(np.float32)
    corr = tex.corr[lo].astype(np.float32)
    dev = (src[lo, pix].astype(np.float32) - mean_lo) * s
    dev += (src[lo + 1, pix].astype(np.float32) - mean_hi) * t
    # Mixing two layers shrinks the deviation's spread; rescale it to the layers' own.
    std = std_lo * s + std_hi * t
    mixed = np.sqrt(
        np.maximum((s * std_lo) ** 2 + (t * std_hi) ** 2 + 2 * s * t * corr * std_lo * std_hi, 1.0)
    )
    dev *= np.minimum(std / mixed, np.float32(_MAX_VARIANCE_GAIN))
    mean = mean_lo * s + mean_hi * t
    local_std = tex.local_std[lo].astype(np.float32) * s + tex.local_std[lo + 1] * t
    return mean + dev, mean, local_std.astype(np.float32, copy=False)


def _air_noise(rng: np.random.Generator, height_px: int, width_px: int) -> F32:
    """Return (H, W) float32 smooth noise of unit standard deviation (CT noise of air)."""
    noise = rng.standard_normal((height_px, width_px), dtype=np.float32)
    noise = ndimage.gaussian_filter(noise, _AIR_NOISE_SIGMA_PX, mode="reflect")
    noise /= np.float32(max(float(np.std(noise, dtype=np.float64)), 1e-12))
    return noise


def _make_surface(rng: np.random.Generator, height_px: int, width_px: int) -> F32:
    """Return (H, W) float32 depth of the papyrus surface, 30 ± 4 layers, varying smoothly."""
    relief = _smooth_noise(rng, height_px, width_px, max(height_px, width_px) / 2)
    relief *= 0.8
    finer = _smooth_noise(rng, height_px, width_px, min(height_px, width_px) / 6)
    finer *= 0.35
    relief += finer
    surface = np.tanh(relief * np.float32(0.8))
    surface *= np.float32(_SURFACE_AMPLITUDE_Z)
    surface += np.float32(_SURFACE_MEAN_Z)
    return surface.astype(np.float32, copy=False)


# --------------------------------------------------------------------------- one fragment


@dataclass(frozen=True)
class _Fragment:
    """The 2-D fields of one fragment; all (H, W).

    Attributes:
        mask: uint8 0/1, 1 = papyrus.
        soft_mask: float32 in [0, 1], the mask with a soft edge.
        labels: uint8 0/1, 1 = ink (label > 127 and papyrus).
        ink_density: float32 in [0, 1.5], zero outside ``labels``.
        surface_z: float32, depth (in layers) of the papyrus surface.
        src: (11, h * w) uint16 real layers in the fragment's orientation, flattened.
        iy: (H,) intp source row of each fragment row.
        ix: (W,) intp source column of each fragment column.
        src_width: w, the oriented source's width.
    """

    mask: U8
    soft_mask: F32
    labels: U8
    ink_density: F32
    surface_z: F32
    src: U16
    iy: Intp
    ix: Intp
    src_width: int

    def pix(self, r0: int, r1: int) -> Intp:
        """Return (r1 - r0, W) intp flat source pixels of rows ``r0:r1``."""
        return self.iy[r0:r1, None] * self.src_width + self.ix[None, :]


def _make_fragment(
    tex: RealTexture, soft_label: U8, height_px: int, width_px: int, seed: int
) -> _Fragment:
    """Compute the 2-D fields of a fragment from its (H, W) uint8 soft-label crop."""
    h, w = height_px, width_px
    mask = _make_mask(_rng(seed, _KEY_MASK), h, w)
    soft_mask = ndimage.gaussian_filter(mask.astype(np.float32), _MASK_EDGE_PX)
    np.maximum(soft_mask, mask.astype(np.float32) * np.float32(0.5), out=soft_mask)
    labels = ((soft_label > 127) & (mask > 0)).astype(np.uint8)

    density = ndimage.gaussian_filter(soft_label.astype(np.float32) / 255, _INK_BLUR_PX)
    rng = _rng(seed, _KEY_DENSITY)
    fade = _smooth_noise(rng, h, w, 250.0)
    fade *= 0.25
    fade += 1.0
    np.clip(fade, 0.5, 1.5, out=fade)
    density *= fade
    density *= labels  # ink exactly where labelled: the labels are the truth

    surface_z = _make_surface(_rng(seed, _KEY_DEPTH), h, w)

    rng = _rng(seed, _KEY_TILE)
    layers = tex.layers.transpose(0, 2, 1) if rng.random() < 0.5 else tex.layers
    src = np.ascontiguousarray(layers)
    n, sh, sw = src.shape
    iy = mirror_indices(h, sh, int(rng.integers(2 * sh - 2)), bool(rng.random() < 0.5))
    ix = mirror_indices(w, sw, int(rng.integers(2 * sw - 2)), bool(rng.random() < 0.5))
    return _Fragment(
        mask=mask,
        soft_mask=soft_mask,
        labels=labels,
        ink_density=density,
        surface_z=surface_z,
        src=src.reshape(n, sh * sw),
        iy=iy,
        ix=ix,
        src_width=sw,
    )


def _render_slice(
    tex: RealTexture, frag: _Fragment, z: int, seed: int, ink_contrast: float, out: U16
) -> None:
    """Render slice ``z`` into ``out`` ((H, W) uint16), row band by row band."""
    h, w = frag.mask.shape
    noise = _air_noise(_rng(seed, _KEY_SLICE, z), h, w)
    air_mean, air_std = np.float32(tex.air_mean), np.float32(tex.air_std)
    rows = _band_rows(w)
    for r0 in range(0, h, rows):
        r1 = min(h, r0 + rows)
        depth = np.float32(z) - frag.surface_z[r0:r1]
        r, excess = real_layer_index(depth, tex.layers.shape[0] - 1)
        value, mean, local_std = _sample_texture(tex, frag.src, r, frag.pix(r0, r1))
        air = noise[r0:r1] * air_std
        air += air_mean
        # Beyond the real layers the real gap fades into air noise, spread kept.
        keep = np.exp(-excess / np.float32(_AIR_FADE_LAYERS))
        value -= mean
        value *= keep
        value += (mean * keep + air_mean * (1 - keep)) + noise[r0:r1] * (
            air_std * np.sqrt(1 - keep * keep)
        )
        if ink_contrast > 0:
            profile = depth - np.float32(INK_OFFSET_Z)
            np.square(profile, out=profile)
            profile *= np.float32(-0.5 / INK_SIGMA_Z**2)
            np.exp(profile, out=profile)
            profile *= frag.ink_density[r0:r1]
            profile *= local_std
            profile *= np.float32(ink_contrast)
            value += profile
        m = frag.soft_mask[r0:r1]
        value -= air
        value *= m
        value += air
        np.rint(value, out=value)
        np.clip(value, 0, 65535, out=value)
        out[r0:r1] = value


def _make_ir(tex: RealTexture, frag: _Fragment, seed: int) -> U8:
    """Return the (H, W) uint8 infrared photo: real surface texture, darker ink, dark ground."""
    rng = _rng(seed, _KEY_IR)
    h, w = frag.mask.shape
    light = _smooth_grid(rng, h, w, min(h, w) / 3)
    layer = int(math.floor(SURFACE_REAL_LAYER))
    ir = np.empty((h, w), dtype=np.uint8)
    rows = _band_rows(w)
    for r0 in range(0, h, rows):
        r1 = min(h, r0 + rows)
        band = light.band(r0, r1)
        band *= 12.0
        band += 160.0
        texture = frag.src[layer, frag.pix(r0, r1)].astype(np.float32)
        texture -= np.float32(tex.mean[layer])
        texture *= np.float32(10.0 / tex.std[layer])
        band += np.clip(texture, -30, 30)
        band -= frag.ink_density[r0:r1] * np.float32(_IR_INK_DARKENING)
        band *= frag.soft_mask[r0:r1]
        band += 12.0
        band += rng.standard_normal((r1 - r0, w), dtype=np.float32) * np.float32(3.0)
        np.rint(band, out=band)
        np.clip(band, 0, 255, out=band)
        ir[r0:r1] = band
    return ir


def _write_fragment(
    frag_out: SynthFragment,
    tex: RealTexture,
    label_path: Path,
    label: U8,
    cfg: SemiRealConfig,
    seed: int,
    progress: bool,
) -> None:
    """Write one fragment folder (and its truth for a test fragment), as synth does."""
    h, w = cfg.height_px, cfg.width_px
    crop, placement = choose_crop(label, h, w, _rng(seed, _KEY_LABEL))
    params: dict[str, Any] = {
        "generator": "inkpipe.pipeline.semireal",
        "format_version": FORMAT_VERSION,
        "height_px": int(h),
        "width_px": int(w),
        "layers": LAYERS,
        "seed": int(seed),
        "ink_contrast": float(cfg.ink_contrast),
        "label_scale": float(cfg.label_scale),
        "labels": frag_out.split == "train",
        "label_source": label_path.name,
        "label_crc32": _file_crc32(label_path),
        "label_crop": placement,
        "texture_crc32": int(tex.crc32),
    }
    path = frag_out.path
    truth = frag_out.truth if frag_out.split == "test" else None
    if _is_complete(path, params, truth):
        return
    _prepare_folder(path, params)

    frag = _make_fragment(tex, crop, h, w, seed)
    label_png = (frag.labels * np.uint8(255)).astype(np.uint8)
    write_png(path / "mask.png", (frag.mask * np.uint8(255)).astype(np.uint8))
    write_png(path / "ir.png", _make_ir(tex, frag, seed))
    if frag_out.split == "train":
        write_png(path / "inklabels.png", label_png)
    if truth is not None:
        truth.parent.mkdir(parents=True, exist_ok=True)
        write_png(truth, label_png)
    del label_png

    volume_dir = path / "surface_volume"
    volume_dir.mkdir(exist_ok=True)
    slice_u16 = np.empty((h, w), dtype=np.uint16)
    for z in tqdm(range(LAYERS), desc=f"semireal {path.name}", unit="slice", disable=not progress):
        _render_slice(tex, frag, z, seed, float(cfg.ink_contrast), out=slice_u16)
        with atomic_write(volume_dir / f"{z:02d}.tif") as fh:
            tifffile.imwrite(fh, slice_u16)  # uncompressed, contiguous strips: read by offset

    with atomic_write(path / COMPLETE_MARKER) as fh:
        fh.write((json.dumps(params, indent=2, sort_keys=True) + "\n").encode())
    (path / STARTED_MARKER).unlink()


# --------------------------------------------------------------------------- the set


def synthesize_semireal(cfg: SemiRealConfig, progress: bool = False) -> list[SynthFragment]:
    """Write ``cfg.n_train`` train and ``cfg.n_test`` test semi-real fragments under ``cfg.out``.

    A fragment folder that is already complete with the same parameters and inputs is kept; one
    that an interrupted run left incomplete is deleted and written again.

    Args:
        cfg: what to write.
        progress: show a progress bar over the slices of each fragment.

    Returns:
        The fragments, train first, in id order (the layout of :func:`~.synth.synthesize`).

    Raises:
        InputNotFoundError: the real texture or label folder, or a file in it, is missing.
        InvalidInputError: a real input file is unreadable or malformed.
        ConfigError: a fragment folder exists but was not written by this generator, or was
            written with other parameters or inputs.
    """
    tex = load_texture(cfg.texture)
    label_paths = list_label_images(cfg.labels)
    sources = np.random.default_rng(np.random.SeedSequence(cfg.seed, spawn_key=(_KEY_SOURCES,)))
    train_src, test_src = assign_sources(len(label_paths), cfg.n_train, cfg.n_test, sources)

    fragments: list[tuple[SynthFragment, int, tuple[int, int]]] = []
    for i, src in enumerate(train_src):
        frag_id = str(i + 1)
        path = cfg.out / "train" / frag_id
        frag = SynthFragment(frag_id, path, "train", path / "inklabels.png")
        fragments.append((frag, src, (_KEY_TRAIN, i)))
    for j, src in enumerate(test_src):
        frag_id = "abcdefghijklmnopqrstuvwxyz"[j]
        path = cfg.out / "test" / frag_id
        frag = SynthFragment(frag_id, path, "test", cfg.out / "truth" / f"{frag_id}.png")
        fragments.append((frag, src, (_KEY_TEST, j)))

    cache: dict[int, U8] = {}
    for frag, src, key in fragments:
        # Keyed by split and index, so adding fragments never changes the existing ones.
        frag_seed = int(np.random.SeedSequence(cfg.seed, spawn_key=key).generate_state(1)[0])
        if src not in cache:
            cache[src] = load_label(label_paths[src], cfg.label_scale)
        _write_fragment(frag, tex, label_paths[src], cache[src], cfg, frag_seed, progress)
    return [frag for frag, _, _ in fragments]


def read_params(path: Path) -> dict[str, Any]:
    """Return the parameters a complete fragment folder was written with (its marker).

    Raises:
        InputNotFoundError: ``path`` holds no complete fragment.
    """
    found = _read_marker(Path(path) / COMPLETE_MARKER)
    if found is None:
        raise InputNotFoundError(
            f"{path} holds no complete fragment (no readable {COMPLETE_MARKER}); write it with "
            "synthesize_semireal first"
        )
    return found
