"""Fault injection: label (and mask) images of every kind, through ingest and evaluate.

One rule per image, the same in both (``pipeline.images.read_binary_image``): 0/1 -> 1 is ink;
8-bit 0/255 or anti-aliased -> above 127; 1-bit -> as is. 16-bit, colour, transparent,
photograph-like, faint and one-value images are refused with one line naming the file and the
fix, before anything is written; a label image of ink everywhere is refused, one without ink
is valid. The rule is recorded per fragment in the store.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner
from PIL import Image

from inkpipe.cli import cli
from inkpipe.infer.rle import encode_rle, write_submission
from inkpipe.pipeline.images import read_binary_image
from inkpipe.pipeline.ingest import IngestConfig, ingest
from inkpipe.pipeline.store import ATTR_KEY, open_fragment, open_store
from tests.conftest import TINY, write_fragment

H, W = 48, 40
INK = np.zeros((H, W), bool)
INK[10:21, 8:31] = True


def anti_aliased() -> np.ndarray:
    grey = INK.astype(np.uint8) * 255
    grey[9, 8:31] = 90  # the soft edge outside the ink: not ink
    grey[10, 8:31] = 180  # the soft edge inside: ink
    return grey


def rgb(grey: np.ndarray) -> np.ndarray:
    return np.stack([grey] * 3, axis=-1)


# name -> (image, rule, expected 0/1 pixels)
ACCEPTED = {
    "0/1": (Image.fromarray(INK.astype(np.uint8)), "0/1", INK),
    "0/255": (Image.fromarray(INK.astype(np.uint8) * 255), ">127", INK),
    "anti-aliased": (Image.fromarray(anti_aliased()), ">127", anti_aliased() > 127),
    "1-bit": (Image.fromarray(INK), "1-bit", INK),
    "RGB, equal channels": (Image.fromarray(rgb(INK.astype(np.uint8) * 255)), ">127", INK),
    "palette": (Image.fromarray(INK.astype(np.uint8) * 255).convert("P"), ">127", INK),
    "no ink": (Image.fromarray(np.zeros((H, W), np.uint8)), "0/1", np.zeros((H, W), bool)),
}


def _coloured() -> Image.Image:
    image = rgb(INK.astype(np.uint8) * 255)
    image[12, 10] = (255, 0, 0)
    return Image.fromarray(image)


def _transparent() -> Image.Image:
    alpha = np.full((H, W, 1), 255, np.uint8)
    alpha[0, 0] = 0
    return Image.fromarray(np.concatenate([rgb(INK.astype(np.uint8) * 255), alpha], axis=-1))


# name -> (image, words of the one-line error)
REFUSED = {
    "16-bit 0/65535": (Image.fromarray(INK.astype(np.uint16) * 65535), "is a 16-bit image"),
    "16-bit 0/1": (Image.fromarray(INK.astype(np.uint16)), "is a 16-bit image"),
    "RGB, coloured": (_coloured(), "channels differ at 1 pixel"),
    "RGBA, transparent": (_transparent(), "has transparent pixels"),
    "all 255 (ink everywhere)": (Image.fromarray(np.full((H, W), 255, np.uint8)), "everywhere"),
    "all 1 (ink everywhere)": (Image.fromarray(np.ones((H, W), np.uint8)), "set everywhere"),
    "1-bit, all set": (Image.fromarray(np.ones((H, W), bool)), "set everywhere"),
    "all 7": (Image.fromarray(np.full((H, W), 7, np.uint8)), "none above 127"),
    "all 200": (Image.fromarray(np.full((H, W), 200, np.uint8)), "one value 200 everywhere"),
    "faint 0/100": (Image.fromarray(INK.astype(np.uint8) * 100), "none above 127"),
    "photograph": (
        Image.fromarray(np.random.default_rng(0).integers(1, 255, (H, W), dtype=np.uint8)),
        "looks like a photograph",
    ),
}


def fragment_with_labels(root: Path, image: Image.Image, frag_id: str = "1") -> Path:
    path = write_fragment(root / "train" / frag_id, height=H, width=W, layers=4, ir=False)
    image.save(path / "inklabels.png")
    return path


def run_ingest(root: Path, out: Path):
    return ingest(IngestConfig(root=root, out=out, settings=TINY, progress=False), log=print)


INGEST_CLI = ["--chunk-layers", "4", "--chunk-px", "64", "--tile", "32", "--stride", "16"]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line_error(result) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


def evaluate_cli(tmp_path: Path, label: Image.Image, prediction: np.ndarray):
    labels = tmp_path / "labels"
    labels.mkdir(exist_ok=True)
    label.save(labels / "x.png")
    sub = write_submission(tmp_path / "sub.csv", [("x", encode_rle(prediction))])
    return CliRunner().invoke(cli, ["evaluate", str(sub), "--labels", str(labels)])


@pytest.mark.parametrize("case", list(ACCEPTED))
def test_accepted_labels_ingest_and_score_by_one_rule(tmp_path, case):
    image, rule, expected = ACCEPTED[case]
    root = tmp_path / "frags"
    path = fragment_with_labels(root, image)
    read = read_binary_image(path / "inklabels.png", "ink labels", all_set_ok=False)
    assert read.rule == rule
    np.testing.assert_array_equal(read.pixels, expected)

    out = tmp_path / "store.zarr"
    run_ingest(root, out)
    frag = open_fragment(open_store(out), "1")
    assert frag.meta.binarization == {"mask": ">127", "labels": rule}
    np.testing.assert_array_equal(frag.labels(), expected & (frag.mask() > 0))

    result = evaluate_cli(tmp_path, image, expected)  # the exact prediction scores 1
    assert result.exit_code == 0, result.output
    assert [line.split()[1] for line in result.output.splitlines() if line.startswith("x")] == [
        "1.0000"
    ]


@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_labels_are_one_line_errors_and_the_store_is_untouched(tmp_path, case):
    image, words = REFUSED[case]
    root = tmp_path / "frags"
    fragment_with_labels(root, ACCEPTED["0/255"][0], "1")
    out = tmp_path / "store.zarr"
    run_ingest(root, out)  # a good fragment already in the store
    before = snapshot(out)
    bad = fragment_with_labels(root, image, "2") / "inklabels.png"
    result = CliRunner().invoke(cli, ["ingest", str(root), "--out", str(out), *INGEST_CLI])
    line = one_line_error(result)
    assert str(bad) in line and words in line, line
    assert snapshot(out) == before
    assert not Path(f"{out}.lock").exists()

    line = one_line_error(evaluate_cli(tmp_path, image, INK))
    assert str(tmp_path / "labels" / "x.png") in line and words in line, line


def test_a_0_1_mask_is_papyrus_not_empty(tmp_path):
    root = tmp_path / "frags"
    path = fragment_with_labels(root, ACCEPTED["0/255"][0])
    mask = (np.asarray(Image.open(path / "mask.png")) > 0).astype(np.uint8)
    Image.fromarray(mask).save(path / "mask.png")  # 0/1 instead of 0/255
    out = tmp_path / "store.zarr"
    run_ingest(root, out)
    frag = open_fragment(open_store(out), "1")
    assert frag.meta.binarization == {"mask": "0/1", "labels": ">127"}
    np.testing.assert_array_equal(frag.mask(), mask)


def _make_legacy(out: Path, zero_labels: bool) -> None:
    """Turn a fragment into what inkpipe wrote before it recorded rules (0/1 read as empty)."""
    group = zarr.open_group(out / "1", mode="r+")
    attrs = dict(group.attrs[ATTR_KEY])
    del attrs["binarization"]
    group.attrs[ATTR_KEY] = attrs
    if zero_labels:
        labels = zarr.open_array(out / "1" / "labels", mode="r+")
        labels[...] = 0


def test_old_stores_read_and_only_misread_fragments_are_redone(tmp_path, capsys):
    root = tmp_path / "frags"
    path = fragment_with_labels(root, ACCEPTED["0/255"][0])
    out = tmp_path / "store.zarr"
    run_ingest(root, out)
    _make_legacy(out, zero_labels=False)
    assert open_fragment(open_store(out), "1").meta.binarization == {}  # old store: readable
    capsys.readouterr()
    (result,) = run_ingest(root, out)
    assert result.status == "skipped"  # 0/255 was read the same way before

    ACCEPTED["0/1"][0].save(path / "inklabels.png")
    run_ingest(root, out)
    _make_legacy(out, zero_labels=True)  # what the old > 127 made of 0/1 labels: no ink
    capsys.readouterr()
    (result,) = run_ingest(root, out)
    assert result.status == "ingested"
    assert "stored with image rules not recorded (all > 127)" in capsys.readouterr().out
    frag = open_fragment(open_store(out), "1")
    assert frag.meta.binarization == {"mask": ">127", "labels": "0/1"}
    np.testing.assert_array_equal(frag.labels(), INK & (frag.mask() > 0))


def test_evaluate_help_states_the_label_rule():
    text = " ".join(CliRunner().invoke(cli, ["evaluate", "--help"]).output.split())
    assert "0/1 (1 is ink), 8-bit grey (ink above 127) or 1-bit" in text
