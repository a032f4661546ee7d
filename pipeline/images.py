"""Read and write 2-D images (masks, labels, IR, pictures) with clear errors.

PNG I/O goes through Pillow. Writes are atomic (:mod:`~.files`): an interrupted
write never leaves a half-written picture.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from PIL import Image, UnidentifiedImageError

from .errors import InputNotFoundError, InvalidInputError
from .files import atomic_target

Image.MAX_IMAGE_PIXELS = None  # real fragments are ~141 Mpx, above Pillow's bomb guard


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


def read_binary(path: Path, what: str = "mask") -> NDArray[np.uint8]:
    """Read a mask/label image as 0/1: any pixel > 127 is 1.

    Returns:
        (H, W) uint8 array of 0 and 1.
    """
    return (read_gray(path, what) > 127).astype(np.uint8)


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


def write_png(path: Path, image: NDArray[np.uint8]) -> Path:
    """Write a (H, W) or (H, W, 3) uint8 image as PNG atomically; return ``path``."""
    path = Path(path)
    with atomic_target(path) as tmp:
        Image.fromarray(np.ascontiguousarray(image)).save(tmp, format="PNG")
    return path
