"""Reading 2-D images: the imagecodecs fast path gives Pillow's pixels, or steps aside."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from inkpipe.pipeline.errors import InvalidInputError
from inkpipe.pipeline.images import decode_png_8bit, read_binary_image, read_gray

RNG = np.random.default_rng(5)
GREY = RNG.integers(0, 256, (37, 23), dtype=np.uint8)


@pytest.mark.parametrize("mode", ["L", "1"])
def test_grey_and_1_bit_pngs_decode_to_pillows_pixels(tmp_path, mode):
    path = tmp_path / "x.png"
    image = Image.fromarray(GREY) if mode == "L" else Image.fromarray(GREY > 127)
    image.save(path)
    with Image.open(path) as im:
        got = decode_png_8bit(path, im)
        expect = np.asarray(im.convert("L"))  # a 1-bit image as 0/255
    assert got is not None and got.flags.writeable
    np.testing.assert_array_equal(got, expect)


@pytest.mark.parametrize(
    "name, image",
    [
        ("rgb.png", Image.fromarray(np.stack([GREY] * 3, axis=-1))),
        ("grey.tif", Image.fromarray(GREY)),
        ("palette.png", Image.fromarray(GREY).convert("P")),
    ],
)
def test_other_images_are_left_to_pillow(tmp_path, name, image):
    path = tmp_path / name
    image.save(path)
    with Image.open(path) as im:
        assert decode_png_8bit(path, im) is None


def test_a_png_cut_short_is_a_one_line_error_naming_it(tmp_path):
    path = tmp_path / "mask.png"
    Image.fromarray((GREY > 127).astype(np.uint8) * 255).save(path)
    path.write_bytes(path.read_bytes()[:-40])  # the last pixel rows and IEND gone
    with pytest.raises(InvalidInputError, match=r"cannot read mask .*mask\.png.*re-export"):
        read_binary_image(path, "mask")
    with pytest.raises(InvalidInputError, match=r"cannot read IR image .*mask\.png"):
        read_gray(path, "IR image")


def test_binarising_in_place_reuses_the_decoded_array(tmp_path):
    path = tmp_path / "labels.png"
    grey = (GREY > 127).astype(np.uint8) * 255
    grey[0, :5] = (90, 180, 1, 254, 128)  # a few anti-aliased pixels: the >127 rule
    Image.fromarray(grey).save(path)
    got = read_binary_image(path, "ink labels")
    assert got.rule == ">127" and got.pixels.base is not None  # a view of the decoded pixels
    np.testing.assert_array_equal(got.pixels, grey > 127)
