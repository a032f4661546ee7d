"""Sliding-window prediction with Gaussian blending (after MONAI ``sliding_window_inference``).

Axis order is (y, x) for 2-D arrays and (C, y, x) for images; windows are square tiles of
``tile_px`` placed every ``stride_px``, the last one ending exactly at the edge.

Edge policy for images smaller than a tile: :func:`sliding_window_predict` pads the image at
the bottom/right up to one tile (zeros by default, like MONAI) and the
:class:`BlendAccumulator` *clips* windows that overhang the canvas, so the padded part of a
prediction is dropped and the result has the image's own (H, W), with no crop step.

The predictor is any ``(B, C, t, t) float32 -> (B, t, t) float32`` NumPy callable; blending knows
nothing of models, TTA or ensembles (wrap the predictor with :mod:`inkpipe.infer.tta`).

Tiles are read a few batches ahead by a background thread while the predictor runs on the
batch before, and the predictions are blended into the canvas by a second one while the
predictor runs on the batch after, so the thread that drives the model (a GPU's, say) does
nothing else: reading releases the GIL in decompression and NumPy copies, blending in NumPy
additions, and a torch forward pass (or a wait for the device) in its C++ code. While the
threads run, a thread waiting for the GIL asks for it after 0.5 ms instead of Python's 5 ms
(:func:`short_gil_turns`), so the model's thread does not idle for most of a small batch's
forward pass behind the Python code of the other two.
"""

from __future__ import annotations

import queue
import sys
import threading
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from numpy.typing import ArrayLike, DTypeLike, NDArray

from inkpipe.pipeline.checks import check_int, check_number
from inkpipe.pipeline.disk import reserve
from inkpipe.pipeline.errors import ConfigError, InvalidInputError, check_choice
from inkpipe.pipeline.windows import grid_windows, holds_valid_pixel

Predictor = Callable[[NDArray[np.float32]], NDArray[np.float32]]
"""(B, C, t, t) float32 -> (B, t, t) float32 (a (B, 1, t, t) output is also accepted)."""


class PadMode(StrEnum):
    """How an image smaller than a tile is padded (see :func:`sliding_window_predict`)."""

    CONSTANT = "constant"
    REFLECT = "reflect"


_RESULT_ROWS = 1024  # rows per block when dividing sum by weight, to bound temporaries
READ_AHEAD_BATCHES = 2  # batches read ahead of the predictor by default
BLEND_BEHIND_BATCHES = 2  # predicted batches that may wait for the blending thread
GIL_TURN_S = 0.0005  # Python's switch interval while the reading and blending threads run

Item = TypeVar("Item")


def gaussian_importance(
    tile_px: int, sigma_frac: float = 1 / 8, min_weight: float = 1e-3
) -> NDArray[np.float32]:
    """Return a 2-D Gaussian importance map for blending overlapping tiles.

    Centre pixels of a tile get weight 1 and edge pixels, where the model sees least context,
    get little; ``min_weight`` keeps every weight positive so every covered pixel is defined.

    Args:
        tile_px: tile side in pixels (>= 1).
        sigma_frac: Gaussian sigma as a fraction of ``tile_px`` (> 0); MONAI/nnU-Net use 1/8.
        min_weight: floor of the map, in (0, 1].

    Returns:
        (tile_px, tile_px) float32 array in [min_weight, 1], maximum 1 at the centre.
    """
    tile_px = check_int("tile_px", tile_px, 1, "use the model's tile size, e.g. 256")
    check_number("sigma_frac", sigma_frac, 0, low_open=True, hint="the default is 1/8")
    check_number("min_weight", min_weight, 0, 1, low_open=True, hint="the default is 1e-3")
    sigma = sigma_frac * tile_px
    centre = (tile_px - 1) / 2
    d = np.arange(tile_px, dtype=np.float64) - centre
    g = np.exp(-(d * d) / (2 * sigma * sigma))
    importance = np.outer(g, g)
    importance /= importance.max()
    return np.maximum(importance, min_weight).astype(np.float32)


class BlendAccumulator:
    """Accumulate weighted tile predictions into a canvas; divide once at the end.

    Holds two (H, W) canvases, the weighted sum of predictions and the sum of weights, in RAM
    or, when ``out_dir`` is given, as ``.npy`` memory maps ``blend_sum.npy`` and
    ``blend_weight.npy`` in that folder (existing files are overwritten) for canvases larger
    than the memory budget.

    Windows may overhang the bottom/right edge of the canvas (e.g. when the image is smaller
    than a tile and was padded): the overhanging part is clipped away.
    """

    def __init__(
        self,
        shape: tuple[int, int],
        tile_px: int,
        weight: ArrayLike | None = None,
        dtype: DTypeLike = np.float32,
        out_dir: Path | None = None,
    ) -> None:
        """Create empty canvases.

        Args:
            shape: (H, W) of the output.
            tile_px: window side in pixels.
            weight: (tile_px, tile_px) positive float importance map; default
                :func:`gaussian_importance` of ``tile_px``.
            dtype: floating dtype of the canvases (float32 or float64).
            out_dir: folder for memory-mapped canvases; None keeps them in RAM.
        """
        if len(shape) != 2:
            raise ConfigError(f"shape must be (H, W), got {shape!r}")
        height = check_int("height", shape[0], 1, "the canvas must not be empty")
        width = check_int("width", shape[1], 1, "the canvas must not be empty")
        self.shape = (height, width)
        self.tile_px = check_int("tile_px", tile_px, 1, "use the model's tile size, e.g. 256")
        self.dtype = np.dtype(dtype)
        if not np.issubdtype(self.dtype, np.floating):
            raise ConfigError(f"dtype must be floating, got {self.dtype}; use np.float32")
        w = gaussian_importance(self.tile_px) if weight is None else np.asarray(weight)
        if w.shape != (self.tile_px, self.tile_px):
            raise ConfigError(
                f"weight has shape {w.shape}, expected ({self.tile_px}, {self.tile_px}); "
                "pass an importance map of one tile"
            )
        if not (np.all(np.isfinite(w)) and np.all(w > 0)):
            raise ConfigError("weight must be finite and > 0 everywhere; clamp it to a minimum")
        self.weight = w.astype(self.dtype)
        self.out_dir = None if out_dir is None else Path(out_dir)
        self.sum: NDArray[np.floating]
        self.weights: NDArray[np.floating]
        if self.out_dir is None:
            self.sum = np.zeros(self.shape, dtype=self.dtype)
            self.weights = np.zeros(self.shape, dtype=self.dtype)
        else:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            # open_memmap files start zero-filled (sparse), so no explicit fill is needed.
            self.sum = np.lib.format.open_memmap(
                self.out_dir / "blend_sum.npy", mode="w+", dtype=self.dtype, shape=self.shape
            )
            self.weights = np.lib.format.open_memmap(
                self.out_dir / "blend_weight.npy", mode="w+", dtype=self.dtype, shape=self.shape
            )
            # Sparse files would take their blocks as pages are first written, and a full
            # disk then kills the process (SIGBUS); allocated now, it is an OSError here.
            for name in ("blend_sum.npy", "blend_weight.npy"):
                reserve(self.out_dir / name, (self.out_dir / name).stat().st_size)

    def add(self, prob: ArrayLike, origins: ArrayLike) -> None:
        """Add a batch of tile predictions.

        Args:
            prob: (n, tile_px, tile_px) float array of finite predictions.
            origins: (n, 2) int array of window corners ``(y0, x0)`` inside the canvas
                (``0 <= y0 < H``, ``0 <= x0 < W``); windows may overhang the bottom/right edge.

        Raises:
            InvalidInputError: shapes do not match, values are not finite, or an origin lies
                outside the canvas.
        """
        p = np.asarray(prob)
        o = np.asarray(origins)
        t = self.tile_px
        if p.ndim != 3 or p.shape[1:] != (t, t):
            raise InvalidInputError(
                f"prob has shape {p.shape}, expected (n, {t}, {t}); the predictor must return "
                "one (tile, tile) map per window"
            )
        if o.shape != (p.shape[0], 2) or not np.issubdtype(o.dtype, np.integer):
            raise InvalidInputError(
                f"origins has shape {o.shape} and dtype {o.dtype}, expected ({p.shape[0]}, 2) "
                "integers (y0, x0), one per tile"
            )
        if not np.all(np.isfinite(p)):
            raise InvalidInputError("prob contains NaN or inf; check the model output")
        height, width = self.shape
        weighted = np.multiply(p, self.weight, dtype=self.dtype)  # the whole batch at once
        for (y0, x0), tile in zip(o.tolist(), weighted, strict=True):
            if not (0 <= y0 < height and 0 <= x0 < width):
                raise InvalidInputError(
                    f"window origin ({y0}, {x0}) lies outside the {height}x{width} canvas; "
                    "expected 0 <= y0 < H and 0 <= x0 < W"
                )
            h = min(t, height - y0)
            w = min(t, width - x0)
            self.sum[y0 : y0 + h, x0 : x0 + w] += tile[:h, :w]
            self.weights[y0 : y0 + h, x0 : x0 + w] += self.weight[:h, :w]

    def result(self, out: NDArray[np.float32] | None = None) -> NDArray[np.float32]:
        """Return the blended prediction ``sum / weight``, 0 where nothing was added.

        The division runs in row blocks, so a memory-mapped canvas never needs a full-size
        temporary.

        Args:
            out: optional (H, W) float32 array (e.g. a memory map) to write into.

        Returns:
            (H, W) float32 array (``out`` if given).
        """
        if out is None:
            out = np.zeros(self.shape, dtype=np.float32)
        elif out.shape != self.shape or out.dtype != np.float32:
            raise InvalidInputError(
                f"out has shape {out.shape} and dtype {out.dtype}, expected {self.shape} float32"
            )
        for lo in range(0, self.shape[0], _RESULT_ROWS):
            s = self.sum[lo : lo + _RESULT_ROWS]
            w = self.weights[lo : lo + _RESULT_ROWS]
            block = np.zeros(s.shape, dtype=self.dtype)
            np.divide(s, w, out=block, where=w > 0)
            out[lo : lo + _RESULT_ROWS] = block
        return out

    def flush(self) -> None:
        """Write memory-mapped canvases to disk (no-op in RAM)."""
        for canvas in (self.sum, self.weights):
            if isinstance(canvas, np.memmap):
                canvas.flush()


@contextmanager
def short_gil_turns(seconds: float = GIL_TURN_S) -> Generator[None, None, None]:
    """Shorten Python's thread switch interval (``sys.setswitchinterval``) for the block.

    A thread that wants the GIL waits one switch interval (5 ms by default) before it asks the
    holder to let go. In prediction the model's thread takes the GIL back after every forward
    pass, which takes a few ms for the CPU recipe's batch or on a GPU; the reading and blending
    threads' Python code would delay it by up to the interval each time. The interval goes back
    to what it was on leaving (a longer one set by the caller is shortened only inside).
    """
    before = sys.getswitchinterval()
    sys.setswitchinterval(min(before, seconds))
    try:
        yield
    finally:
        sys.setswitchinterval(before)


def _batches(items: NDArray[np.int64], batch_size: int) -> Iterator[NDArray[np.int64]]:
    for lo in range(0, len(items), batch_size):
        yield items[lo : lo + batch_size]


_END = object()  # marks the end of the items in read_in_background's queue


def read_in_background(items: Iterable[Item], depth: int) -> Generator[Item, None, None]:
    """Yield ``items`` in order, produced by a background thread up to ``depth`` ahead.

    The thread runs ``iter(items)`` and keeps at most ``depth`` finished items waiting (plus
    the one it is producing). An exception it meets is raised here, at the item it would have
    produced. When the caller stops early (an exception, or ``close()`` of this generator),
    the thread stops after the item in hand and is joined.

    Args:
        items: an iterable (e.g. a generator reading batches of tiles).
        depth: items kept ready ahead (>= 1).
    """
    depth = check_int("depth", depth, 1, "e.g. 2")
    ready: queue.Queue[tuple[bool, Any]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(entry: tuple[bool, Any]) -> bool:
        while not stop.is_set():
            try:
                ready.put(entry, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((True, item)):
                    return
            put((True, _END))
        except BaseException as exc:  # noqa: BLE001  # raised again in the reader, at its item
            put((False, exc))

    thread = threading.Thread(target=produce, name="inkpipe-read-tiles", daemon=True)
    thread.start()
    try:
        while True:
            ok, item = ready.get()
            if not ok:
                raise item
            if item is _END:
                return
            yield item
    finally:
        stop.set()
        thread.join()


def _read_batches(
    source: Any, batches: list[NDArray[np.int64]], channels: int, tile_px: int
) -> Generator[NDArray[np.float32], None, None]:
    """Yield the (n, C, t, t) float32 crops of each batch of origins, in order.

    A source with ``read_windows`` (``VolumeView``) reads whole batches, the blocks of the
    next batch decoded ahead; anything else is sliced window by window.
    """
    t = tile_px
    read_windows = getattr(source, "read_windows", None)
    for b, batch in enumerate(batches):
        if read_windows is not None:
            coming = batches[b + 1] if b + 1 < len(batches) else None
            yield np.asarray(read_windows(batch, t, coming), dtype=np.float32)
            continue
        crops = np.empty((len(batch), channels, t, t), dtype=np.float32)
        for i, (y, x) in enumerate(batch.tolist()):
            crops[i] = source[:, y : y + t, x : x + t]
        yield crops


def sliding_window_predict(
    image: ArrayLike,
    predictor: Predictor,
    tile_px: int,
    stride_px: int,
    batch_size: int = 8,
    valid: ArrayLike | None = None,
    weight: ArrayLike | None = None,
    pad_mode: PadMode | str = PadMode.CONSTANT,
    out_dir: Path | None = None,
    read_ahead: int = READ_AHEAD_BATCHES,
    blend_behind: int = BLEND_BEHIND_BATCHES,
) -> NDArray[np.float32]:
    """Predict a whole image tile by tile and blend the tiles with an importance map.

    Windows come from :func:`grid_windows`; each crop is cast to float32 and handed to
    ``predictor`` in batches (normalization is the predictor's job), read by a background
    thread up to ``read_ahead`` batches ahead of the predictor, and its outputs are blended by
    another, at most ``blend_behind`` batches waiting behind the one it blends. Windows
    without a single valid pixel are skipped; pixels covered only by skipped windows come out
    0. The output is not masked by ``valid`` otherwise (post-processing applies the papyrus
    mask).

    An image smaller than a tile is padded at the bottom/right to one tile with ``pad_mode``
    (``"constant"``: zeros, as MONAI; ``"reflect"``: mirrored) and the padding is dropped from
    the output. With a pointwise predictor the output equals the predictor applied to the
    whole image.

    Args:
        image: (C, H, W) array-like supporting NumPy slicing (NumPy, memmap, Zarr); only the
            crops are read unless the image is smaller than a tile. An image with a
            ``read_windows(origins, tile_px, read_ahead)`` method (``VolumeView``) is read a
            batch at a time, the next batch read ahead.
        predictor: ``(B, C, tile_px, tile_px) float32 -> (B, tile_px, tile_px)`` float
            (``(B, 1, t, t)`` is accepted too).
        tile_px: window side in pixels.
        stride_px: step between windows, in [1, tile_px].
        batch_size: windows per predictor call (>= 1).
        valid: optional (H, W) bool array, e.g. the papyrus mask.
        weight: (tile_px, tile_px) importance map; default :func:`gaussian_importance`.
        pad_mode: a :class:`PadMode` or its value, ``"constant"`` or ``"reflect"``.
        out_dir: folder for memory-mapped blend canvases (see :class:`BlendAccumulator`).
        read_ahead: batches read ahead in a background thread (0: read each batch in this
            thread just before predicting it). The predictor always runs in this thread.
        blend_behind: predicted batches that may wait for the blending thread (0: blend each
            batch in this thread before predicting the next).

    Returns:
        (H, W) float32 array.
    """
    shape = getattr(image, "shape", None)
    if shape is None or len(shape) != 3:
        raise InvalidInputError(
            f"image has shape {shape}, expected (C, H, W); add a channel axis with image[None]"
        )
    channels, height, width = (int(s) for s in shape)
    batch_size = check_int("batch_size", batch_size, 1, "e.g. 8")
    read_ahead = check_int("read_ahead", read_ahead, 0, "e.g. 2; 0 reads in this thread")
    blend_behind = check_int("blend_behind", blend_behind, 0, "e.g. 2; 0 blends in this thread")
    mode = check_choice("pad mode", pad_mode, PadMode)
    origins = grid_windows(height, width, tile_px, stride_px)
    t = tile_px

    if valid is not None:
        valid_arr = np.asarray(valid)
        if valid_arr.shape != (height, width):
            raise InvalidInputError(
                f"valid mask has shape {valid_arr.shape}, expected ({height}, {width}) to match "
                "the image; pass the fragment's papyrus mask"
            )
        origins = origins[holds_valid_pixel(valid_arr != 0, origins, t)]

    source: Any = image  # NumPy, memmap or Zarr: anything sliceable
    if height < t or width < t:
        small = np.asarray(image)
        pad = ((0, 0), (0, max(0, t - height)), (0, max(0, t - width)))
        source = np.pad(small, pad, mode=mode.value)

    acc = BlendAccumulator((height, width), t, weight=weight, out_dir=out_dir)
    batches = list(_batches(origins, batch_size))
    tiles = _read_batches(source, batches, channels, t)
    if read_ahead > 0:
        tiles = read_in_background(tiles, read_ahead)
    # One blending thread adds the batches in order; what it meets (a NaN) is raised here.
    blender = ThreadPoolExecutor(1, "inkpipe-blend") if blend_behind > 0 else None
    blending: deque[Future[None]] = deque()
    with short_gil_turns():
        try:
            for batch, crops in zip(batches, tiles, strict=True):
                out = np.asarray(predictor(crops), dtype=np.float32)
                if out.ndim == 4 and out.shape[1] == 1:
                    out = out[:, 0]
                if out.shape != (len(batch), t, t):
                    raise InvalidInputError(
                        f"predictor returned shape {out.shape} for a batch of shape {crops.shape}, "
                        f"expected ({len(batch)}, {t}, {t}); return one map per window"
                    )
                if blender is None:
                    acc.add(out, batch)
                    continue
                blending.append(blender.submit(acc.add, out, batch))
                if len(blending) > blend_behind:
                    blending.popleft().result()
            for added in blending:
                added.result()
        finally:
            tiles.close()  # stops the reading thread when the predictor failed
            if blender is not None:
                blender.shutdown(cancel_futures=True)  # after a failure: drops what is waiting
    acc.flush()
    return acc.result()
