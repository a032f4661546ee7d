"""Which windows train and which validate a run: the plan of a run, decided before it starts.

Windows come from the store's window index when the run's tile is the one the store was
indexed with, and are derived from the stored mask and labels otherwise (any tile and stride,
in seconds, no re-ingest). A plan's fragments are :class:`KeptFragment` s: the windows, the
held-out regions, the dataset and fragment validation all read the same mask and labels, read
from the store once. Held-out regions (square blocks of the papyrus, the default) and
held-out patches (single windows) are picked so that training keeps most windows and some ink,
and training windows that could reach a held-out pixel are dropped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from inkpipe.pipeline.errors import ConfigError, TrainingError
from inkpipe.pipeline.store import Fragment, open_fragments
from inkpipe.pipeline.windows import INK_PX, X0, Y0, index_windows

from .config import TrainConfig, Validation, ValidationKind
from .data import CropTable, WindowSet


@dataclass(frozen=True)
class KeptFragment(Fragment):
    """A store fragment whose mask and labels are read on first use and kept, read-only.

    A training run needs them at several steps (windows for a tile the store was not indexed
    with, held-out regions, every block of them, the dataset, fragment validation each epoch),
    which would each decode the whole planes again. The run keeps them for its whole length
    anyway (the dataset crops its labels from them), so keeping them here costs no memory.
    """

    planes: dict[str, NDArray[np.uint8]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    @classmethod
    def of(cls, frag: Fragment) -> KeptFragment:
        """Return ``frag`` (of any store) as a fragment that keeps its planes."""
        return cls(frag.meta, frag.group)

    def mask(self) -> NDArray[np.uint8]:
        """(H, W) uint8 0/1 papyrus mask, read once (read-only)."""
        return self._kept("mask", super().mask)

    def labels(self) -> NDArray[np.uint8] | None:
        """(H, W) uint8 0/1 ink labels, read once (read-only), or None for test fragments."""
        return self._kept("labels", super().labels) if self.meta.has_labels else None

    def _kept(self, name: str, read: Callable[[], NDArray[np.uint8] | None]) -> NDArray[np.uint8]:
        if name not in self.planes:
            plane = read()
            assert plane is not None  # labels are only read when the fragment has them
            plane.flags.writeable = False  # shared by every reader of the run
            self.planes[name] = plane
        return self.planes[name]


@dataclass(frozen=True)
class Region:
    """A held-out block of a training fragment, with the margin it is predicted with.

    Attributes:
        fragment: index into :attr:`Plan.fragments`.
        y0, x0: origin of the predicted rectangle (the block plus a margin of context).
        valid: (h, w) bool, the scored pixels: papyrus inside the block.
        truth: (h, w) bool ink labels of the rectangle.
    """

    fragment: int
    y0: int
    x0: int
    valid: NDArray[np.bool_]
    truth: NDArray[np.bool_]


@dataclass(frozen=True)
class Plan:
    """Which fragments and windows train and validate a run."""

    fragments: list[Fragment]
    train_sets: list[WindowSet]
    val_windows: CropTable  # (n, 3) held-out windows (patches validation)
    val_fragment: int | None  # index into fragments (fragment validation)
    tile_px: int
    val_regions: tuple[Region, ...] = ()  # regions validation


def fragment_windows(frag: Fragment, tile_px: int) -> NDArray[np.int32]:
    """Return the (n, 4) int32 window index of ``frag`` for ``tile_px`` (stride tile / 2).

    The stored index is used when it was built for this tile; otherwise the index is derived
    from the stored mask and labels with the store's minimum papyrus coverage.
    """
    settings = frag.settings
    if settings.tile_px == tile_px:
        return frag.windows()
    labels = frag.labels()
    return index_windows(frag.mask(), labels, tile_px, max(1, tile_px // 2), settings.min_coverage)


def plan_run(cfg: TrainConfig) -> Plan:
    """Open the store and decide training windows and validation data.

    ``cfg.tile_px`` must be resolved (see :func:`inkpipe.train.recipe.resolve`); None takes
    the tile the store was indexed with.

    Raises:
        ConfigError: unknown fragments, layers that do not fit, a held-out fragment without
            labels, or mixed stored tiles with no ``tile_px``.
        TrainingError: no positive training window.
    """
    fragments = [KeptFragment.of(f) for f in open_fragments(cfg.store)]
    by_id = {f.id: f for f in fragments}
    labelled = [f.id for f in fragments if f.meta.has_labels]
    wanted = list(cfg.fragments) if cfg.fragments else labelled
    for fid in wanted:
        if fid not in by_id:
            raise ConfigError(
                f"fragment '{fid}' is not in store {cfg.store} (it has: {', '.join(by_id)})"
            )
        if not by_id[fid].meta.has_labels:
            raise ConfigError(f"fragment '{fid}' has no ink labels and cannot be trained on")
    val_id = cfg.val.fragment if cfg.val.kind == ValidationKind.FRAGMENT else None
    if val_id is not None:
        if val_id not in by_id or not by_id[val_id].meta.has_labels:
            raise ConfigError(
                f"validation fragment '{val_id}' must be a labelled fragment of {cfg.store} "
                f"(labelled: {', '.join(labelled) or 'none'})"
            )
        wanted = [f for f in wanted if f != val_id]
    if not wanted:
        raise ConfigError(f"no labelled fragment left to train on in {cfg.store}")
    used = wanted + ([val_id] if val_id is not None else [])
    frags = [by_id[f] for f in used]
    for f in frags:
        cfg.layers.check(f.meta.layers, where=f"fragment {f.id} of {cfg.store}")
    tile = cfg.tile_px if cfg.tile_px is not None else stored_tile(frags, cfg)
    sets = [
        WindowSet(i, f.meta.shape[1:], fragment_windows(f, tile))
        for i, f in enumerate(frags)
        if f.id in wanted
    ]
    rng = np.random.default_rng([cfg.seed, 7])
    val_windows = np.zeros((0, 3), np.int64)
    regions: tuple[Region, ...] = ()
    if cfg.val.kind == ValidationKind.REGIONS:
        side = max(REGION_TILES * tile, MIN_REGION_PX)
        blocks = pick_regions(frags, sets, cfg.val.fraction, side, tile, cfg.jitter_px, rng)
        if len(blocks):
            sets = exclude_blocks(sets, blocks, tile, cfg.jitter_px)
            regions = region_crops(frags, blocks, tile // 2)
    if cfg.val.kind == ValidationKind.PATCHES or (
        cfg.val.kind == ValidationKind.REGIONS and not regions
    ):
        # too small for regions: fall back to the default number of held-out windows
        n = cfg.val.patches if cfg.val.kind == ValidationKind.PATCHES else Validation.patches
        val_windows = pick_held_out(sets, n, tile, rng, tile + cfg.jitter_px)
        sets = exclude_near(sets, val_windows, tile + cfg.jitter_px)
    if not any((s.windows[:, INK_PX] > 0).any() for s in sets):
        raise TrainingError(
            f"no training window of {cfg.store} contains ink (fragments {', '.join(wanted)}); "
            "check the ink labels, or lower --min-coverage at ingest"
        )
    val_index = len(frags) - 1 if val_id is not None else None
    return Plan(frags, sets, val_windows, val_index, tile, regions)


def stored_tile(frags: list[Fragment], cfg: TrainConfig) -> int:
    """Return the one tile the fragments were indexed with, or raise ConfigError."""
    tiles = {f.settings.tile_px for f in frags}
    if len(tiles) != 1:
        raise ConfigError(
            f"fragments of {cfg.store} were indexed with different tiles {sorted(tiles)}; "
            "pass --tile"
        )
    return tiles.pop()


def pick_held_out(
    sets: list[WindowSet], n: int, tile_px: int, rng: np.random.Generator, distance_px: int = 0
) -> CropTable:
    """Pick up to ``n`` non-overlapping windows, half with ink where possible.

    A window is only taken while at least half of all windows, and one with ink, stay
    trainable after :func:`exclude_near` with ``distance_px`` (0: ``tile_px``) — so a small
    store gets fewer held-out windows instead of none to train on.

    Returns:
        (m, 3) int64 (fragment, y0, x0), m <= n.
    """
    table = np.concatenate(
        [
            np.column_stack(
                [
                    np.full(len(s.windows), s.fragment),
                    s.windows[:, [Y0, X0]],
                    s.windows[:, INK_PX] > 0,
                ]
            )
            for s in sets
        ]
    ).astype(np.int64)
    distance = distance_px or tile_px
    trainable = np.ones(len(table), bool)
    pos = rng.permutation(np.flatnonzero(table[:, 3] == 1))
    neg = rng.permutation(np.flatnonzero(table[:, 3] == 0))
    order = np.concatenate([pos[: n // 2], neg, pos[n // 2 :]])
    chosen: list[NDArray[np.int64]] = []
    for i in order:
        row = table[i, :3]
        same = table[:, 0] == row[0]
        dy, dx = np.abs(table[:, 1] - row[1]), np.abs(table[:, 2] - row[2])
        if any(
            c[0] == row[0] and abs(c[1] - row[1]) < tile_px and abs(c[2] - row[2]) < tile_px
            for c in chosen
        ):
            continue
        left = trainable & ~(same & (dy < distance) & (dx < distance))
        if left.sum() < len(table) / 2 or not (left & (table[:, 3] == 1)).any():
            continue
        trainable = left
        chosen.append(row)
        if len(chosen) == n:
            break
    return np.array(chosen, dtype=np.int64).reshape(-1, 3)


def exclude_near(sets: list[WindowSet], held: CropTable, distance_px: int) -> list[WindowSet]:
    """Drop training windows closer than ``distance_px`` (in y and x) to a held-out window."""
    out = []
    for s in sets:
        h = held[held[:, 0] == s.fragment]
        keep = np.ones(len(s.windows), bool)
        for _, y, x in h:
            keep &= ~(
                (np.abs(s.windows[:, Y0] - y) < distance_px)
                & (np.abs(s.windows[:, X0] - x) < distance_px)
            )
        out.append(WindowSet(s.fragment, s.shape, s.windows[keep]))
    return out


REGION_TILES = 4  # a held-out block is this many training tiles wide ...
MIN_REGION_PX = 256  # ... and at least this many pixels
MIN_BLOCKS = 4  # a fragment with fewer candidate blocks holds none out


def pick_regions(
    frags: list[Fragment],
    sets: list[WindowSet],
    fraction: float,
    side_px: int,
    tile_px: int,
    jitter_px: int,
    rng: np.random.Generator,
) -> NDArray[np.int64]:
    """Pick square blocks holding about ``fraction`` of each training fragment's papyrus.

    Blocks lie on a grid of ``side_px`` (cut at the fragment's edges) and are at least half
    papyrus. Each fragment gives at least one block when it has :data:`MIN_BLOCKS` candidates,
    the first with ink when one has; the rest are random, so the held-out ink share is about
    the fragment's own. A block is only taken while half of the fragment's windows, and one
    with ink, stay trainable.

    Returns:
        (n, 5) int64 (fragment, y0, x0, h, w).
    """
    chosen: list[tuple[int, int, int, int, int]] = []
    for s in sets:
        mask = frags[s.fragment].mask() > 0
        ink = (frags[s.fragment].labels() > 0) & mask
        h, w = mask.shape
        blocks = [
            (y, x, min(side_px, h - y), min(side_px, w - x))
            for y in range(0, h, side_px)
            for x in range(0, w, side_px)
        ]
        area = np.array([bh * bw for _, _, bh, bw in blocks], dtype=np.float64)
        paper = np.array([mask[y : y + bh, x : x + bw].sum() for y, x, bh, bw in blocks])
        inked = np.array([ink[y : y + bh, x : x + bw].sum() for y, x, bh, bw in blocks])
        candidates = np.flatnonzero((paper >= 0.5 * area) & (area >= 0.5 * side_px**2))
        if len(candidates) < MIN_BLOCKS:
            continue
        order = rng.permutation(candidates)
        with_ink = order[inked[order] > 0]
        if len(with_ink):
            order = np.concatenate([with_ink[:1], order[order != with_ink[0]]])
        target = fraction * mask.sum()
        trainable = np.ones(len(s.windows), bool)
        held = 0
        for i in order:
            y, x, bh, bw = blocks[i]
            left = trainable & ~_reaches(s.windows, (y, x, bh, bw), tile_px, jitter_px)
            if left.sum() < len(s.windows) / 2 or not (s.windows[left, INK_PX] > 0).any():
                continue
            trainable = left
            chosen.append((s.fragment, y, x, bh, bw))
            held += int(paper[i])
            if held >= target:
                break
    return np.array(chosen, dtype=np.int64).reshape(-1, 5)


def _reaches(
    windows: NDArray[np.int32], block: tuple[int, int, int, int], tile_px: int, jitter_px: int
) -> NDArray[np.bool_]:
    """Which windows' crops can include a pixel of ``block`` (y, x, h, w).

    A crop is ``tile_px`` square from the window's origin, shifted up to ``jitter_px`` each way.
    """
    y, x, bh, bw = block
    wy, wx = windows[:, Y0].astype(np.int64), windows[:, X0].astype(np.int64)
    j = jitter_px
    return (wy - j < y + bh) & (wy + tile_px + j > y) & (wx - j < x + bw) & (wx + tile_px + j > x)


def exclude_blocks(
    sets: list[WindowSet], blocks: NDArray[np.int64], tile_px: int, jitter_px: int
) -> list[WindowSet]:
    """Drop training windows whose crop can include a pixel of a held-out block."""
    out = []
    for s in sets:
        keep = np.ones(len(s.windows), bool)
        for _, y, x, bh, bw in blocks[blocks[:, 0] == s.fragment].tolist():
            keep &= ~_reaches(s.windows, (y, x, bh, bw), tile_px, jitter_px)
        out.append(WindowSet(s.fragment, s.shape, s.windows[keep]))
    return out


def region_crops(
    frags: list[Fragment], blocks: NDArray[np.int64], margin_px: int
) -> tuple[Region, ...]:
    """Cut the scored mask and the labels of each block, with ``margin_px`` of context."""
    out = []
    for f, y, x, bh, bw in blocks.tolist():
        mask, labels = frags[f].mask(), frags[f].labels()
        h, w = mask.shape
        y0, x0 = max(0, y - margin_px), max(0, x - margin_px)
        y1, x1 = min(h, y + bh + margin_px), min(w, x + bw + margin_px)
        valid = np.zeros((y1 - y0, x1 - x0), bool)
        valid[y - y0 : y - y0 + bh, x - x0 : x - x0 + bw] = mask[y : y + bh, x : x + bw] > 0
        out.append(Region(f, y0, x0, valid, labels[y0:y1, x0:x1] > 0))
    return tuple(out)
