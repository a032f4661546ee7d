"""OME-Zarr (NGFF 0.5) ``multiscales`` metadata: what standard viewers read to open an image.

An OME-Zarr image is a Zarr v3 group whose attributes hold, under the ``ome`` key, the
format version and a list of ``multiscales``: the image's axes (type ``space`` for z, y and
x; at most 5, 2 or 3 of them spatial, in the arrays' dimension order) and its resolution
levels, highest first, each an array path relative to the group with exactly one ``scale``
transformation (one factor per axis; without a physical pixel size, the factor relative to
the first level). Each level array's ``dimension_names`` must equal the axis names. See
https://ngff.openmicroscopy.org/0.5/ ("multiscales" metadata).

Older stores and other writers may carry NGFF 0.4, where the same ``multiscales`` list sits
directly in the attributes; :func:`multiscale_paths` reads both.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "NGFF_VERSION",
    "OME_KEY",
    "multiscale_paths",
    "multiscales_attrs",
]

NGFF_VERSION = "0.5"
OME_KEY = "ome"


def multiscales_attrs(
    name: str,
    axes: Sequence[str],
    paths: Sequence[str],
    scales: Sequence[Sequence[float]],
    *,
    downscaling: str | None = None,
    method: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Return the group attributes ``{"ome": {...}}`` of a single OME-Zarr image.

    Args:
        name: the image's name (e.g. the fragment id).
        axes: the spatial axis names in array order, e.g. ``("z", "y", "x")`` or ``("y", "x")``.
        paths: the level arrays relative to the group, highest resolution first.
        scales: per level, one scale factor per axis (1 for the first level; 2, 4, … for
            levels downsampled by 2, 4, …), since no physical pixel size is known.
        downscaling: the spec's ``type`` of the pyramid (how levels were made), e.g.
            ``"mean"``; None for a single level.
        method: the spec's ``metadata`` about the downscaling (a JSON-able mapping).

    Raises:
        ValueError: the axes, paths and scales do not fit together (a programming error).
    """
    if not 2 <= len(axes) <= 3 or len(set(axes)) != len(axes):
        raise ValueError(f"expected 2 or 3 distinct spatial axes, got {list(axes)}")
    if not paths or len(paths) != len(scales):
        raise ValueError(f"expected one scale per level, got {len(paths)} paths, {len(scales)}")
    datasets = []
    for path, scale in zip(paths, scales):
        if len(scale) != len(axes):
            raise ValueError(f"level {path}: {len(scale)} scale factors for {len(axes)} axes")
        datasets.append(
            {
                "path": str(path),
                "coordinateTransformations": [
                    {"type": "scale", "scale": [float(s) for s in scale]}
                ],
            }
        )
    multiscale: dict[str, Any] = {
        "name": str(name),
        "axes": [{"name": a, "type": "space"} for a in axes],
        "datasets": datasets,
    }
    if downscaling is not None:
        multiscale["type"] = downscaling
    if method is not None:
        multiscale["metadata"] = dict(method)
    return {OME_KEY: {"version": NGFF_VERSION, "multiscales": [multiscale]}}


def multiscale_paths(attrs: Mapping[str, Any]) -> list[str] | None:
    """Return the level paths of a group's first multiscale image, highest first, or None.

    Reads NGFF 0.5 (``attrs["ome"]["multiscales"]``) and 0.4 (``attrs["multiscales"]``);
    None when the attributes hold neither, or hold them malformed.
    """
    ome = attrs.get(OME_KEY)
    holder = ome if isinstance(ome, Mapping) and "multiscales" in ome else attrs
    multiscales = holder.get("multiscales")
    if not isinstance(multiscales, Sequence) or not multiscales:
        return None
    first = multiscales[0]
    datasets = first.get("datasets") if isinstance(first, Mapping) else None
    if not isinstance(datasets, Sequence) or not datasets:
        return None
    paths = [d.get("path") for d in datasets if isinstance(d, Mapping)]
    if not paths or not all(isinstance(p, str) and p for p in paths):
        return None
    return [str(p) for p in paths]
