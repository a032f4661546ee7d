"""``inkpipe ingest``: fragment folders -> one chunked, compressed Zarr store.

Each fragment's slices are read in bands of ``chunk_layers`` layers x ``chunk_px`` rows x the
full width (one ``pread`` per slice and band), written chunk-aligned into the volume, and
reduced to per-layer intensity statistics inside the mask. One dask task copies a run of
bands of the same layers top to bottom, a thread reading each next band meanwhile, so peak
memory is a few bands whatever the fragment's size or layer count. Slices are read and chunk
files written past the page cache (``O_DIRECT``) where the file system allows it. Tasks run
on dask's local threads (``workers``) or on a dask.distributed cluster (``scheduler``);
meanwhile a thread writes the mask and IR planes.
"""

from __future__ import annotations

import ctypes
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import dask
import numpy as np
import zarr
from numpy.typing import NDArray
from tqdm.auto import tqdm

from .chunks import ChunkWriter, mapped_empty
from .disk import block_bytes, check_free, disk_full_as_error
from .errors import InvalidInputError
from .fragments import CheckedFragment, FragmentSource, check_fragment, discover_fragments
from .images import BinaryImage, read_binary_image, read_gray
from .locks import hold_lock
from .manifest import load_manifest
from .store import (
    STAT_COLUMNS,
    FragmentMeta,
    StoreSettings,
    begin_fragment,
    create_store,
    ensure_ome,
    finish_fragment,
    fragment_bytes_bound,
    fragment_meta,
    write_plane,
    write_table,
    write_windows,
)
from .tiff import SliceInfo, read_rows_into
from .windows import INK_PX, index_windows

HIST_BINS = 65536  # layer histograms: one bin per uint16 value
HIST_SLICE_PX = 1 << 20  # pixels histogrammed at once (bincount's int64 copy: 8 MB)
# Layer statistics summarise the rows y with y % STATS_ROW_STEP == 0: a quarter of the pixels,
# whatever the banding (ingest and predict's Zarr inputs give the same figures). Histogramming
# every pixel was ~40 % of ingest's CPU; a quarter of a layer's 10^7-10^8 papyrus pixels gives
# its mean, std and percentiles to far better than the normalisation needs.
STATS_ROW_STEP = 4


@dataclass(frozen=True)
class IngestConfig:
    """Everything ``ingest`` needs.

    Attributes:
        root: fragments folder (Kaggle layout, folder of fragments, or one fragment).
        out: the store to create or update.
        manifest: optional manifest selecting fragments, checking shapes, giving groups.
        settings: chunking/codec/window settings; a manifest's ``ingest:`` section overrides
            the defaults, and explicitly given options override both (see ``resolve``).
        workers: dask threads (local scheduler).
        scheduler: address of a dask.distributed scheduler, or None for local threads.
        overwrite: re-ingest complete fragments even if their sources are unchanged.
        fragment_ids: restrict to these ids (None: all found).
        progress: show a progress bar per fragment.
        direct_io: read the slices and write the chunk files past the page cache
            (``O_DIRECT``, :mod:`~inkpipe.pipeline.direct`) where the file system allows it:
            each byte passes once, and the page cache's work per page was most of ingest's
            CPU. False reads and writes through the page cache.
    """

    root: Path
    out: Path
    manifest: Path | None = None
    settings: StoreSettings = field(default_factory=StoreSettings)
    workers: int = 2
    scheduler: str | None = None
    overwrite: bool = False
    fragment_ids: tuple[str, ...] | None = None
    progress: bool = True
    direct_io: bool = True


@dataclass(frozen=True)
class FragmentResult:
    """What happened to one fragment: ``status`` is ``"ingested"`` or ``"skipped"``.

    ``stages`` holds the seconds of an ingested fragment's stages: the CPU seconds of the band
    tasks' ``read``, ``statistics``, ``encode`` and ``write`` (summed over the tasks and their
    threads), then wall-clock seconds: ``volume_wall`` (all band tasks), ``planes`` (the
    labels, before the volume), ``planes_overlapped`` (mask and IR, written by a thread while
    the volume is copied), ``windows`` (window index and tables), ``fsync`` (the store's file
    system).
    """

    id: str
    status: str
    seconds: float
    input_bytes: int
    shape: tuple[int, int, int]
    stages: dict[str, float] = field(default_factory=dict)


def resolve_settings(manifest: Path | None, overrides: dict[str, Any]) -> StoreSettings:
    """Return defaults, updated by the manifest's ``ingest:`` section, then by ``overrides``."""
    values: dict[str, Any] = {}
    if manifest is not None:
        values.update(load_manifest(manifest).ingest)
    values.update({k: v for k, v in overrides.items() if v is not None})
    return StoreSettings.from_mapping(values)


def ingest(cfg: IngestConfig, log: Callable[[str], None] = print) -> list[FragmentResult]:
    """Ingest every fragment found under ``cfg.root`` into ``cfg.out``.

    Complete fragments whose sources and settings are unchanged are skipped (unless
    ``overwrite``); incomplete ones (from an interrupted run) are redone. The store is locked
    while it is written (:func:`store_lock_path`), and the disk space the fragments to write
    can take at most is checked before the first of them is written.

    Returns:
        one :class:`FragmentResult` per fragment, in discovery order.

    Raises:
        InkpipeError subclasses for any input problem, before anything is written;
        LockedError when another process writes the store; DiskFullError when the fragments
        cannot fit (up front) or the disk fills anyway (complete fragments are kept).
    """
    manifest = load_manifest(cfg.manifest) if cfg.manifest else None
    sources = discover_fragments(cfg.root, manifest)
    if cfg.fragment_ids:
        known = {s.id for s in sources}
        missing = [i for i in cfg.fragment_ids if i not in known]
        if missing:
            raise InvalidInputError(
                f"fragments {missing} not found in {cfg.root} (found: {sorted(known)})"
            )
        sources = [s for s in sources if s.id in cfg.fragment_ids]
    # Check every fragment before writing anything: a bad file fails fast, store untouched.
    checked = [check_fragment(s) for s in sources]
    rules = {frag.source.id: _binary_rules(frag.source) for frag in checked}
    out = Path(cfg.out)
    out.absolute().parent.mkdir(parents=True, exist_ok=True)
    with hold_lock(store_lock_path(out), f"store {out}", "inkpipe ingest", log):
        root = create_store(out)
        todo = [f for f in checked if not _unchanged(root, f, cfg, rules[f.source.id])]
        check_space(root, todo, cfg)
        results = []
        client = _client(cfg.scheduler)
        try:
            for frag in checked:
                with disk_full_as_error(out, f"fragment {frag.source.id}", _redo_hint(frag)):
                    results.append(_ingest_one(root, frag, cfg, client, log, rules[frag.source.id]))
        finally:
            if client is not None:
                client.close()
    return results


def store_lock_path(store: Path) -> Path:
    """Return the lock file of a store being written: ``store.zarr`` -> ``store.zarr.lock``."""
    store = Path(store)
    return store.with_name(store.name + ".lock")


def _redo_hint(frag: CheckedFragment) -> str:
    return (
        "free some space and run the same command again: complete fragments are kept and "
        f"fragment {frag.source.id} is redone"
    )


def check_space(root: zarr.Group, todo: list[CheckedFragment], cfg: IngestConfig) -> None:
    """Raise DiskFullError, before anything is written, if ``todo`` may not fit on the disk.

    The need is :func:`~inkpipe.pipeline.store.fragment_bytes_bound` of each fragment, less
    what its old version (complete or interrupted), deleted before it is rewritten, takes.
    """
    if not todo:
        return
    out = Path(cfg.out)
    block = block_bytes(out)
    need = 0
    for frag in todo:
        src = frag.source
        planes = 1 + (src.labels_path is not None) + (src.ir_path is not None)
        need += fragment_bytes_bound(frag.shape, cfg.settings, planes, block)
        need -= _group_bytes(out / src.id)
    ids = ", ".join(f.source.id for f in todo)
    check_free(
        out,
        need,
        f"fragment{'s' if len(todo) > 1 else ''} {ids} into store {out}",
        "free some space, pass another --out, or ingest fewer fragments at a time with "
        "--fragment ID (complete fragments are kept)",
    )


def _group_bytes(path: Path) -> int:
    """Bytes on disk under ``path`` (0 if absent): freed when a fragment is rewritten."""
    if not path.is_dir():
        return 0
    return sum(p.stat().st_blocks * 512 for p in path.rglob("*") if p.is_file())


def _unchanged(
    root: zarr.Group, frag: CheckedFragment, cfg: IngestConfig, rules: dict[str, str]
) -> bool:
    """Whether ``frag`` is in the store, complete, from the same sources, settings and rules.

    ``rules`` are the binary-image rules its mask and labels call for now
    (:func:`_binary_rules`).
    """
    old = fragment_meta(root, frag.source.id)
    return (
        old is not None
        and old.complete
        and not cfg.overwrite
        and old.sources == source_signature(frag)
        and old.settings == asdict(cfg.settings)
        and same_binarization(old.binarization, rules)
    )


def same_binarization(old: dict[str, str], new: dict[str, str]) -> bool:
    """Whether images read by rules ``new`` give the pixels stored under rules ``old``.

    A store written before the rules were recorded (``old == {}``) read every image as
    ``> 127``, which gives the same pixels as the ``>127`` and ``1-bit`` rules; only a ``0/1``
    image was read differently (as empty), so such a fragment is re-ingested.
    """
    if old:
        return old == new
    return "0/1" not in new.values()


def _client(address: str | None) -> Any:
    if address is None:
        return None
    from distributed import Client

    return Client(address)


def _check_mask(src: FragmentSource) -> BinaryImage:
    """Read a fragment's mask as (H, W) uint8 0/1 and its rule; an empty mask is an error."""
    mask = read_binary_image(src.path / "mask.png", "mask")
    if not mask.pixels.any():
        raise InvalidInputError(
            f"fragment {src.id}: mask {src.path / 'mask.png'} is empty (no papyrus pixel); "
            "white (255) or 1 must mark the papyrus"
        )
    return mask


def _read_labels(src: FragmentSource) -> BinaryImage | None:
    """Read a fragment's ink labels as 0/1 and their rule (ink everywhere is refused)."""
    if src.labels_path is None:
        return None
    return read_binary_image(src.labels_path, "ink labels", all_set_ok=False)


def _binary_rules(src: FragmentSource) -> dict[str, str]:
    """Check a fragment's mask and labels; return the rule each is read by."""
    rules: dict[str, str] = {"mask": _check_mask(src).rule}
    labels = _read_labels(src)
    if labels is not None:
        rules["labels"] = labels.rule
    return rules


def source_signature(frag: CheckedFragment) -> dict[str, list[int]]:
    """Return ``{relative file name: [size, mtime_ns]}`` for every source file."""
    src = frag.source
    paths = [s.path for s in frag.slices] + [
        p for p in (src.path / "mask.png", src.labels_path, src.ir_path) if p is not None
    ]
    out = {}
    for p in paths:
        st = p.stat()
        out[str(p.relative_to(src.path))] = [st.st_size, st.st_mtime_ns]
    return out


def _ingest_one(
    root: zarr.Group,
    frag: CheckedFragment,
    cfg: IngestConfig,
    client: Any,
    log: Callable[[str], None],
    rules: dict[str, str],
) -> FragmentResult:
    src: FragmentSource = frag.source
    settings = cfg.settings
    signature = source_signature(frag)
    input_bytes = sum(v[0] for k, v in signature.items() if k.startswith("surface_volume"))
    old = fragment_meta(root, src.id)
    if _unchanged(root, frag, cfg, rules):
        log(f"fragment {src.id}: unchanged, skipped (use --overwrite to redo)")
        group = root[src.id]
        if isinstance(group, zarr.Group) and ensure_ome(group, src.id):
            log(f"fragment {src.id}: OME-Zarr (NGFF 0.5) metadata added")
        return FragmentResult(src.id, "skipped", 0.0, input_bytes, frag.shape)
    if old is not None:
        reason = "incomplete from an interrupted run" if not old.complete else "changed"
        if old.complete and not same_binarization(old.binarization, rules):
            before = old.binarization or "not recorded (all > 127)"
            reason = f"stored with image rules {before}, now {rules}"
        log(f"fragment {src.id}: {reason}, re-ingesting")
    check_space(root, [frag], cfg)  # again: others may have filled the disk meanwhile
    t0 = time.perf_counter()
    mask_image, label_image = _check_mask(src), _read_labels(src)
    mask = mask_image.pixels
    labels = None if label_image is None else label_image.pixels
    binarization: dict[str, str] = {"mask": mask_image.rule}
    if label_image is not None:
        binarization["labels"] = label_image.rule
    if frag.shape[0] != 65:
        log(f"fragment {src.id}: {frag.shape[0]} layers (the Kaggle fragments have 65)")
    meta = FragmentMeta(
        id=src.id,
        split=src.split,
        group=src.group,
        shape=frag.shape,
        has_labels=labels is not None,
        has_ir=src.ir_path is not None,
        sources=signature,
        settings=asdict(settings),
        binarization=binarization,
        extra={"source_dir": str(src.path.resolve()), "dtype": frag.dtype},
    )
    # The 2-D images first, each freed once written, so that only the mask's bits (for the
    # statistics and the mask plane) are held while the volume is copied: at 14830 x 9506 px
    # a plane is 141 MB, its bits 18 MB.
    t1 = time.perf_counter()
    windows = index_windows(
        mask, labels, settings.tile_px, settings.stride_px, settings.min_coverage
    )
    t2 = time.perf_counter()
    group = begin_fragment(root, meta, settings)
    if labels is not None:
        labels = np.bitwise_and(labels, mask, out=labels if labels.flags.writeable else None)
        write_plane(group, "labels", labels, settings.chunk_px)
    del labels, label_image
    mask_bits = np.packbits(mask, axis=1)  # (H, ceil(W / 8)) uint8
    del mask, mask_image
    t3 = time.perf_counter()
    volume_path = Path(cfg.out).resolve() / src.id / "volume"  # absolute: remote dask workers
    volume = group["volume"]
    writer = (
        ChunkWriter.for_array(volume, cfg.direct_io) if isinstance(volume, zarr.Array) else None
    )
    # The mask plane is written from its bits by a thread while the volume is copied (the band
    # tasks wait on the disk often enough to leave it a core); the IR image after the copy,
    # so that its 141 MB of pixels never meet the band buffers in memory.
    mask_rows = BitRows(mask_bits, frag.shape[2])
    with ThreadPoolExecutor(1, thread_name_prefix="inkpipe-planes") as pool:
        planes = pool.submit(_timed, write_plane, group, "mask", mask_rows, settings.chunk_px)
        t4 = time.perf_counter()
        stats, stages = _write_volume(volume_path, frag, mask_bits, settings, cfg, client, writer)
        stages["volume_wall"] = time.perf_counter() - t4
        stages["planes_overlapped"] = planes.result()
    t_copied = time.perf_counter()
    if src.ir_path is not None:
        write_plane(group, "ir", read_gray(src.ir_path, "IR image"), settings.chunk_px)
    t_ir = time.perf_counter()
    write_windows(group, windows, settings)
    write_table(group, "layer_stats", stats, {"columns": list(STAT_COLUMNS)})
    t5 = time.perf_counter()
    # The chunk files reach the disk before the completion marker says they are there.
    sync_filesystem(Path(cfg.out))
    t6 = time.perf_counter()
    stages.update(planes=t3 - t2 + t_ir - t_copied, windows=(t2 - t1) + (t5 - t_ir), fsync=t6 - t5)
    seconds = time.perf_counter() - t0
    meta = replace(meta, extra={**meta.extra, "ingest_seconds": round(seconds, 3)})
    finish_fragment(root, group, meta)
    n_pos = int((windows[:, INK_PX] > 0).sum()) if len(windows) else 0
    log(
        f"fragment {src.id}: {frag.shape[0]}x{frag.shape[1]}x{frag.shape[2]} ingested in "
        f"{seconds:.1f} s ({input_bytes / 1e6 / max(seconds, 1e-9):.0f} MB/s), "
        f"{len(windows)} windows ({n_pos} with ink)"
    )
    return FragmentResult(src.id, "ingested", seconds, input_bytes, frag.shape, stages)


def _timed(fn: Callable[..., Any], *args: Any) -> float:
    """Call ``fn(*args)``; return the seconds it took."""
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


@dataclass(frozen=True)
class BitRows:
    """A 0/1 uint8 image held as bits, unpacked a block of rows at a time (for :func:`write_plane`).

    Attributes:
        bits: (H, ceil(W / 8)) uint8, ``np.packbits(image, axis=1)``.
        width: W.
    """

    bits: NDArray[np.uint8]
    width: int

    @property
    def shape(self) -> tuple[int, int]:
        """(H, W)."""
        return (int(self.bits.shape[0]), self.width)

    def __getitem__(self, rows: slice) -> NDArray[np.uint8]:
        """(len(rows), W) uint8 0/1: the image's ``rows``."""
        return np.unpackbits(self.bits[rows], axis=1, count=self.width)


def sync_filesystem(path: Path) -> None:
    """Flush the file system holding ``path`` to its disk (``syncfs``; ``sync`` elsewhere)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(path, os.O_RDONLY)
        try:
            if libc.syncfs(fd) == 0:
                return
        finally:
            os.close(fd)
    except (OSError, AttributeError):  # no syncfs (not Linux): flush every file system
        pass
    os.sync()


def band_tasks(
    shape: tuple[int, int, int], settings: StoreSettings
) -> list[tuple[int, int, int, int]]:
    """Return the chunk-aligned bands ``(z0, z1, y0, y1)`` that tile a (z, H, W) volume.

    In reading order: down each range of layers, then the next range, so that consecutive
    bands read on in the same slice files.
    """
    z, h, _ = shape
    return [
        (z0, min(z0 + settings.chunk_layers, z), y0, min(y0 + settings.chunk_px, h))
        for z0 in range(0, z, settings.chunk_layers)
        for y0 in range(0, h, settings.chunk_px)
    ]


RUN_BANDS = 8  # bands of the same layers one task copies in turn, top to bottom


def band_runs(
    shape: tuple[int, int, int], settings: StoreSettings
) -> list[list[tuple[int, int, int, int]]]:
    """Group :func:`band_tasks` into runs of up to :data:`RUN_BANDS` bands of the same layers.

    Each run is one task (:func:`copy_run`): it reads its slice files downwards, a band
    ahead, whatever order the scheduler gives the tasks.
    """
    runs: list[list[tuple[int, int, int, int]]] = []
    for band in band_tasks(shape, settings):
        if runs and runs[-1][0][0] == band[0] and len(runs[-1]) < RUN_BANDS:
            runs[-1].append(band)
        else:
            runs.append([band])
    return runs


STAGES = ("read", "statistics", "encode", "write")  # per-band stages, timed in each task


def copy_run(
    volume_path: Path,
    slices: tuple[SliceInfo, ...],
    run: list[tuple[int, int, int, int]],
    mask_bits: NDArray[np.uint8],
    writer: ChunkWriter | None = None,
    direct: bool = False,
) -> BandResult:
    """Copy a run of bands of the same layers, top to bottom, and summarise it (one dask task).

    A reading thread reads each next band (:func:`read_band`) while this one summarises and
    writes the band before (:func:`copy_band`): two band buffers, so the disk reads while the
    CPU works, with or without the page cache.

    Args:
        volume_path, slices, writer: as for :func:`copy_band`.
        run: consecutive chunk-aligned bands (z0, z1, y0, y1) of the same layers, from
            :func:`band_runs`.
        mask_bits: the run's mask rows packed to bits, as for :func:`copy_band`.
        direct: read the slices with ``O_DIRECT`` where possible (see :func:`read_band`).

    Returns:
        the sum of the bands' :class:`BandResult`.
    """
    top = run[0][2]
    layers = run[0][1] - run[0][0]
    shape = (layers, max(b[3] - b[2] for b in run), slices[0].shape[1])
    total: BandResult | None = None
    with (
        BAND_BUFFERS.take(shape) as first,
        BAND_BUFFERS.take(shape) as second,
        ThreadPoolExecutor(1, thread_name_prefix="inkpipe-read") as reader,
    ):
        buffers = (first, second)

        def read(i: int) -> tuple[NDArray[np.uint16], float]:
            data = buffers[i % 2][:, : run[i][3] - run[i][2]]
            t0 = time.thread_time()
            read_band(slices, run[i], data, direct)
            return data, time.thread_time() - t0

        pending = reader.submit(read, 0)
        for i, band in enumerate(run):
            data, read_s = pending.result()
            if i + 1 < len(run):
                pending = reader.submit(read, i + 1)
            rows = mask_bits[band[2] - top : band[3] - top]
            result = copy_band(volume_path, band, data, rows, writer, read_s)
            total = result if total is None else BandResult.add(total, result)
    assert total is not None
    return total


def read_band(
    slices: tuple[SliceInfo, ...],
    band: tuple[int, int, int, int],
    out: NDArray[np.uint16],
    direct: bool = False,
) -> None:
    """Read ``band`` = (z0, z1, y0, y1) of the slices into ``out``, a (k, h, W) uint16 array.

    Each layer's rows are one read (:func:`~inkpipe.pipeline.tiff.read_rows_into`); with
    ``direct``, past the page cache where the file system allows it.
    """
    z0, z1, y0, y1 = band
    for z in range(z0, z1):
        read_rows_into(slices[z], y0, y1, out[z - z0], direct)


def copy_band(
    volume_path: Path,
    band: tuple[int, int, int, int],
    data: NDArray[np.uint16],
    mask_bits: NDArray[np.uint8],
    writer: ChunkWriter | None = None,
    read_s: float = 0.0,
) -> BandResult:
    """Summarise one band read by :func:`read_band` and write it (a step of :func:`copy_run`).

    Args:
        volume_path: the fragment's ``volume`` array folder.
        band: (z0, z1, y0, y1) chunk-aligned.
        data: (z1 - z0, y1 - y0, W) uint16: the band's pixels.
        mask_bits: (y1 - y0, ceil(W / 8)) uint8: the band's mask rows packed to bits
            (``np.packbits(rows, axis=1)``; 8x less to hold and to send to a worker).
        writer: writes the band's chunk files directly; None writes through zarr-python.
        read_s: CPU seconds the band's reading took (reported as the ``read`` stage).

    Returns:
        the band's :class:`BandResult`: its statistics inside the mask and stage times.
    """
    y0 = band[2]
    clock = time.thread_time  # CPU time of this thread: shares that other load does not skew
    t1 = clock()
    mask_band = np.unpackbits(mask_bits, axis=1, count=data.shape[2])
    sums, hists = summarize_band(data, mask_band, y0)
    t2 = clock()
    encode_s, write_s = write_band(volume_path, data, band, writer, clock)
    return BandResult(band[0], sums, hists, np.array([read_s, t2 - t1, encode_s, write_s]))


def write_band(
    volume_path: Path,
    data: NDArray[np.uint16],
    band: tuple[int, int, int, int],
    writer: ChunkWriter | None,
    clock: Callable[[], float],
) -> tuple[float, float]:
    """Write the (k, h, W) uint16 ``band`` into the volume; return (encode, write) ``clock`` s.

    With a ``writer``, chunk files are encoded and written one at a time (no band of encoded
    bytes held); without, through zarr-python (all of it counted as writing).
    """
    z0, z1, y0, y1 = band
    if writer is None:
        t0 = clock()
        zarr.open_array(volume_path, mode="r+")[z0:z1, y0:y1, :] = data
        return 0.0, clock() - t0
    encode_s, write_s = 0.0, 0.0
    for index, chunk, padded in band_chunks(writer.chunks, data, band):
        t0 = clock()
        encoded = writer.encode(chunk, padded)
        t1 = clock()
        writer.write(index, encoded)
        encode_s, write_s = encode_s + t1 - t0, write_s + clock() - t1
    return encode_s, write_s


def band_chunks(
    chunks: tuple[int, int, int], data: NDArray[np.uint16], band: tuple[int, int, int, int]
) -> Iterator[tuple[tuple[int, int, int], NDArray[np.uint16], bool]]:
    """Yield the grid index, the whole (cz, cy, cx) C-contiguous chunk and whether it is padded.

    Args:
        chunks: the volume's chunk shape (cz, cy, cx).
        data: (k, h, W) uint16 chunk-aligned band ``band`` = (z0, z1, y0, y1).
        band: where the band lies; past the volume's edge chunks hold the fill value (0),
            as Zarr pads them.
    """
    z0, _, y0, _ = band
    cz, cy, cx = chunks
    k, h, w = data.shape
    for x0 in range(0, w, cx):
        part = data[:, :, x0 : x0 + cx]
        if part.shape == (cz, cy, cx):
            chunk, padded = np.ascontiguousarray(part), False
        else:
            chunk, padded = np.zeros((cz, cy, cx), dtype=np.uint16), True
            chunk[:k, :h, : part.shape[2]] = part
        yield (z0 // cz, y0 // cy, x0 // cx), chunk, padded


class BandBuffers:
    """Reusable band buffers for the band tasks of one process, at most ``keep`` kept free.

    A band read into new memory pays the page faults of first touch (and the kernel zeroing
    the pages) every time: reading a 6.7 GB fragment from the page cache took 5.0 s of CPU
    that way on the benchmark machine, 1.2 s into reused buffers. Reusing
    the memory of finished bands skips that; memory stays bounded by the bands in flight plus
    ``keep``. Buffers live in their own mappings (:func:`~inkpipe.pipeline.chunks.mapped_empty`),
    so :meth:`clear` returns them to the system.
    """

    def __init__(self, keep: int = 2) -> None:
        self.keep = keep
        self._free: list[NDArray[np.uint16]] = []
        self._lock = threading.Lock()

    @contextmanager
    def take(self, shape: tuple[int, int, int]) -> Iterator[NDArray[np.uint16]]:
        """Lend an uninitialised (k, h, W) uint16 array; it returns to the pool afterwards."""
        size = int(np.prod(shape))
        with self._lock:
            found = next((i for i, b in enumerate(self._free) if b.size >= size), None)
            base = self._free.pop(found) if found is not None else None
        if base is None:
            base = mapped_empty((size,))
        try:
            yield base[:size].reshape(shape)
        finally:
            with self._lock:
                if len(self._free) < self.keep:
                    self._free.append(base)

    def clear(self) -> None:
        """Drop the free buffers (their memory goes back to the system)."""
        with self._lock:
            self._free.clear()


BAND_BUFFERS = BandBuffers()  # one pool per process: dask's threads, or a distributed worker


@dataclass(frozen=True)
class BandResult:
    """What one band task returns; results of bands add up (:meth:`add`).

    Attributes:
        z0: the first layer of ``sums`` and ``hists``.
        sums: (k, 3) float64 [count, sum, sum of squares] inside the mask.
        hists: (k, HIST_BINS) int64 histograms of the values inside the mask.
        seconds: (len(STAGES),) float64 CPU seconds spent in each of :data:`STAGES`.
    """

    z0: int
    sums: NDArray[np.float64]
    hists: NDArray[np.int64]
    seconds: NDArray[np.float64]

    @staticmethod
    def add(*results: BandResult) -> BandResult:
        """Return the sum of ``results``: one result covering all their layers."""
        z0 = min(r.z0 for r in results)
        z1 = max(r.z0 + len(r.sums) for r in results)
        sums = np.zeros((z1 - z0, 3))
        hists = np.zeros((z1 - z0, HIST_BINS), dtype=np.int64)
        seconds = np.zeros(len(STAGES))
        for r in results:
            sums[r.z0 - z0 : r.z0 - z0 + len(r.sums)] += r.sums
            hists[r.z0 - z0 : r.z0 - z0 + len(r.hists)] += r.hists
            seconds += r.seconds
        return BandResult(z0, sums, hists, seconds)


def summarize_band(
    data: NDArray[np.uint16], mask_band: NDArray[np.uint8], y0: int = 0
) -> tuple[NDArray[np.float64], NDArray[np.int64]]:
    """Summarise a band of layers inside the mask, for :func:`layer_statistics`.

    Sums and histograms of bands add up, so a volume of any size is summarised band by band.
    Only the band's rows at absolute row numbers ``y % STATS_ROW_STEP == 0`` are summarised,
    so any banding of a volume gives the same result. One histogram of their uint16 values
    per layer (``np.bincount``) gives the count, sum and sum of squares too (exactly, in
    integers), and later the percentiles.

    Args:
        data: (k, h, W) uint16 band of k layers.
        mask_band: (h, W) uint8 0/1 mask rows of the band.
        y0: the volume row of the band's first row.

    Returns:
        (sums (k, 3) float64 of [count, sum, sum of squares] inside the mask, histograms
        (k, HIST_BINS) int64 of the values inside the mask), of the summarised rows.
    """
    first = -y0 % STATS_ROW_STEP
    data, mask_band = data[:, first::STATS_ROW_STEP], mask_band[first::STATS_ROW_STEP]
    k = data.shape[0]
    inside = mask_band.astype(bool)
    hists = np.zeros((k, HIST_BINS), dtype=np.int64)
    n_inside = int(np.count_nonzero(inside))
    if n_inside:
        whole = n_inside == inside.size  # no gather where the band is all papyrus
        # bincount widens its input to int64 (4x a uint16 layer): a slice of rows at a time
        rows = max(1, HIST_SLICE_PX // max(data.shape[2], 1))
        for i in range(k):
            for r in range(0, data.shape[1], rows):
                part, where = data[i, r : r + rows], inside[r : r + rows]
                values = part.ravel() if whole else part[where]
                hists[i] += np.bincount(values, minlength=HIST_BINS)
    levels = np.arange(HIST_BINS, dtype=np.int64)
    # Per band, count * 65535**2 < 2**63 for any band under 2**31 px: exact in int64.
    sums = np.column_stack([hists.sum(axis=1), hists @ levels, hists @ (levels * levels)]).astype(
        np.float64
    )
    return sums, hists


def layer_statistics(sums: NDArray[np.float64], hists: NDArray[np.int64]) -> NDArray[np.float64]:
    """Turn per-layer sums and histograms into (z, 4) mean, std, p01, p99.

    Args:
        sums: (z, 3) float64 [count, sum, sum of squares].
        hists: (z, HIST_BINS) int64 histograms of the uint16 values.

    Returns:
        (z, 4) float64; the percentiles are exact for the histogrammed pixels: the smallest
        value with at least 1 % (99 %) of them at or below it (NumPy's
        ``method="inverted_cdf"``).
    """
    count = np.maximum(sums[:, 0], 1)
    mean = sums[:, 1] / count
    std = np.sqrt(np.maximum(sums[:, 2] / count - mean**2, 0.0))
    p01, p99 = np.zeros(len(hists)), np.zeros(len(hists))
    for z, hist in enumerate(hists):  # a layer at a time: temporaries of one histogram
        cum = np.cumsum(hist)
        # the first bin where cum >= q * total, in integers: q = 1/100 and 99/100
        p01[z] = min(int(np.searchsorted(cum * 100, cum[-1], side="left")), HIST_BINS - 1)
        p99[z] = min(int(np.searchsorted(cum * 100, cum[-1] * 99, side="left")), HIST_BINS - 1)
    return np.column_stack([mean, std, p01, p99])


REDUCE_FAN_IN = 8  # run results of the same layers summed 8 at a time


def _write_volume(
    volume_path: Path,
    frag: CheckedFragment,
    mask_bits: NDArray[np.uint8],
    settings: StoreSettings,
    cfg: IngestConfig,
    client: Any,
    writer: ChunkWriter | None,
) -> tuple[NDArray[np.float64], dict[str, float]]:
    """Run the band tasks with dask; return the (z, 4) layer statistics and stage seconds.

    ``mask_bits`` is the (H, ceil(W / 8)) uint8 mask packed along rows (``np.packbits``).

    Run results (histograms of 65536 bins a layer) are summed in a tree as they come, so
    memory holds a few of them whatever the number of bands.
    """
    runs = band_runs(frag.shape, settings)
    task = dask.delayed(copy_run, pure=False)
    tasks = [
        task(volume_path, frag.slices, r, mask_bits[r[0][2] : r[-1][3]], writer, cfg.direct_io)
        for r in runs
    ]
    z = frag.shape[0]
    row_bytes = frag.shape[2] * 2
    sizes = {
        t.key: sum((b[1] - b[0]) * (b[3] - b[2]) for b in r) * row_bytes
        for t, r in zip(tasks, runs)
    }
    bar = tqdm(
        total=sum(sizes.values()),
        unit="B",
        unit_scale=True,
        desc=f"ingest {frag.source.id}",
        disable=not cfg.progress,
        leave=False,
    )
    add = dask.delayed(BandResult.add, pure=True)
    # Sum the bands of each layer range first, so that every partial sum holds only the
    # histograms of its few layers; then one sum over the ranges.
    by_layers: dict[int, list[Any]] = {}
    for t, r in zip(tasks, runs):
        by_layers.setdefault(r[0][0], []).append(t)
    partial = []
    for level in by_layers.values():
        while len(level) > 1:
            level = [
                add(*level[i : i + REDUCE_FAN_IN]) for i in range(0, len(level), REDUCE_FAN_IN)
            ]
        partial.append(level[0])
    root = add(*partial)
    try:
        if client is not None:
            from distributed import as_completed

            futures = client.compute([root, *tasks])
            total_future, band_futures = futures[0], as_completed(futures[1:])
            del futures
            for fut in band_futures:
                bar.update(sizes.get(fut.key, 0))
                fut.release()  # once summed, a band's result can be freed on its worker
            total = total_future.result()
        else:
            from dask.callbacks import Callback

            class _Progress(Callback):
                def _posttask(self, key, result, dsk, state, worker_id):  # noqa: ANN001
                    if key in sizes:
                        bar.update(sizes[key])

            with _Progress():
                (total,) = dask.compute(root, scheduler="threads", num_workers=cfg.workers)
    finally:
        bar.close()
        BAND_BUFFERS.clear()
    sums = np.zeros((z, 3))
    hists = np.zeros((z, HIST_BINS), dtype=np.int64)
    sums[total.z0 : total.z0 + len(total.sums)] = total.sums
    hists[total.z0 : total.z0 + len(total.hists)] = total.hists
    seconds = dict(zip(STAGES, (float(s) for s in total.seconds)))
    return layer_statistics(sums, hists), seconds
