"""The data manifest: which fragments exist, where, their shapes and folds, and ingest defaults.

The repository's ``data_manifest.yaml`` describes the real Kaggle Vesuvius ink-detection data.
A manifest given to ``inkpipe ingest --manifest FILE`` selects the fragments to ingest (paths
relative to the fragments folder), checks their shapes, assigns folds/groups, and may override
the ingest defaults in its ``ingest:`` section.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .checks import repeated
from .errors import ConfigError, InputNotFoundError, InvalidInputError


@dataclass(frozen=True)
class ManifestFragment:
    """One fragment as the manifest describes it.

    Attributes:
        id: fragment id (e.g. ``"1"``).
        path: folder relative to the fragments root (e.g. ``train/1``).
        split: ``"train"`` (has ink labels) or ``"test"``.
        height_px, width_px, layers: expected shape, or None when unknown.
        group: fold / group name for leave-one-fragment-out validation.
    """

    id: str
    path: str
    split: str = "train"
    height_px: int | None = None
    width_px: int | None = None
    layers: int | None = None
    group: str | None = None


@dataclass(frozen=True)
class Manifest:
    """A parsed manifest file."""

    path: Path
    fragments: tuple[ManifestFragment, ...]
    ingest: dict[str, Any] = field(default_factory=dict)


_FRAGMENT_KEYS = {"id", "path", "split", "height_px", "width_px", "layers", "group"}


def load_manifest(path: Path) -> Manifest:
    """Read and check a manifest YAML file.

    Raises:
        InputNotFoundError: the file does not exist.
        InvalidInputError: not YAML, or entries with unknown keys / wrong types.
    """
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"manifest not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise InvalidInputError(f"manifest {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("fragments"), list):
        raise InvalidInputError(
            f"manifest {path} must be a mapping with a 'fragments:' list (see data_manifest.yaml)"
        )
    fragments = []
    for i, entry in enumerate(data["fragments"]):
        if not isinstance(entry, dict) or "id" not in entry:
            raise InvalidInputError(f"manifest {path}: fragment #{i + 1} needs at least an 'id'")
        unknown = set(entry) - _FRAGMENT_KEYS
        if unknown:
            raise InvalidInputError(
                f"manifest {path}: fragment {entry['id']} has unknown keys {sorted(unknown)}; "
                f"allowed: {sorted(_FRAGMENT_KEYS)}"
            )
        fid = str(entry["id"])
        split = str(entry.get("split", "train"))
        if split not in ("train", "test"):
            raise InvalidInputError(
                f"manifest {path}: fragment {fid} has split '{split}', expected train or test"
            )
        try:
            fragments.append(
                ManifestFragment(
                    id=fid,
                    path=str(entry.get("path", f"{split}/{fid}")),
                    split=split,
                    height_px=_opt_int(entry.get("height_px")),
                    width_px=_opt_int(entry.get("width_px")),
                    layers=_opt_int(entry.get("layers", data.get("layers"))),
                    group=None if entry.get("group") is None else str(entry["group"]),
                )
            )
        except (TypeError, ValueError):
            raise InvalidInputError(
                f"manifest {path}: fragment {fid} has a non-integer height_px/width_px/layers"
            ) from None
    dupes = repeated(f.id for f in fragments)
    if dupes:
        raise InvalidInputError(f"manifest {path}: fragment ids listed twice: {dupes}")
    ingest = data.get("ingest") or {}
    if not isinstance(ingest, dict):
        raise ConfigError(f"manifest {path}: 'ingest:' must be a mapping of settings")
    return Manifest(path=path, fragments=tuple(fragments), ingest=ingest)


def _opt_int(value: Any) -> int | None:
    return None if value is None else int(value)
