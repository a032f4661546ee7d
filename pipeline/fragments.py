"""Find fragment folders and check that they are complete and consistent.

A fragment folder holds ``surface_volume/00.tif … NN.tif`` (one uint16 slice per CT layer,
numbered from 0 without gaps), ``mask.png`` (papyrus area), and optionally ``inklabels.png``
(ink = 255) and ``ir.png``. Fragments are found in a folder laid out like the Kaggle data
(``train/<id>``, ``test/<id>``), in a folder of fragment folders, or as a single fragment folder.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .checks import repeated
from .errors import InputNotFoundError, InvalidInputError
from .images import image_shape
from .manifest import Manifest, ManifestFragment
from .tiff import SliceInfo, inspect_slice

SLICE_DIR = "surface_volume"
MASK_FILE = "mask.png"
LABELS_FILE = "inklabels.png"
IR_FILE = "ir.png"
_SLICE_RE = re.compile(r"^(\d+)\.tiff?$", re.IGNORECASE)


@dataclass(frozen=True)
class FragmentSource:
    """A fragment folder on disk, before it is checked.

    Attributes:
        id: fragment id (the folder name unless a manifest says otherwise).
        path: the fragment folder.
        split: ``"train"`` or ``"test"`` (from the layout or manifest; ``"train"`` when the
            folder has ink labels and nothing says otherwise).
        group: fold / group for leave-one-fragment-out, or None.
        expected: the manifest entry whose shape must match, or None.
    """

    id: str
    path: Path
    split: str
    group: str | None = None
    expected: ManifestFragment | None = None

    @property
    def labels_path(self) -> Path | None:
        """The ink labels file if present."""
        p = self.path / LABELS_FILE
        return p if p.is_file() else None

    @property
    def ir_path(self) -> Path | None:
        """The infrared image if present."""
        p = self.path / IR_FILE
        return p if p.is_file() else None


@dataclass(frozen=True)
class CheckedFragment:
    """A fragment whose files were all checked for presence and consistency.

    Attributes:
        source: where it came from.
        slices: one :class:`SliceInfo` per layer, in z order.
        shape: (layers, H, W).
        dtype: slice dtype (``"uint16"`` for real data).
    """

    source: FragmentSource
    slices: tuple[SliceInfo, ...]
    shape: tuple[int, int, int]
    dtype: str


def is_fragment_dir(path: Path) -> bool:
    """Return True if ``path`` looks like a fragment folder (has ``surface_volume/``)."""
    return (Path(path) / SLICE_DIR).is_dir()


def discover_fragments(root: Path, manifest: Manifest | None = None) -> list[FragmentSource]:
    """Find the fragments under ``root``.

    With a manifest, exactly the manifest's fragments are returned (paths relative to ``root``).
    Without, ``root`` may be a fragment folder, a folder of fragment folders, or a Kaggle-style
    folder with ``train/`` and ``test/`` (the split then comes from the folder name).

    Raises:
        InputNotFoundError: ``root`` is missing, a manifest fragment is missing, or no
            fragment was found.
        InvalidInputError: two fragments share an id.
    """
    root = Path(root)
    if not root.is_dir():
        raise InputNotFoundError(f"fragments folder not found: {root}")
    if manifest is not None:
        found = []
        for entry in manifest.fragments:
            path = root / entry.path
            if not is_fragment_dir(path):
                raise InputNotFoundError(
                    f"fragment {entry.id} from manifest {manifest.path} not found: expected "
                    f"{path}/{SLICE_DIR}/; fix its 'path:' or the fragments folder"
                )
            found.append(FragmentSource(entry.id, path, entry.split, entry.group, entry))
        return found
    if is_fragment_dir(root):
        candidates: list[tuple[Path, str | None]] = [(root, None)]
    else:
        candidates = []
        for child in sorted(root.iterdir()):
            if child.name in ("train", "test") and child.is_dir() and not is_fragment_dir(child):
                candidates += [(c, child.name) for c in sorted(child.iterdir()) if c.is_dir()]
            elif child.is_dir():
                candidates.append((child, None))
    found = []
    for path, split in candidates:
        if not is_fragment_dir(path):
            continue
        if split is None:
            split = "train" if (path / LABELS_FILE).is_file() else "test"
        found.append(FragmentSource(path.name, path, split))
    if not found:
        raise InputNotFoundError(
            f"no fragments found in {root}: expected folders with {SLICE_DIR}/00.tif … and "
            f"{MASK_FILE}, laid out as train/<id>/, test/<id>/ or <id>/"
        )
    dupes = repeated(f.id for f in found)
    if dupes:
        raise InvalidInputError(
            f"fragment ids found twice in {root}: {dupes}; rename one of the folders or use "
            "--manifest to give them distinct ids"
        )
    return found


def list_slices(source: FragmentSource) -> list[Path]:
    """Return the slice files of a fragment in z order, checking the numbering.

    Raises:
        InvalidInputError: a gap in the numbering, duplicate numbers, stray files, or a count
            that disagrees with the manifest.
    """
    folder = source.path / SLICE_DIR
    numbered: dict[int, Path] = {}
    for p in folder.iterdir():
        if p.name.startswith("."):
            continue
        m = _SLICE_RE.match(p.name)
        if m is None:
            if p.suffix.lower() in (".tif", ".tiff"):
                raise InvalidInputError(
                    f"fragment {source.id}: unexpected slice name {p}; slices are named "
                    "00.tif, 01.tif, … — rename or remove it"
                )
            continue
        z = int(m.group(1))
        if z in numbered:
            raise InvalidInputError(
                f"fragment {source.id}: layer {z} appears twice in {folder} "
                f"({numbered[z].name} and {p.name}); remove one"
            )
        numbered[z] = p
    if not numbered:
        raise InputNotFoundError(
            f"fragment {source.id}: no slices in {folder}, expected 00.tif, 01.tif, …"
        )
    count = max(numbered) + 1
    missing = sorted(set(range(count)) - set(numbered))
    if missing:
        shown = ", ".join(f"{z:02d}.tif" for z in missing[:5]) + (" …" if len(missing) > 5 else "")
        raise InvalidInputError(
            f"fragment {source.id}: slices missing from {folder}: {shown} (found {len(numbered)} "
            f"files numbered 0…{count - 1}); restore them"
        )
    expected = source.expected.layers if source.expected else None
    if expected is not None and count != expected:
        what = "extra" if count > expected else "missing"
        raise InvalidInputError(
            f"fragment {source.id}: found {count} slices in {folder}, expected {expected} "
            f"({what} slices); fix the folder or the 'layers:' of the manifest"
        )
    return [numbered[z] for z in range(count)]


def check_fragment(source: FragmentSource) -> CheckedFragment:
    """Check every file of a fragment without reading its pixels.

    Checks: slice numbering, each slice's header and size on disk, equal shapes and dtypes,
    the mask (required) and labels/IR (optional) shapes, and the manifest's expected shape.

    Raises:
        InputNotFoundError / InvalidInputError with the file and the fix.
    """
    paths = list_slices(source)
    infos = [inspect_slice(p) for p in paths]
    first = infos[0]
    for info in infos[1:]:
        if info.shape != first.shape:
            raise InvalidInputError(
                f"fragment {source.id}: slice {info.path} has shape {info.shape}, but "
                f"{first.path.name} has {first.shape}; all slices must be the same size"
            )
        if info.dtype != first.dtype:
            raise InvalidInputError(
                f"fragment {source.id}: slice {info.path} is {info.dtype}, but "
                f"{first.path.name} is {first.dtype}; all slices must have one dtype"
            )
    if first.dtype not in ("uint16", "uint8"):
        raise InvalidInputError(
            f"fragment {source.id}: slices are {first.dtype}, expected uint16 CT data "
            f"(e.g. {first.path})"
        )
    mask_path = source.path / MASK_FILE
    if not mask_path.is_file():
        raise InputNotFoundError(
            f"fragment {source.id}: papyrus mask not found: {mask_path}; every fragment needs "
            "a mask.png (white = papyrus)"
        )
    for path, what in (
        (mask_path, "mask"),
        (source.labels_path, "ink labels"),
        (source.ir_path, "IR image"),
    ):
        if path is None:
            continue
        shape = image_shape(path, what)
        if shape != first.shape:
            raise InvalidInputError(
                f"fragment {source.id}: {what} {path} is {shape[0]}x{shape[1]} (HxW), but the "
                f"slices are {first.shape[0]}x{first.shape[1]}; they must match"
            )
    exp = source.expected
    if (
        exp is not None
        and exp.height_px is not None
        and exp.width_px is not None
        and (exp.height_px, exp.width_px) != first.shape
    ):
        raise InvalidInputError(
            f"fragment {source.id}: slices are {first.shape[0]}x{first.shape[1]} (HxW) but "
            f"the manifest says {exp.height_px}x{exp.width_px}; check the folder or the manifest"
        )
    return CheckedFragment(source, tuple(infos), (len(infos), *first.shape), first.dtype)
