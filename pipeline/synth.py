"""Synthesize realistic fragments in the real on-disk layout of the Vesuvius ink-detection data.

Real fragments cannot be downloaded everywhere, so tests, the demo and benchmarks use synthetic
ones written exactly like the real data::

    OUT/train/<id>/surface_volume/00.tif … 64.tif   uint16 slices, one page each, uncompressed
    OUT/train/<id>/mask.png                          8-bit, 255 = papyrus
    OUT/train/<id>/inklabels.png                     8-bit, 255 = ink
    OUT/train/<id>/ir.png                            8-bit infrared photo, ink darker
    OUT/test/<id>/…                                  the same without inklabels.png
    OUT/truth/<id>.png                               the hidden ink labels of test fragments

The model, per voxel (z, y, x) of the volume (axis order (z, y, x) everywhere):

* a papyrus sheet lies below a surface whose depth ``surface_z(y, x)`` varies smoothly across
  the fragment (``0.45 * layers`` ± ``min(6, layers / 10)`` layers); air is above it, the sheet
  is about ``0.2 * layers`` layers thick; its outline is an irregular mask with ragged edges
  and holes;
* the sheet carries fibre texture, horizontal streaks in the upper ply and vertical ones in the
  lower ply, constant along z inside a ply like real fibres; air and sheet density drift slowly
  across the fragment and from slice to slice; every voxel gets Gaussian CT noise;
* ink is lines of hand-written letters (strokes of polylines and arcs) that adds a small density
  bump confined to two or three layers around ``surface_z + 1``. Its peak is ``ink_contrast``
  times the per-voxel standard deviation of noise plus fibre texture (0.8 by default), so no
  threshold on one slice, nor on the mean over slices, finds it pixel by pixel (F0.5 stays at the
  chance level of ~0.2); averaging over a neighbourhood while following the surface depth does
  (F0.5 ~0.55 for a hand-made filter, ~0.5 for a tiny CNN after 150 s on one CPU core, at
  512 x 384). Below 0.6 a tiny CNN barely learns anything in minutes.

Every random draw comes from a generator seeded by ``(seed, purpose)`` through
:class:`numpy.random.SeedSequence`, one per slice for the noise, so the same seed gives
byte-identical files. Two-dimensional fields are computed once at full resolution (float32) and
slices are rendered and written one by one in row bands, so a real-size fragment
(8181 x 6330 x 65) needs under 2 GB of memory and about 3 minutes on one core.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import tifffile
from numpy.typing import NDArray
from PIL import Image, ImageDraw
from scipy import ndimage
from tqdm import tqdm

from .checks import check_int, check_number
from .errors import ConfigError
from .files import atomic_write
from .images import write_png

__all__ = ["SynthConfig", "SynthFragment", "synthesize", "synthesize_fragment"]

Split = Literal["train", "test"]
F32 = NDArray[np.float32]
U8 = NDArray[np.uint8]

MIN_SIDE_PX = 64
MIN_LAYERS = 8
MAX_LAYERS = 1000
MAX_TEST_FRAGMENTS = 26  # test ids are the letters a…z
COMPLETE_MARKER = ".synth_complete"
STARTED_MARKER = ".synth_started"
FORMAT_VERSION = 1
DEFAULT_INK_CONTRAST = 0.8

# Grey values of the uint16 volume: air ~15000, papyrus ~37000. Even the most extreme noise
# voxel of a real-size volume (~6 sigma) stays far inside the uint16 range, so nothing clips.
_AIR = 15_000.0
_AIR_DRIFT = 1_000.0
_PAPYRUS = 22_000.0  # sheet density above air
_PAPYRUS_DRIFT = 2_000.0
_NOISE_STD = 1_500.0
_FIBRE_STD = 900.0
_SLICE_DRIFT = 400.0
# Per-voxel standard deviation of everything that is not ink, inside the sheet; the unit of
# ``ink_contrast``.
VOXEL_STD = math.hypot(_NOISE_STD, _FIBRE_STD)

_SURFACE_EDGE_Z = 0.6  # softness of the air/papyrus interface, in layers
_BOTTOM_EDGE_Z = 1.2
_PLY_EDGE_Z = 1.0
INK_OFFSET_Z = 1.0  # the ink density peak lies this many layers below the surface
INK_SIGMA_Z = 0.85  # so ink spans two to three layers

_BAND_PX = 1 << 22  # pixels per row band when rendering a slice (16 MB of float32)

# Seed keys: every random draw uses a generator derived from (seed, key).
_KEY_MASK, _KEY_DEPTH, _KEY_TEXT, _KEY_FIBRE, _KEY_DENSITY, _KEY_IR, _KEY_SLICE = range(7)
_KEY_TRAIN, _KEY_TEST = 0, 1


@dataclass(frozen=True)
class SynthConfig:
    """What :func:`synthesize` writes.

    Attributes:
        out: the output root; ``train/``, ``test/`` and ``truth/`` are created under it.
        n_train: number of train fragments, ids ``"1"``, ``"2"``, ….
        n_test: number of test fragments, ids ``"a"``, ``"b"``, … (at most 26).
        height_px: image height H of every fragment, at least 64.
        width_px: image width W of every fragment, at least 64.
        layers: number of slices (z), at least 8; 65 like the real data.
        seed: root seed; each fragment gets its own seed derived from it.
        ink_contrast: peak ink density in units of the per-voxel standard deviation of noise
            plus fibre texture; 0.8 is hard but learnable (see the module docstring), 0 writes
            no ink signal.
    """

    out: Path
    n_train: int = 2
    n_test: int = 1
    height_px: int = 512
    width_px: int = 384
    layers: int = 65
    seed: int = 0
    ink_contrast: float = DEFAULT_INK_CONTRAST

    def __post_init__(self) -> None:
        object.__setattr__(self, "out", Path(self.out))
        _check_counts(self.n_train, self.n_test)
        _check_fragment_args(
            self.height_px, self.width_px, self.layers, self.seed, self.ink_contrast
        )


@dataclass(frozen=True)
class SynthFragment:
    """One fragment written by :func:`synthesize`.

    Attributes:
        id: the fragment id (``"1"`` for train, ``"a"`` for test).
        path: the fragment folder (holding ``surface_volume/``, ``mask.png``…).
        split: ``"train"`` or ``"test"``.
        truth: the ink label PNG: ``path/inklabels.png`` for train, ``out/truth/<id>.png`` for test.
    """

    id: str
    path: Path
    split: Split
    truth: Path


def synthesize(cfg: SynthConfig, progress: bool = False) -> list[SynthFragment]:
    """Write ``cfg.n_train`` train and ``cfg.n_test`` test fragments under ``cfg.out``.

    A fragment folder that is already complete with the same parameters is kept as it is; one
    that an interrupted run left incomplete is deleted and written again.

    Args:
        cfg: what to write.
        progress: show a progress bar over the slices of each fragment.

    Returns:
        The fragments, train first, in id order.

    Raises:
        ConfigError: a fragment folder exists but was not written by this generator, or was
            written with other parameters.
    """
    fragments: list[SynthFragment] = []
    for i in range(cfg.n_train):
        frag_id = str(i + 1)
        path = cfg.out / "train" / frag_id
        fragments.append(SynthFragment(frag_id, path, "train", path / "inklabels.png"))
    for j in range(cfg.n_test):
        frag_id = "abcdefghijklmnopqrstuvwxyz"[j]
        path = cfg.out / "test" / frag_id
        fragments.append(SynthFragment(frag_id, path, "test", cfg.out / "truth" / f"{frag_id}.png"))
    for index, frag in enumerate(fragments):
        key = (_KEY_TRAIN, index) if frag.split == "train" else (_KEY_TEST, index - cfg.n_train)
        # Keyed by split and index, so adding fragments never changes the existing ones.
        frag_seed = int(np.random.SeedSequence(cfg.seed, spawn_key=key).generate_state(1)[0])
        synthesize_fragment(
            frag.path,
            height_px=cfg.height_px,
            width_px=cfg.width_px,
            layers=cfg.layers,
            seed=frag_seed,
            labels=frag.split == "train",
            truth_path=frag.truth if frag.split == "test" else None,
            progress=progress,
            ink_contrast=cfg.ink_contrast,
        )
    return fragments


def synthesize_fragment(
    path: Path,
    *,
    height_px: int,
    width_px: int,
    layers: int = 65,
    seed: int = 0,
    labels: bool = True,
    truth_path: Path | None = None,
    progress: bool = False,
    ink_contrast: float = DEFAULT_INK_CONTRAST,
) -> None:
    """Write one synthetic fragment folder in the real layout.

    Writes ``path/surface_volume/00.tif`` … (``layers`` uint16 (H, W) slices; names have three
    digits when there are more than 100 layers), ``path/mask.png``, ``path/ir.png`` (8-bit (H, W))
    and, if ``labels``, ``path/inklabels.png`` (8-bit (H, W), 255 = ink). Every file is written
    atomically and a ``.synth_complete`` marker holding the parameters as JSON is written last.
    A complete folder with the same parameters is left as it is; an incomplete one (from an
    interrupted run) is deleted and written again.

    Args:
        path: the fragment folder.
        height_px: image height H, at least 64.
        width_px: image width W, at least 64.
        layers: number of slices, at least 8.
        seed: non-negative seed; the same seed writes byte-identical files.
        labels: write ``inklabels.png`` into the folder (train fragments).
        truth_path: if given, also write the ink labels there (the hidden truth of a test
            fragment).
        progress: show a progress bar over the slices.
        ink_contrast: peak ink density in units of the per-voxel noise-plus-texture standard
            deviation.

    Raises:
        ConfigError: a parameter is out of range, or ``path`` exists but was not written by this
            generator, or was written with other parameters.
    """
    _check_fragment_args(height_px, width_px, layers, seed, ink_contrast)
    path = Path(path)
    truth = Path(truth_path) if truth_path is not None else None
    params: dict[str, Any] = {
        "generator": "inkpipe.pipeline.synth",
        "format_version": FORMAT_VERSION,
        "height_px": int(height_px),
        "width_px": int(width_px),
        "layers": int(layers),
        "seed": int(seed),
        "ink_contrast": float(ink_contrast),
        "labels": bool(labels),
    }
    if _is_complete(path, params, truth):
        return
    _prepare_folder(path, params)

    fields = _make_fields(height_px, width_px, layers, seed, ink_contrast)
    label_png = (fields.labels * np.uint8(255)).astype(np.uint8)
    write_png(path / "mask.png", (fields.mask * np.uint8(255)).astype(np.uint8))
    write_png(path / "ir.png", _make_ir(fields, seed))
    if labels:
        write_png(path / "inklabels.png", label_png)
    if truth is not None:
        write_png(truth, label_png)
    del label_png

    volume_dir = path / "surface_volume"
    volume_dir.mkdir(exist_ok=True)
    digits = max(2, len(str(layers - 1)))
    slice_u16 = np.empty((height_px, width_px), dtype=np.uint16)
    for z in tqdm(range(layers), desc=f"synth {path.name}", unit="slice", disable=not progress):
        _render_slice(fields, z, seed, out=slice_u16)
        with atomic_write(volume_dir / f"{z:0{digits}d}.tif") as fh:
            tifffile.imwrite(fh, slice_u16)  # uncompressed, contiguous strips: read by offset

    with atomic_write(path / COMPLETE_MARKER) as fh:
        fh.write((json.dumps(params, indent=2, sort_keys=True) + "\n").encode())
    (path / STARTED_MARKER).unlink()


# --------------------------------------------------------------------------- validation


def _check_counts(n_train: int, n_test: int) -> None:
    """Check the numbers of train and test fragments of a set (shared with :mod:`~.semireal`)."""
    check_int("n_train", n_train, 0)
    check_int("n_test", n_test, 0, maximum=MAX_TEST_FRAGMENTS)
    if n_train + n_test == 0:
        raise ConfigError("n_train + n_test must be at least 1, got 0 fragments to write")


def _check_fragment_args(
    height_px: int, width_px: int, layers: int, seed: int, ink_contrast: float
) -> None:
    check_int("height_px", height_px, MIN_SIDE_PX)
    check_int("width_px", width_px, MIN_SIDE_PX)
    check_int("layers", layers, MIN_LAYERS, maximum=MAX_LAYERS)
    check_int("seed", seed, 0)
    check_number(
        "ink_contrast",
        ink_contrast,
        0.0,
        10.0,
        kind="a number",
        hint=f"in noise standard deviations, {DEFAULT_INK_CONTRAST} is the default",
    )


def _read_marker(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _is_complete(path: Path, params: dict[str, Any], truth: Path | None) -> bool:
    """Return whether ``path`` already holds this fragment; raise if it holds another."""
    marker = path / COMPLETE_MARKER
    if not marker.is_file():
        return False
    found = _read_marker(marker)
    if found is None:
        return False  # a damaged marker means an incomplete folder
    if found != params:
        keys = sorted(set(found) | set(params))
        was = {k: found.get(k) for k in keys if found.get(k) != params.get(k)}
        asked = {k: params.get(k) for k in was}
        raise ConfigError(
            f"{path} was synthesized with {was}, asked for {asked}; "
            "delete the folder or choose another output folder"
        )
    return truth is None or truth.is_file()


def _prepare_folder(path: Path, params: dict[str, Any]) -> None:
    """Make ``path`` an empty folder marked as started, deleting our own unfinished output."""
    if path.exists():
        if not path.is_dir():
            raise ConfigError(f"{path} exists and is not a folder; delete it or choose another")
        entries = list(path.iterdir())
        ours = (path / STARTED_MARKER).is_file() or (path / COMPLETE_MARKER).is_file()
        if entries and not ours:
            # Never delete a folder this generator did not write (it may be real data).
            raise ConfigError(
                f"{path} exists and was not written by the synthesizer; "
                "delete it or choose another output folder"
            )
        shutil.rmtree(path)
    path.mkdir(parents=True)
    (path / STARTED_MARKER).write_text(json.dumps(params, sort_keys=True) + "\n")


# --------------------------------------------------------------------------- random fields


def _rng(seed: int, *key: int) -> np.random.Generator:
    """Return the generator for one purpose (``key``) of a fragment (``seed``)."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


def _band_rows(width_px: int) -> int:
    return max(1, _BAND_PX // width_px)


def _lerp_weights(n: int, step: float) -> tuple[NDArray[np.intp], F32]:
    """Return grid index and weight of each of ``n`` pixels on a grid with ``step`` px cells."""
    pos = np.arange(n, dtype=np.float64) / step
    index = np.floor(pos).astype(np.intp)
    return index, (pos - index).astype(np.float32)


def _bilinear(nodes: F32, step: float, height_px: int, width_px: int, r0: int, r1: int) -> F32:
    """Interpolate rows ``r0:r1`` of a field given on grid nodes every ``step`` px.

    Args:
        nodes: (ny, nx) float32 node values; node (i, j) sits at pixel (i * step, j * step) and
            the grid must cover the image: ``(ny - 1) * step >= height_px - 1`` (same for x).
        step: node spacing in pixels.
        height_px: image height H.
        width_px: image width W.
        r0: first row.
        r1: end row (exclusive).

    Returns:
        (r1 - r0, W) float32.
    """
    iy, ty = _lerp_weights(height_px, step)
    ix, tx = _lerp_weights(width_px, step)
    iy, ty = iy[r0:r1], ty[r0:r1, None]
    rows = nodes[iy] * (1 - ty) + nodes[iy + 1] * ty
    return (rows[:, ix] * (1 - tx) + rows[:, ix + 1] * tx).astype(np.float32, copy=False)


@dataclass(frozen=True)
class _Grid:
    """A smooth field stored on a coarse grid; ``band`` interpolates it at full resolution."""

    nodes: F32
    step: float
    height_px: int
    width_px: int

    def band(self, r0: int, r1: int) -> F32:
        return _bilinear(self.nodes, self.step, self.height_px, self.width_px, r0, r1)

    def full(self) -> F32:
        out = np.empty((self.height_px, self.width_px), dtype=np.float32)
        rows = _band_rows(self.width_px)
        for r0 in range(0, self.height_px, rows):
            out[r0 : r0 + rows] = self.band(r0, min(self.height_px, r0 + rows))
        return out


def _smooth_grid(rng: np.random.Generator, height_px: int, width_px: int, cell_px: float) -> _Grid:
    """Return smooth noise, about unit standard deviation, with features about ``cell_px`` big.

    Random values on a ``cell_px`` lattice are spline-interpolated (cubic) onto a finer grid of
    at most 8 px steps; full resolution is then bilinear, so the field is cheap at any size.
    """
    cell = max(float(cell_px), 2.0)
    step = float(max(1, min(8, int(cell // 4))))
    ny = int((height_px - 1) // step) + 2
    nx = int((width_px - 1) // step) + 2
    coarse = rng.standard_normal((int(ny * step / cell) + 5, int(nx * step / cell) + 5)).astype(
        np.float32
    )
    cy = 2.0 + np.arange(ny) * (step / cell)
    cx = 2.0 + np.arange(nx) * (step / cell)
    coords = np.stack(np.meshgrid(cy, cx, indexing="ij"))
    nodes = ndimage.map_coordinates(coarse, coords, order=3, mode="mirror").astype(np.float32)
    return _Grid(nodes, step, height_px, width_px)


def _smooth_noise(rng: np.random.Generator, height_px: int, width_px: int, cell_px: float) -> F32:
    """Return (H, W) float32 smooth noise with features about ``cell_px`` big (see _smooth_grid)."""
    return _smooth_grid(rng, height_px, width_px, cell_px).full()


def _streaks(
    rng: np.random.Generator,
    height_px: int,
    width_px: int,
    cross_px: float,
    length_px: float,
    vertical: bool = False,
) -> F32:
    """Return (H, W) float32 streaks of unit standard deviation (fibres), computed in row bands.

    Each streak is ``cross_px`` wide and varies along its length every ``length_px``; streaks run
    along x, or along y if ``vertical``. Every streak of the lattice is shifted along its length
    by a random phase, and the interpolation is variance-normalized, so the lattice leaves no
    visible pattern.
    """
    across_n, along_n = (width_px, height_px) if vertical else (height_px, width_px)
    n_streaks = int(math.ceil((across_n - 1) / cross_px)) + 2
    n_along = int(math.ceil((along_n - 1) / length_px)) + 3
    lattice = rng.standard_normal((n_streaks, n_along)).astype(np.float32)
    phase = rng.random(n_streaks)
    i_across, t_across = _lerp_weights(across_n, cross_px)
    streak_ids = np.arange(n_streaks)
    out = np.empty((height_px, width_px), dtype=np.float32)
    rows = _band_rows(width_px)
    for r0 in range(0, height_px, rows):
        r1 = min(height_px, r0 + rows)
        if vertical:  # every streak sampled at the band's rows, then spread across x
            ids = streak_ids[None, :]
            pos = np.arange(r0, r1, dtype=np.float64)[:, None] / length_px + phase[ids]
        else:  # the streaks the band's rows need, sampled along x, then spread across y
            lo, hi = int(i_across[r0:r1].min()), int(i_across[r0:r1].max()) + 2
            ids = streak_ids[lo:hi, None]
            pos = np.arange(width_px, dtype=np.float64)[None, :] / length_px + phase[ids]
        j = np.floor(pos).astype(np.intp)
        tj = (pos - j).astype(np.float32)
        values = lattice[ids, j] * (1 - tj) + lattice[ids, j + 1] * tj
        values /= np.sqrt((1 - tj) ** 2 + tj**2)
        if vertical:
            idx, t = i_across, t_across[None, :]
            band = values[:, idx] * (1 - t) + values[:, idx + 1] * t
        else:
            idx, t = i_across[r0:r1] - lo, t_across[r0:r1, None]
            band = values[idx] * (1 - t) + values[idx + 1] * t
        band /= np.sqrt((1 - t) ** 2 + t**2)
        out[r0:r1] = band
    return out


# --------------------------------------------------------------------------- 2-D fields


@dataclass(frozen=True)
class _Fields:
    """The 2-D fields that define a fragment; all (H, W).

    Attributes:
        mask: uint8 0/1, 1 = papyrus.
        labels: uint8 0/1, 1 = ink (only inside the mask).
        ink_density: float32 in [0, ~1.6], how much ink; soft-edged and faded in patches.
        surface_z: float32, depth (in layers) of the top of the papyrus sheet.
        bottom_z: float32, depth of the bottom of the sheet.
        air: float32, grey value of air.
        papyrus: float32, grey value of the sheet above air (0 outside the mask).
        fibre_h: float32, fibre texture of the upper ply (0 outside the mask).
        fibre_v: float32, fibre texture of the lower ply (0 outside the mask).
        ink_peak: grey value the ink adds at its peak depth where ``ink_density`` is 1.
        letter_px: letter height in pixels.
    """

    mask: U8
    labels: U8
    ink_density: F32
    surface_z: F32
    bottom_z: F32
    air: F32
    papyrus: F32
    fibre_h: F32
    fibre_v: F32
    ink_peak: float
    letter_px: float

    @property
    def ink_z(self) -> F32:
        """(H, W) float32 depth (in layers) of the ink density peak."""
        return self.surface_z + np.float32(INK_OFFSET_Z)


def _make_fields(
    height_px: int, width_px: int, layers: int, seed: int, ink_contrast: float
) -> _Fields:
    """Compute every 2-D field of a fragment (see :class:`_Fields`)."""
    h, w = height_px, width_px
    mask = _make_mask(_rng(seed, _KEY_MASK), h, w)
    rng = _rng(seed, _KEY_TEXT)
    letter_px = float(np.clip(0.08 * min(h, w) * rng.uniform(0.85, 1.15), 24.0, 150.0))
    drawn = _draw_text(rng, mask, letter_px)
    labels = drawn & mask

    rng = _rng(seed, _KEY_DENSITY)
    # Ink soaks in with soft edges and faded patches.
    ink_density = ndimage.gaussian_filter(
        drawn.astype(np.float32), sigma=max(0.6, letter_px / 80), truncate=3.0
    )
    del drawn
    fade = _smooth_noise(rng, h, w, 2.5 * letter_px)
    fade *= 0.3
    fade += 1.0
    np.clip(fade, 0.4, 1.6, out=fade)
    ink_density *= fade
    del fade
    ink_density *= mask

    air = _smooth_noise(rng, h, w, min(h, w) / 2)
    air *= _AIR_DRIFT
    air += _AIR
    papyrus = _smooth_noise(rng, h, w, min(h, w) / 4)
    papyrus *= _PAPYRUS_DRIFT
    papyrus += _PAPYRUS
    papyrus *= mask

    rng = _rng(seed, _KEY_DEPTH)
    relief = _smooth_noise(rng, h, w, max(h, w) / 2)
    relief *= 0.8
    finer = _smooth_noise(rng, h, w, min(h, w) / 6)
    finer *= 0.35
    relief += finer
    del finer
    amplitude = min(6.0, 0.1 * layers)
    surface_z = np.tanh(relief * np.float32(0.8))
    surface_z *= amplitude
    surface_z += np.float32(0.45 * layers)
    thickness = _smooth_noise(rng, h, w, min(h, w) / 3)
    thickness *= 0.12
    thickness += 1.0
    thickness *= max(2.0, 0.2 * layers)
    bottom_z = surface_z + thickness
    del thickness, relief

    rng = _rng(seed, _KEY_FIBRE)
    fibre_h = _fibres(rng, h, w, letter_px, vertical=False)
    fibre_v = _fibres(rng, h, w, letter_px, vertical=True)
    for fibre in (fibre_h, fibre_v):
        fibre *= _FIBRE_STD
        fibre *= mask
    return _Fields(
        mask=mask,
        labels=labels,
        ink_density=ink_density,
        surface_z=surface_z.astype(np.float32, copy=False),
        bottom_z=bottom_z.astype(np.float32, copy=False),
        air=air,
        papyrus=papyrus,
        fibre_h=fibre_h,
        fibre_v=fibre_v,
        ink_peak=float(ink_contrast) * VOXEL_STD,
        letter_px=letter_px,
    )


def _fibres(
    rng: np.random.Generator, height_px: int, width_px: int, letter_px: float, vertical: bool
) -> F32:
    """Return (H, W) float32 fibre texture of one papyrus ply, about unit standard deviation.

    Fine fibres 1–4 px across plus coarser bundles, all long along x (along y if ``vertical``).
    """
    h, w = height_px, width_px
    fine = _streaks(rng, h, w, max(1.0, letter_px / 40), max(6.0, letter_px / 2), vertical)
    coarse = _streaks(rng, h, w, max(3.0, letter_px / 6), max(16.0, 2 * letter_px), vertical)
    fine *= 0.8
    coarse *= 0.6
    fine += coarse
    return fine


def _make_mask(rng: np.random.Generator, height_px: int, width_px: int) -> U8:
    """Return a (H, W) uint8 0/1 papyrus outline: an irregular blob with ragged edges and holes."""
    h, w = height_px, width_px
    side = min(h, w)
    cy, cx = h * rng.uniform(0.45, 0.55), w * rng.uniform(0.45, 0.55)
    ry, rx = h * rng.uniform(0.42, 0.5), w * rng.uniform(0.42, 0.5)
    dy = ((np.arange(h, dtype=np.float32) - cy) / ry) ** 2
    dx = ((np.arange(w, dtype=np.float32) - cx) / rx) ** 2
    shape = np.float32(1.0) - dy[:, None] - dx[None, :]
    for cell, weight in ((side / 2.5, 0.35), (side / 10, 0.12), (max(3.0, side / 60), 0.05)):
        octave = _smooth_noise(rng, h, w, cell)
        octave *= weight
        shape += octave
    del octave
    coverage = rng.uniform(0.62, 0.78)
    sample = shape[:: max(1, h // 512), :: max(1, w // 512)]
    mask = shape > np.quantile(sample, 1 - coverage)
    del shape
    holes = _smooth_noise(rng, h, w, side / 20)
    holes += _smooth_noise(rng, h, w, max(3.0, side / 80)) * np.float32(0.3)
    sample = holes[:: max(1, h // 512), :: max(1, w // 512)]
    mask &= holes < np.quantile(sample, 0.99)
    return mask.astype(np.uint8)


# --------------------------------------------------------------------------- letters


def _arc(cx: float, cy: float, rx: float, ry: float, a0: float, a1: float) -> list[tuple]:
    angles = np.linspace(math.radians(a0), math.radians(a1), 16)
    return [(cx + rx * math.cos(a), cy + ry * math.sin(a)) for a in angles]


# Glyphs in a unit box (x right, y down, 0 = top of the letter), strokes as polylines; loosely
# the Greek uncials of the Herculaneum papyri.
_GLYPHS: list[list[list[tuple]]] = [
    [_arc(0.35, 0.5, 0.35, 0.5, 0, 360)],  # O
    [_arc(0.4, 0.5, 0.4, 0.5, 50, 310)],  # lunate sigma
    [_arc(0.4, 0.5, 0.4, 0.5, 50, 310), [(0.05, 0.5), (0.5, 0.5)]],  # E
    [[(0.3, 0.0), (0.3, 1.0)]],  # I
    [[(0.0, 0.0), (0.7, 0.0)], [(0.35, 0.0), (0.35, 1.0)]],  # T
    [[(0.0, 0.0), (0.75, 0.0)], [(0.1, 0.0), (0.1, 1.0)], [(0.65, 0.0), (0.65, 1.0)]],  # Pi
    [[(0.0, 1.0), (0.35, 0.0), (0.7, 1.0)]],  # Lambda
    [[(0.0, 1.0), (0.35, 0.0), (0.7, 1.0)], [(0.15, 0.6), (0.55, 0.6)]],  # A
    [[(0.0, 1.0), (0.0, 0.0), (0.7, 1.0), (0.7, 0.0)]],  # N
    [[(0.0, 0.0), (0.0, 1.0)], [(0.7, 0.0), (0.7, 1.0)], [(0.0, 0.5), (0.7, 0.5)]],  # H
    [[(0.0, 0.0), (0.35, 0.5), (0.7, 0.0)], [(0.35, 0.5), (0.35, 1.0)]],  # Y
    [[(0.05, 0.0), (0.05, 1.0)], [(0.6, 0.0), (0.05, 0.55), (0.65, 1.0)]],  # K
    [[(0.0, 1.0), (0.1, 0.0), (0.4, 0.7), (0.7, 0.0), (0.8, 1.0)]],  # M
    [[(0.1, 1.0), (0.1, 0.0)], _arc(0.1, 0.27, 0.45, 0.27, -90, 90)],  # P
    [_arc(0.2, 0.55, 0.2, 0.35, -20, 200), _arc(0.6, 0.55, 0.2, 0.35, -20, 200)],  # omega
    [[(0.0, 0.0), (0.7, 0.0)], [(0.05, 1.0), (0.7, 1.0)], _arc(0.35, 0.5, 0.3, 0.1, 180, 360)],
]
_GLYPH_WIDTH = [0.7, 0.8, 0.8, 0.3, 0.7, 0.75, 0.7, 0.7, 0.7, 0.7, 0.7, 0.65, 0.8, 0.55, 0.8, 0.7]


def _draw_text(rng: np.random.Generator, mask: U8, letter_px: float) -> U8:
    """Return (H, W) uint8 0/1 strokes of lines of hand-written letters over the mask's extent.

    Letters are ``letter_px`` high with strokes about ``letter_px / 6`` (at least 3 px) wide,
    lines 2–2.5 letter heights apart, with word gaps, wavy baselines, slant and jitter.
    """
    h, w = mask.shape
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    canvas = Image.new("L", (w, h), 0)
    if rows.size == 0:
        return np.zeros((h, w), dtype=np.uint8)
    draw = ImageDraw.Draw(canvas)
    stroke_px = max(3.0, letter_px / 6)
    line_px = letter_px * rng.uniform(2.0, 2.5)
    left, right = cols[0], cols[-1]
    y = rows[0] + rng.uniform(0.2, 1.0) * letter_px
    while y + letter_px < rows[-1]:
        x = left + rng.uniform(0.0, 1.5) * letter_px
        wave_phase, wave_px = rng.uniform(0, 2 * math.pi), rng.uniform(10, 30) * letter_px
        tilt = rng.normal(0.0, 0.02)
        until_gap = rng.integers(2, 9)
        while x + letter_px < right:
            glyph = int(rng.integers(len(_GLYPHS)))
            size = letter_px * rng.uniform(0.85, 1.15)
            base = (
                y
                + tilt * (x - left)
                + 0.1 * letter_px * math.sin(wave_phase + 2 * math.pi * x / wave_px)
                + rng.normal(0.0, 0.04) * letter_px
            )
            slant = rng.normal(0.12, 0.05)
            if rng.random() > 0.08:  # some letters are lost
                for stroke in _GLYPHS[glyph]:
                    pts = np.asarray(stroke, dtype=np.float64)
                    # A shifted pen plus a shaky hand.
                    pts = pts + rng.normal(0.0, 0.03, 2) + rng.normal(0.0, 0.02, pts.shape)
                    px = x + size * (pts[:, 0] + slant * (1 - pts[:, 1]))
                    py = base + size * pts[:, 1]
                    width = int(round(stroke_px * rng.uniform(0.8, 1.25)))
                    xy = list(zip(px.tolist(), py.tolist()))
                    draw.line(xy, fill=1, width=width, joint="curve")
                    r = width / 2
                    for ex, ey in (xy[0], xy[-1]):  # round pen ends
                        draw.ellipse((ex - r, ey - r, ex + r, ey + r), fill=1)
            x += size * (_GLYPH_WIDTH[glyph] + rng.uniform(0.2, 0.4))
            until_gap -= 1
            if until_gap == 0:
                x += letter_px * rng.uniform(0.4, 0.9)
                until_gap = rng.integers(2, 9)
        y += line_px
    return np.asarray(canvas, dtype=np.uint8).copy()


# --------------------------------------------------------------------------- rendering


def _make_ir(fields: _Fields, seed: int) -> U8:
    """Return the (H, W) uint8 infrared photo: bright fibrous papyrus, darker ink, dark ground."""
    rng = _rng(seed, _KEY_IR)
    h, w = fields.mask.shape
    light = _smooth_grid(rng, h, w, min(h, w) / 3)
    ir = np.empty((h, w), dtype=np.uint8)
    rows = _band_rows(w)
    for r0 in range(0, h, rows):
        r1 = min(h, r0 + rows)
        band = light.band(r0, r1)
        band *= 12.0
        band += 160.0
        band += (fields.fibre_h[r0:r1] + fields.fibre_v[r0:r1]) * np.float32(6.0 / _FIBRE_STD)
        band -= fields.ink_density[r0:r1] * np.float32(70.0)
        band *= fields.mask[r0:r1]
        band += 12.0
        band += rng.standard_normal((r1 - r0, w), dtype=np.float32) * np.float32(3.0)
        np.rint(band, out=band)
        np.clip(band, 0, 255, out=band)
        ir[r0:r1] = band
    return ir


def _sigmoid(x: F32, out: F32) -> F32:
    np.multiply(x, 0.5, out=out)
    np.tanh(out, out=out)
    out *= 0.5
    out += 0.5
    return out


def _render_slice(fields: _Fields, z: int, seed: int, out: NDArray[np.uint16]) -> None:
    """Render slice ``z`` into ``out`` ((H, W) uint16), row band by row band."""
    h, w = fields.mask.shape
    rng = _rng(seed, _KEY_SLICE, z)  # one generator per slice: any slice is reproducible alone
    drift = _smooth_grid(rng, h, w, max(h, w) / 2)
    zf = np.float32(z)
    ink_reach = INK_OFFSET_Z + 4 * INK_SIGMA_Z
    rows = _band_rows(w)
    for r0 in range(0, h, rows):
        r1 = min(h, r0 + rows)
        surface = fields.surface_z[r0:r1]
        bottom = fields.bottom_z[r0:r1]
        depth = zf - surface  # layers below the surface (negative in air)
        sheet = _sigmoid(depth * np.float32(1 / _SURFACE_EDGE_Z), np.empty_like(depth))
        sheet *= _sigmoid((bottom - zf) * np.float32(1 / _BOTTOM_EDGE_Z), np.empty_like(depth))
        # Horizontal fibres in the upper half of the sheet, vertical ones in the lower half.
        ply = depth - (bottom - surface) * np.float32(0.5)
        _sigmoid(ply * np.float32(1 / _PLY_EDGE_Z), out=ply)
        fibre_h = fields.fibre_h[r0:r1]
        value = fields.fibre_v[r0:r1] - fibre_h
        value *= ply
        value += fibre_h
        value += fields.papyrus[r0:r1]
        value *= sheet
        value += fields.air[r0:r1]
        if float(surface.min()) - ink_reach < zf < float(surface.max()) + ink_reach:
            depth -= np.float32(INK_OFFSET_Z)
            np.square(depth, out=depth)
            depth *= np.float32(-0.5 / INK_SIGMA_Z**2)
            np.exp(depth, out=depth)
            depth *= fields.ink_density[r0:r1]
            depth *= np.float32(fields.ink_peak)
            value += depth
        value += drift.band(r0, r1) * np.float32(_SLICE_DRIFT)
        noise = rng.standard_normal((r1 - r0, w), dtype=np.float32)
        noise *= np.float32(_NOISE_STD)
        value += noise
        np.rint(value, out=value)
        np.clip(value, 0, 65535, out=value)
        out[r0:r1] = value
