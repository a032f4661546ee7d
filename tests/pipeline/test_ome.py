from __future__ import annotations

import json
import shutil
from pathlib import Path

import jsonschema
import numpy as np
import pytest

from inkpipe.pipeline.ingest import IngestConfig, ingest
from inkpipe.pipeline.ome import multiscale_paths, multiscales_attrs
from inkpipe.pipeline.store import fragment_ids, open_fragments, open_store
from tests.conftest import TINY, write_fragment
from tests.pipeline.ngffcheck import check_image, validate_attrs


def test_every_fragment_of_a_store_is_a_valid_ome_zarr_image(tiny_store):
    frags = {f.id: f for f in open_fragments(tiny_store)}
    assert set(frags) == {"1", "2", "a"}
    for fragment_id, frag in frags.items():
        (level,) = check_image(tiny_store / fragment_id)
        # read with plain zarr-python through the metadata: the stored volume itself
        assert level.shape == frag.meta.shape and level.dtype == np.uint16
        np.testing.assert_array_equal(level[:, :10, :10], frag.volume[:, :10, :10])
        attrs = json.loads((tiny_store / fragment_id / "zarr.json").read_text())["attributes"]
        assert attrs["ome"]["multiscales"][0]["name"] == fragment_id
        assert [a["name"] for a in attrs["ome"]["multiscales"][0]["axes"]] == ["z", "y", "x"]


def test_old_stores_read_and_a_rerun_adds_the_metadata(tmp_path):
    root = tmp_path / "fragments"
    write_fragment(root / "f", seed=4)
    out = tmp_path / "store.zarr"
    cfg = IngestConfig(root=root, out=out, settings=TINY, progress=False)
    ingest(cfg, log=lambda s: None)
    # make it an old store: the group's zarr.json without the "ome" key
    meta_path = out / "f" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    del meta["attributes"]["ome"]
    meta_path.write_text(json.dumps(meta))
    (frag,) = open_fragments(out)
    assert frag.volume.shape == (12, 96, 80)
    logs: list[str] = []
    ingest(cfg, log=logs.append)
    assert any("unchanged, skipped" in line for line in logs)
    assert any("OME-Zarr (NGFF 0.5) metadata added" in line for line in logs)
    check_image(out / "f")
    assert fragment_ids(open_store(out)) == ["f"]
    logs.clear()
    ingest(cfg, log=logs.append)  # the metadata is there now: nothing to add
    assert not any("metadata added" in line for line in logs)


def test_multiscales_attrs_are_valid_and_read_back():
    attrs = multiscales_attrs(
        "prob", ("y", "x"), ["0", "1"], [[1, 1], [2, 2]], downscaling="mean", method={"a": 1}
    )
    validate_attrs(attrs, strict=True)
    assert multiscale_paths(attrs) == ["0", "1"]
    assert multiscale_paths({"multiscales": [{"datasets": [{"path": "s0"}]}]}) == ["s0"]  # 0.4
    for broken in ({}, {"ome": {"version": "0.5"}}, {"multiscales": []}, {"multiscales": [{}]}):
        assert multiscale_paths(broken) is None


def test_the_schema_catches_broken_metadata():
    attrs = multiscales_attrs("v", ("z", "y", "x"), ["volume"], [[1, 1, 1]])
    validate_attrs(attrs)
    broken = json.loads(json.dumps(attrs))
    del broken["ome"]["multiscales"][0]["datasets"][0]["coordinateTransformations"]
    with pytest.raises(jsonschema.ValidationError):
        validate_attrs(broken)
    old = {"ome": {**attrs["ome"], "version": "0.4"}}
    with pytest.raises(jsonschema.ValidationError):
        validate_attrs(old)
    with pytest.raises(ValueError, match="spatial axes"):
        multiscales_attrs("v", ("x",), ["0"], [[1]])
    with pytest.raises(ValueError, match="one scale per level"):
        multiscales_attrs("v", ("y", "x"), ["0", "1"], [[1, 1]])


def test_a_copied_fragment_group_opens_as_an_image_on_its_own(tiny_store, tmp_path):
    # a viewer gets one fragment folder: it must be self-contained
    shutil.copytree(tiny_store / "a", tmp_path / "a.zarr")
    (level,) = check_image(tmp_path / "a.zarr")
    assert level.shape[0] == 12


def test_the_store_metadata_points_at_the_volume(tiny_store: Path):
    attrs = json.loads((tiny_store / "1" / "zarr.json").read_text())["attributes"]
    assert multiscale_paths(attrs) == ["volume"]
