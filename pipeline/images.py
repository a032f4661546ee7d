"""Read and write 2-D images (masks, labels, IR, pictures) with clear errors.

PNG writing goes through Pillow; Pillow also reads every image's header and any image but
8-bit grey and 1-bit PNGs, which imagecodecs decodes straight into the one array it returns
(:func:`decode_png_8bit`). Writes are atomic (:mod:`~.files`): an interrupted write never
leaves a half-written picture.

Binary images (papyrus masks, ink labels) are read by one rule chosen per image from its
pixel values (:func:`read_binary_image`), the same in ingest and evaluate:

- ``0/1``: only the values 0 and 1 (an 8-bit 0/1 export): 1 is set;
- ``>127``: 8-bit grey with other values, 0/255 or anti-aliased 0-255 (the real Scroll 1 ink
  labels have 0.2-2.3 % of their pixels strictly between 0 and 255): above 127 is set;
- ``1-bit``: a 1-bit image: set bits are set.

Images that fit none are refused: 16- or 32-bit and float images, colour images whose
channels differ, transparency, grey images with values above 1 but none above 127, images
of one grey value other than 0, 1 or 255, and images more than half of whose pixels are
neither 0 nor 255 (a photograph, not a label). An image with no pixel set is valid (a label
without ink); a label image with every pixel set is refused (``all_set_ok=False``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import imagecodecs
import numpy as np
from numpy.typing import NDArray
from PIL import Image, UnidentifiedImageError

from .errors import InputNotFoundError, InvalidInputError
from .files import atomic_target

Image.MAX_IMAGE_PIXELS = None  # real fragments are ~141 Mpx, above Pillow's bomb guard

BinaryRule = Literal["0/1", ">127", "1-bit"]
BINARY_RULES: dict[str, str] = {
    "0/1": "values 0 and 1 only: 1 is set",
    ">127": "8-bit grey (0/255 or anti-aliased 0-255): above 127 is set",
    "1-bit": "a 1-bit image: set bits are set",
}
MAX_GREY_FRACTION = 0.5  # above this share of pixels strictly between 0 and 255: a photo
_BINARY_FIX = "save it as an 8-bit grey PNG with 0 (background) and 255 (set)"


def decode_png_8bit(path: Path, im: Image.Image) -> NDArray[np.uint8] | None:
    """Decode an 8-bit grey or 1-bit PNG straight into one array; None for any other image.

    Pillow decodes into an image of its own and hands NumPy a copy of it: two copies of the
    pixels held at once, three with a binarised one. imagecodecs decodes into the array it
    returns. For a mask of real fragment 2's size (14830 x 9506 px) the peak falls from 405 MB
    to 136 MB above the process, and decoding takes ~0.3 s instead of ~1.5 s. A 1-bit PNG
    comes back as 0/255.

    Args:
        path: the image file.
        im: the file opened by Pillow (its header read, pixels not decoded).

    Returns:
        (H, W) uint8 writeable array, or None if the image is not such a PNG or imagecodecs
        cannot decode it (Pillow then reads it, and reports what is wrong with it).
    """
    if im.format != "PNG" or im.mode not in ("L", "1"):
        return None
    try:
        pixels = imagecodecs.png_decode(Path(path).read_bytes())
    except Exception:  # noqa: BLE001 - any failure: Pillow reads it and names the problem
        return None
    ok = pixels.dtype == np.uint8 and pixels.shape == (im.height, im.width)
    return pixels if ok and pixels.flags.writeable else None


def read_gray(path: Path, what: str = "image") -> NDArray[np.uint8]:
    """Read an image file as one 8-bit gray channel.

    Colour or alpha images are converted to luminance; 16-bit images are scaled to 8 bit.

    Args:
        path: the image file (PNG, TIFF, JPEG…).
        what: what the image is, for the error message (``"mask"``, ``"ink labels"``).

    Returns:
        (H, W) uint8 array.

    Raises:
        InputNotFoundError: the file does not exist.
        InvalidInputError: the file is not a readable image (truncated, wrong format).
    """
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"{what} not found: {path}")
    try:
        with Image.open(path) as im:
            if im.mode == "L" and (pixels := decode_png_8bit(path, im)) is not None:
                return pixels
            im.load()
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(im, dtype=np.int64)
                top = max(int(arr.max()), 1)
                return (arr * 255 // (65535 if top > 255 else 255)).clip(0, 255).astype(np.uint8)
            gray = im if im.mode == "L" else im.convert("L")
            return np.asarray(gray, dtype=np.uint8).copy()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise InvalidInputError(
            f"cannot read {what} {path}: {exc}; re-export it as an 8-bit PNG"
        ) from None


@dataclass(frozen=True)
class BinaryImage:
    """A mask or label image read as 0/1, and the rule (:data:`BINARY_RULES`) that read it.

    Attributes:
        pixels: (H, W) uint8 array of 0 and 1.
        rule: ``"0/1"``, ``">127"`` or ``"1-bit"``.
    """

    pixels: NDArray[np.uint8]
    rule: BinaryRule


def _grey_channel(im: Image.Image, path: Path, what: str) -> NDArray[np.uint8]:
    """Return the one grey channel of an 8-bit image, refusing colour and transparency."""
    if im.mode.startswith("I;16") or im.mode in ("I", "F"):
        kind = "16-bit" if im.mode.startswith("I;16") else f"32-bit ({im.mode})"
        raise InvalidInputError(
            f"{what} {path} is a {kind} image, expected 8-bit grey or 1-bit; {_BINARY_FIX}"
        )
    if im.mode == "L":  # the common case: no split, which would copy the image once more
        return np.asarray(im, dtype=np.uint8)
    if im.mode == "P":
        im = im.convert("RGBA")
    if im.mode not in ("L", "LA", "RGB", "RGBA"):
        raise InvalidInputError(
            f"{what} {path} is a {im.mode} image, expected 8-bit grey or 1-bit; {_BINARY_FIX}"
        )
    bands = [np.asarray(band, dtype=np.uint8) for band in im.split()]
    if im.mode in ("LA", "RGBA"):
        alpha = bands.pop()
        if (alpha != 255).any():
            raise InvalidInputError(
                f"{what} {path} has transparent pixels ({im.mode}), expected an opaque image; "
                f"{_BINARY_FIX}"
            )
    grey = bands[0]
    for band in bands[1:]:
        differ = int(np.count_nonzero(band != grey))
        if differ:
            raise InvalidInputError(
                f"{what} {path} is a colour ({im.mode}) image whose channels differ at "
                f"{differ} pixel{'s' if differ != 1 else ''}, expected grey; {_BINARY_FIX}"
            )
    return grey


def binarize_grey(
    grey: NDArray[np.uint8], where: str, *, all_set_ok: bool = True, in_place: bool = False
) -> BinaryImage:
    """Choose the rule for an 8-bit grey image from its values and apply it.

    Args:
        grey: (H, W) uint8 pixel values.
        where: ``"<what> <path>"`` for the error messages.
        all_set_ok: whether an image with every pixel set is valid (a mask of all papyrus)
            or refused (ink labels: ink everywhere means an inverted or wrong file).
        in_place: write the 0/1 pixels into ``grey`` (writeable, no longer needed) instead
            of a new array: one copy of the image less.

    Returns:
        A :class:`BinaryImage` by the ``0/1`` or ``>127`` rule.

    Raises:
        InvalidInputError: the values fit no rule (see the module docstring).
    """
    low, top, zeros, full = _grey_summary(grey)
    if top <= 1:
        image = BinaryImage(grey if in_place else grey.astype(np.uint8, copy=True), "0/1")
    else:
        if top <= 127:
            raise InvalidInputError(
                f"{where} has grey values 0..{top}, none above 127, so it fits no rule "
                "(expected 0/1 with 1 set, 0/255, or grey 0-255 with set pixels above 127); "
                f"{_BINARY_FIX}"
            )
        if low == top and top != 255:
            raise InvalidInputError(
                f"{where} has the one value {top} everywhere, expected 0/1, 0/255 or "
                f"anti-aliased grey; {_BINARY_FIX}"
            )
        grey_share = (grey.size - zeros - full) / max(grey.size, 1)
        if grey_share > MAX_GREY_FRACTION:
            raise InvalidInputError(
                f"{where} looks like a photograph: {grey_share:.0%} of its pixels are neither "
                f"0 nor 255, expected a black-and-white image (at most {MAX_GREY_FRACTION:.0%} "
                "anti-aliased); pass the mask or label image"
            )
        above = np.greater(grey, 127, out=grey.view(np.bool_) if in_place else None)
        image = BinaryImage(above.view(np.uint8), ">127")  # 0/1, no copy
    return _check_all_set(image, where, all_set_ok)


def _grey_summary(grey: NDArray[np.uint8]) -> tuple[int, int, int, int]:
    """Return the (min, max, count of 0, count of 255) of a uint8 image, a slice at a time.

    What :func:`binarize_grey` needs to choose a rule, without a histogram (``np.bincount``
    widens every pixel to int64 first: ~4x slower) or image-sized temporaries.
    """
    flat = grey.reshape(-1)
    low, top, zeros, full = 255, 0, 0, 0
    step = 1 << 22
    for i in range(0, flat.size, step):
        part = flat[i : i + step]
        low, top = min(low, int(part.min())), max(top, int(part.max()))
        zeros += int(np.count_nonzero(part == 0))
        full += int(np.count_nonzero(part == 255))
    return low, top, zeros, full


def _check_all_set(image: BinaryImage, where: str, all_set_ok: bool) -> BinaryImage:
    if not all_set_ok and image.pixels.size and image.pixels.all():
        raise InvalidInputError(
            f"{where} is set everywhere (rule {image.rule}: {BINARY_RULES[image.rule]}), "
            "expected ink on part of the image; if it is inverted (black = ink), invert it"
        )
    return image


def read_binary_image(path: Path, what: str = "mask", *, all_set_ok: bool = True) -> BinaryImage:
    """Read a mask or label image as 0/1 by the rule its pixel values call for.

    See the module docstring for the rules and for what is refused.

    Args:
        path: the image file (PNG, TIFF…).
        what: what the image is, for the error message (``"mask"``, ``"ink labels"``).
        all_set_ok: whether an image with every pixel set is valid (see
            :func:`binarize_grey`).

    Returns:
        A :class:`BinaryImage`: (H, W) uint8 0/1 pixels and the rule used.

    Raises:
        InputNotFoundError: the file does not exist.
        InvalidInputError: the file is not a readable image, or fits no rule.
    """
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"{what} not found: {path}")
    try:
        with Image.open(path) as im:
            decoded = decode_png_8bit(path, im)  # None: Pillow decodes it
            if decoded is None:
                im.load()
            if im.mode == "1":
                if decoded is None:
                    bits = np.asarray(im, dtype=np.uint8)
                else:  # imagecodecs gives 0/255: made 0/1 in place
                    bits = np.greater(decoded, 127, out=decoded.view(np.bool_)).view(np.uint8)
                return _check_all_set(BinaryImage(bits, "1-bit"), f"{what} {path}", all_set_ok)
            grey = decoded if decoded is not None else _grey_channel(im, path, what)
    except InvalidInputError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise InvalidInputError(
            f"cannot read {what} {path}: {exc}; re-export it as an 8-bit PNG"
        ) from None
    return binarize_grey(
        grey, f"{what} {path}", all_set_ok=all_set_ok, in_place=decoded is not None
    )


def read_binary(path: Path, what: str = "mask", *, all_set_ok: bool = True) -> NDArray[np.uint8]:
    """Read a mask or label image as (H, W) uint8 0/1 (see :func:`read_binary_image`)."""
    return read_binary_image(path, what, all_set_ok=all_set_ok).pixels


def image_shape(path: Path, what: str = "image") -> tuple[int, int]:
    """Return the (H, W) of an image without decoding its pixels."""
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"{what} not found: {path}")
    try:
        with Image.open(path) as im:
            return (im.height, im.width)
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise InvalidInputError(
            f"cannot read {what} {path}: {exc}; re-export it as an 8-bit PNG"
        ) from None


def write_png(path: Path, image: NDArray[np.uint8], compress_level: int = 6) -> Path:
    """Write a (H, W) or (H, W, 3) uint8 image as PNG atomically; return ``path``.

    ``compress_level`` is zlib's, 0-9 (PIL's default 6; 1 wrote a 2048 x 2048 probability
    map about 4 times faster than 6, 20 % larger).
    """
    path = Path(path)
    with atomic_target(path) as tmp:
        Image.fromarray(np.ascontiguousarray(image)).save(
            tmp, format="PNG", compress_level=compress_level
        )
    return path
