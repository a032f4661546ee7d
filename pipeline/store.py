"""The inkpipe Zarr store: the one module that knows its schema.

Layout (Zarr format 3)::

    store.zarr/                     root attrs: {"inkpipe": {"schema": 1, "version", "fragments"}}
      <fragment id>/                group attrs: {"inkpipe": FragmentMeta as a dict,
                                                  "ome": NGFF 0.5 multiscales of volume}
        volume       uint16 (z, y, x)   CT layers, chunked and Blosc-compressed
        mask         uint8  (y, x)      papyrus area, 0/1
        labels       uint8  (y, x)      ink, 0/1            (training fragments only)
        ir           uint8  (y, x)      infrared photo      (when the fragment has one)
        windows      int32  (n, 4)      valid windows: y0, x0, mask_px, ink_px
        layer_stats  float64 (z, 4)     per layer inside the mask: mean, std, p01, p99

The ``ome`` attributes make each fragment group an OME-Zarr (NGFF 0.5) image of one level,
``volume`` (axes z, y, x; scale 1), so standard viewers (napari-ome-zarr, neuroglancer) open
it; stores written before them are read all the same, and a rerun of ``inkpipe ingest`` adds
them (:func:`ensure_ome`).

Mask and labels are 0/1 whatever their source images held; the fragment's ``binarization``
attribute records the rule that read each (:func:`inkpipe.pipeline.images.read_binary_image`).

A fragment is written with ``complete = False`` and flipped to ``True`` as its last write, and
only then listed in the root attrs: readers see complete fragments only, and an interrupted
ingest leaves an incomplete group that the next run deletes and redoes.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

import numpy as np
import zarr
from numpy.typing import NDArray
from zarr.codecs import BloscCname, BloscCodec, BloscShuffle

from . import __version__
from .checks import check_int
from .errors import ConfigError, InputNotFoundError, StoreError, check_choice
from .ome import OME_KEY, multiscales_attrs
from .windows import WINDOW_COLUMNS

SCHEMA_VERSION = 1
ATTR_KEY = "inkpipe"
STAT_COLUMNS = ("mean", "std", "p01", "p99")


class Codec(StrEnum):
    """The Blosc compressor of the volumes (``--codec``)."""

    LZ4 = "lz4"
    ZSTD = "zstd"
    BLOSCLZ = "blosclz"
    LZ4HC = "lz4hc"
    ZLIB = "zlib"


class Shuffle(StrEnum):
    """The Blosc pre-filter of the volumes (``--shuffle``)."""

    SHUFFLE = "shuffle"
    BITSHUFFLE = "bitshuffle"
    NOSHUFFLE = "noshuffle"


@dataclass(frozen=True)
class StoreSettings:
    """How volumes are chunked and compressed, and how windows are indexed.

    Defaults are the ones ``benchmarks/bench_ingest.py`` justifies (see the README): chunks of
    4 layers x 512 x 512 px keep the waste of reading an arbitrary 10-layer range at 20 % and let
    most 224 px crops fall in one or two chunks. The synthetic benchmark volume compresses
    0-12 % losslessly whatever the codec, and LZ4 with byte shuffle stores it (and real CT) at
    ratio 1.00 while its encoding cost ingest a quarter of its CPU; so the default level is 0:
    Blosc stores each chunk as is (a copy to write and to read, still in a Blosc frame, so
    ``--clevel``/``--codec``/``--shuffle`` only change the numbers). LZ4 with bit-shuffle stored
    8 % less there: ``--clevel 5 --shuffle bitshuffle`` trades ingest and read speed for that.
    """

    chunk_layers: int = 4
    chunk_px: int = 512
    codec: Codec = Codec.LZ4
    clevel: int = 0
    shuffle: Shuffle = Shuffle.SHUFFLE
    tile_px: int = 224
    stride_px: int = 112
    min_coverage: float = 0.1

    def __post_init__(self) -> None:
        if self.chunk_layers < 1 or self.chunk_px < 16:
            raise ConfigError(
                f"chunks must be at least 1 layer x 16 px, got {self.chunk_layers} x "
                f"{self.chunk_px}"
            )
        object.__setattr__(self, "codec", check_choice("codec", self.codec, Codec))
        object.__setattr__(self, "shuffle", check_choice("shuffle", self.shuffle, Shuffle))
        check_int("compression level", self.clevel, 0, maximum=9)

    def compressor(self) -> BloscCodec:
        """Return the Zarr v3 Blosc codec for volumes."""
        return BloscCodec(
            cname=BloscCname(self.codec.value),
            clevel=self.clevel,
            shuffle=BloscShuffle(self.shuffle.value),
        )

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> StoreSettings:
        """Build from a mapping (e.g. a manifest's ``ingest:``), rejecting unknown keys."""
        known = set(cls.__dataclass_fields__)
        unknown = set(values) - known
        if unknown:
            raise ConfigError(
                f"unknown ingest settings {sorted(unknown)}; allowed: {sorted(known)}"
            )
        return cls(**values)


@dataclass(frozen=True)
class FragmentMeta:
    """What a fragment group's attributes record.

    Attributes:
        id: fragment id; split: ``"train"``/``"test"``; group: fold or None.
        shape: (layers, H, W); layers: number of CT layers.
        has_labels, has_ir: which 2-D images are stored.
        sources: per source file: name, size in bytes, mtime (ns).
        settings: the :class:`StoreSettings` used.
        version: inkpipe version that wrote it; complete: the completion marker.
        binarization: the rule each binary image was read by, ``{"mask": rule, "labels":
            rule}`` with rules of :data:`inkpipe.pipeline.images.BINARY_RULES` (``"0/1"``,
            ``">127"``, ``"1-bit"``). Empty in stores written before it was recorded, whose
            images were all read as ``> 127``.
    """

    id: str
    split: str
    shape: tuple[int, int, int]
    has_labels: bool
    has_ir: bool
    sources: dict[str, Any]
    settings: dict[str, Any]
    group: str | None = None
    version: str = __version__
    complete: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    binarization: dict[str, str] = field(default_factory=dict)

    @property
    def layers(self) -> int:
        """Number of CT layers."""
        return self.shape[0]

    def to_attrs(self) -> dict[str, Any]:
        """Return a JSON-able dict for the group attributes."""
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d

    @classmethod
    def from_attrs(cls, d: Mapping[str, Any]) -> FragmentMeta:
        """Inverse of :meth:`to_attrs`."""
        d = dict(d)
        d["shape"] = tuple(d["shape"])
        return cls(**d)


@dataclass(frozen=True)
class Fragment:
    """Read access to one complete fragment of a store.

    ``volume`` is the lazy Zarr array; the 2-D arrays are loaded on first use.
    """

    meta: FragmentMeta
    group: zarr.Group

    @property
    def id(self) -> str:
        """Fragment id."""
        return self.meta.id

    def array(self, name: str) -> zarr.Array:
        """Return one of the fragment's arrays by name (lazy)."""
        node = self.group[name]
        if not isinstance(node, zarr.Array):
            raise StoreError(f"fragment {self.id}: '{name}' is not an array in the store")
        return node

    @property
    def volume(self) -> zarr.Array:
        """(z, y, x) uint16 Zarr array (lazy)."""
        return self.array("volume")

    def mask(self) -> NDArray[np.uint8]:
        """(H, W) uint8 0/1 papyrus mask."""
        return np.asarray(self.array("mask")[...])

    def labels(self) -> NDArray[np.uint8] | None:
        """(H, W) uint8 0/1 ink labels, or None for test fragments."""
        return np.asarray(self.array("labels")[...]) if self.meta.has_labels else None

    def ir(self) -> NDArray[np.uint8] | None:
        """(H, W) uint8 infrared image, or None."""
        return np.asarray(self.array("ir")[...]) if self.meta.has_ir else None

    def windows(self) -> NDArray[np.int32]:
        """(n, 4) int32 valid windows: y0, x0, mask_px, ink_px."""
        return np.asarray(self.array("windows")[...])

    def layer_stats(self) -> NDArray[np.float64]:
        """(z, 4) float64 per-layer statistics inside the mask: mean, std, p01, p99."""
        return np.asarray(self.array("layer_stats")[...])

    @property
    def settings(self) -> StoreSettings:
        """The settings this fragment was ingested with."""
        return StoreSettings(**self.meta.settings)

    def nbytes_stored(self) -> int:
        """Bytes on disk of the whole fragment group."""
        return _dir_size(_group_path(self.group))

    def volume_nbytes_stored(self) -> int:
        """Bytes on disk of the volume array."""
        return _dir_size(_group_path(self.group) / "volume")


def _group_path(group: zarr.Group) -> Path:
    store = group.store
    root = Path(getattr(store, "root", ""))
    return root / group.path


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def _info(node: zarr.Group | zarr.Array) -> dict[str, Any]:
    """Return a copy of the inkpipe attributes of a group or array (``{}`` if none)."""
    value: Any = node.attrs.get(ATTR_KEY)
    return dict(value) if isinstance(value, Mapping) else {}


def _child_group(root: zarr.Group, name: str) -> zarr.Group:
    node = root[name]
    if not isinstance(node, zarr.Group):
        raise StoreError(f"store {_group_path(root)}: '{name}' is not a fragment group")
    return node


def is_store(path: Path) -> bool:
    """Return True if ``path`` is an inkpipe store."""
    try:
        g = zarr.open_group(Path(path), mode="r")
    except Exception:
        return False
    return ATTR_KEY in g.attrs


def open_store(path: Path, mode: Literal["r", "r+"] = "r") -> zarr.Group:
    """Open an existing inkpipe store.

    Raises:
        InputNotFoundError: nothing at ``path``.
        StoreError: ``path`` is not an inkpipe store or has a newer schema.
    """
    path = Path(path)
    if not path.exists():
        raise InputNotFoundError(
            f"store not found: {path}; create it with 'inkpipe ingest FRAGMENTS --out {path}'"
        )
    if not is_store(path):
        raise StoreError(
            f"{path} is not an inkpipe store (no '{ATTR_KEY}' attributes); create one with "
            "'inkpipe ingest'"
        )
    g = zarr.open_group(path, mode=mode)
    schema = _info(g).get("schema")
    if schema != SCHEMA_VERSION:
        raise StoreError(
            f"{path} has store schema {schema}, this inkpipe ({__version__}) reads schema "
            f"{SCHEMA_VERSION}; re-ingest with 'inkpipe ingest --overwrite'"
        )
    return g


def create_store(path: Path) -> zarr.Group:
    """Open an inkpipe store for writing, creating it if needed.

    An existing folder that is neither empty nor an inkpipe store is never touched.

    Raises:
        StoreError: ``path`` exists and is something else.
    """
    path = Path(path)
    if path.exists():
        if is_store(path):
            return open_store(path, mode="r+")
        if path.is_file() or any(path.iterdir()):
            raise StoreError(
                f"refusing to write into {path}: it exists and is not an inkpipe store; "
                "choose another --out or remove it yourself"
            )
    g = zarr.open_group(path, mode="w", zarr_format=3)
    g.attrs[ATTR_KEY] = {"schema": SCHEMA_VERSION, "version": __version__, "fragments": []}
    return g


def fragment_ids(root: zarr.Group) -> list[str]:
    """Ids of the complete fragments in a store, in ingest order."""
    return [str(f) for f in _info(root).get("fragments", [])]


def fragment_meta(root: zarr.Group, fragment_id: str) -> FragmentMeta | None:
    """Return the metadata of a fragment group (complete or not), or None if absent."""
    if fragment_id not in root.group_keys():
        return None
    info = _info(_child_group(root, fragment_id))
    return FragmentMeta.from_attrs(info) if info else None


def open_fragment(root: zarr.Group, fragment_id: str) -> Fragment:
    """Open a complete fragment for reading.

    Raises:
        StoreError: no such complete fragment (the message lists the ones there are).
    """
    ids = fragment_ids(root)
    if fragment_id not in ids:
        raise StoreError(
            f"fragment '{fragment_id}' is not in store {_group_path(root)} "
            f"(it has: {', '.join(ids) or 'none'})"
        )
    group = _child_group(root, fragment_id)
    return Fragment(FragmentMeta.from_attrs(_info(group)), group)


def open_fragments(path: Path, ids: list[str] | None = None) -> list[Fragment]:
    """Open a store and the given (default: all) complete fragments."""
    root = open_store(path)
    return [open_fragment(root, i) for i in (ids if ids else fragment_ids(root))]


def begin_fragment(root: zarr.Group, meta: FragmentMeta, settings: StoreSettings) -> zarr.Group:
    """Create a fresh, incomplete fragment group with an empty volume array.

    Any previous group of that id is deleted first (and unlisted).
    """
    drop_fragment(root, meta.id)
    group = root.create_group(meta.id)
    group.attrs[ATTR_KEY] = meta.to_attrs()
    group.attrs.update(fragment_ome_attrs(meta.id))
    z, h, w = meta.shape
    group.create_array(
        "volume",
        shape=(z, h, w),
        dtype="uint16",
        chunks=(
            min(settings.chunk_layers, z),
            min(settings.chunk_px, h),
            min(settings.chunk_px, w),
        ),
        compressors=settings.compressor(),
        fill_value=0,
        dimension_names=("z", "y", "x"),
    )
    return group


def fragment_ome_attrs(fragment_id: str) -> dict[str, Any]:
    """Return a fragment group's ``ome`` attributes: one level, ``volume``, axes (z, y, x)."""
    return multiscales_attrs(fragment_id, ("z", "y", "x"), ["volume"], [[1.0, 1.0, 1.0]])


def ensure_ome(group: zarr.Group, fragment_id: str) -> bool:
    """Add the ``ome`` attributes to a fragment group written without them; True if added."""
    if OME_KEY in group.attrs:
        return False
    group.attrs.update(fragment_ome_attrs(fragment_id))
    return True


def write_plane(group: zarr.Group, name: str, image: Any, chunk_px: int) -> None:
    """Write a 2-D uint8 image (mask, labels, ir) into a fragment group, a chunk row at a time.

    One ``arr[...] = image`` has zarr encode every chunk at once, holding about half the
    image again in encoded and staged copies (68 MB for a 14830 x 9506 mask); a row of chunks
    at a time holds one row. ``image`` is an (H, W) uint8 array or anything with its
    ``shape`` whose ``image[y0:y1]`` gives those rows as one (e.g. a mask held as bits).
    """
    arr = group.create_array(
        name,
        shape=image.shape,
        dtype="uint8",
        chunks=(min(4 * chunk_px, image.shape[0]), min(4 * chunk_px, image.shape[1])),
        compressors=BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle"),
        fill_value=0,
        dimension_names=("y", "x"),
    )
    rows = arr.chunks[0]
    for y0 in range(0, image.shape[0], rows):
        arr[y0 : y0 + rows] = image[y0 : y0 + rows]


def write_table(group: zarr.Group, name: str, table: NDArray, attrs: Mapping[str, Any]) -> None:
    """Write a small 2-D table (windows, layer_stats) with descriptive attributes."""
    arr = group.create_array(
        name,
        shape=table.shape,
        dtype=table.dtype,
        chunks=(max(len(table), 1), table.shape[1]),
        fill_value=0,
    )
    if table.size:
        arr[...] = table
    arr.attrs.update(dict(attrs))


def write_windows(group: zarr.Group, windows: NDArray[np.int32], settings: StoreSettings) -> None:
    """Write the window index with its geometry in the array attributes."""
    write_table(
        group,
        "windows",
        windows.astype(np.int32).reshape(-1, 4),
        {
            "columns": list(WINDOW_COLUMNS),
            "tile_px": settings.tile_px,
            "stride_px": settings.stride_px,
            "min_coverage": settings.min_coverage,
        },
    )


# Bytes of a fragment's metadata files (zarr.json of the group and its six arrays, the source
# list of 65 slices included) and of the root's zarr.json rewritten when it is listed.
METADATA_BOUND_BYTES = 64 * 1024
BLOSC_OVERHEAD_BYTES = 16  # Blosc stores an incompressible chunk as is, after its header


def fragment_bytes_bound(
    shape: tuple[int, int, int], settings: StoreSettings, planes: int, block_bytes: int = 4096
) -> int:
    """Return an upper bound of the bytes a fragment takes on disk once written.

    Every chunk is stored at its full shape (edge chunks are padded), compression is assumed
    to gain nothing (Blosc then adds its header; Zstd, for the tables, ~1 %), and every file
    fills whole file-system blocks of ``block_bytes``.

    Args:
        shape: (layers, H, W) of the fragment.
        settings: the chunking of the volume and the window geometry.
        planes: how many 2-D uint8 images are stored (mask, labels, IR: 1 to 3).
        block_bytes: the file system's allocation unit.
    """
    z, h, w = shape

    def chunked(dims: tuple[int, ...], chunks: tuple[int, ...], item: int, overhead: int) -> int:
        n_chunks = int(np.prod([-(-d // c) for d, c in zip(dims, chunks)]))
        per_chunk = int(np.prod(chunks)) * item + overhead
        return n_chunks * (-(-per_chunk // block_bytes) * block_bytes)

    cz, cp = min(settings.chunk_layers, z), settings.chunk_px
    volume = chunked((z, h, w), (cz, min(cp, h), min(cp, w)), 2, BLOSC_OVERHEAD_BYTES)
    plane = chunked((h, w), (min(4 * cp, h), min(4 * cp, w)), 1, BLOSC_OVERHEAD_BYTES)
    n_windows = (h // max(settings.stride_px, 1) + 2) * (w // max(settings.stride_px, 1) + 2)
    tables = sum(int(n * 1.01) + 128 + block_bytes for n in (n_windows * 16, z * 4 * 8))
    return volume + planes * plane + tables + METADATA_BOUND_BYTES


def finish_fragment(root: zarr.Group, group: zarr.Group, meta: FragmentMeta) -> None:
    """Mark a fragment complete (its last write) and list it in the root attributes."""
    attrs = meta.to_attrs()
    attrs["complete"] = True
    group.attrs[ATTR_KEY] = attrs
    info = _info(root)
    info["fragments"] = [f for f in fragment_ids(root) if f != meta.id] + [meta.id]
    info["version"] = __version__
    root.attrs[ATTR_KEY] = info


def drop_fragment(root: zarr.Group, fragment_id: str) -> None:
    """Unlist and delete a fragment group if present."""
    info = _info(root)
    if fragment_id in fragment_ids(root):
        info["fragments"] = [f for f in fragment_ids(root) if f != fragment_id]
        root.attrs[ATTR_KEY] = info
    if fragment_id in root.group_keys():
        path = _group_path(root) / fragment_id
        if path.is_dir():
            shutil.rmtree(path)
        else:
            del root[fragment_id]
