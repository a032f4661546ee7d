"""Check OME-Zarr (NGFF 0.5) images the way a standard reader would, without inkpipe's reader.

The metadata is validated with ``jsonschema`` against the official 0.5 schemas (copied in
``ngff_0.5/``), and the rules the schemas cannot express are checked on the arrays opened
with plain zarr-python: every level exists, has as many dimensions as there are axes, and
``dimension_names`` equal to the axis names.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import zarr
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

SCHEMAS = Path(__file__).parent / "ngff_0.5"


def _registry() -> Registry:
    resources = []
    for path in SCHEMAS.glob("*.schema"):
        schema = json.loads(path.read_text())
        # strict_image.schema names no $schema dialect: the others' draft 2020-12
        resource = Resource.from_contents(schema, default_specification=DRAFT202012)
        resources.append((schema["$id"], resource))
    return Registry().with_resources(resources)


def validate_attrs(attrs: dict[str, Any], strict: bool = False) -> None:
    """Validate group attributes against the 0.5 image schema (raises ValidationError)."""
    name = "strict_image.schema" if strict else "image.schema"
    schema = json.loads((SCHEMAS / name).read_text())
    jsonschema.Draft202012Validator(schema, registry=_registry()).validate(attrs)


def check_image(path: Path | str, strict: bool = False) -> list[zarr.Array]:
    """Check the OME-Zarr image group at ``path``; return its level arrays, highest first."""
    meta = json.loads((Path(path) / "zarr.json").read_text())
    assert meta["zarr_format"] == 3 and meta["node_type"] == "group"
    attrs = meta["attributes"]
    validate_attrs(attrs, strict=strict)
    (multiscale,) = attrs["ome"]["multiscales"]
    names = [axis["name"] for axis in multiscale["axes"]]
    group = zarr.open_group(str(path), mode="r")
    levels = []
    for dataset in multiscale["datasets"]:
        array = group[dataset["path"]]
        assert isinstance(array, zarr.Array), dataset["path"]
        assert array.ndim == len(names)
        assert list(array.metadata.dimension_names) == names
        (scale,) = dataset["coordinateTransformations"]
        assert len(scale["scale"]) == len(names)
        levels.append(array)
    return levels
