"""What an image of the data becomes before any model sees it: one place for training, evaluation and the VT cache.

Every image is decoded to 8-bit RGB, or RGBA when it has transparency (an alpha mode, or a `transparency` entry):
what becomes of transparent pixels is the model's processor's rule, applied as in its pretraining (transformers'
Qwen-VL processors drop the alpha, BAGEL's composites on white). Modes PIL converts faithfully (`1`, `L`, `P`, `RGB`,
`RGBX`, `CMYK`, `YCbCr`) go through `Image.convert("RGB")`. Modes that `convert` would clip are scaled to 8 bits first: the 16-bit grayscale modes
(`I;16`, `I;16L`, `I;16B`, `I;16N`) by their bit depth (value * 255 / 65535), the 32-bit modes `I` and `F` (no fixed
depth) by their own range (minimum -> 0, maximum -> 255). Any other mode, an empty image and an image whose sides
differ by more than `MAX_ASPECT_RATIO` are refused with a `BadImageError` naming the sample, the column and why.
"""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image

# transformers' Qwen-VL image processors refuse a longer side over 200x the shorter one (smart_resize); such an
# image carries nothing readable, so it is refused for every family, before any model call.
MAX_ASPECT_RATIO = 200
PLAIN_MODES = ("1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr", "RGBA", "RGBa", "LA", "La", "PA")
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
RANGE_MODES = ("I", "F")
SUPPORTED_MODES = PLAIN_MODES + SIXTEEN_BIT_MODES + RANGE_MODES


class BadImageError(ValueError):
    """An image of the data cannot be decoded or converted faithfully (the message names the sample id and column)."""


def _where(sample_id, column: str) -> str:
    return f"sample {sample_id!r}, column {column!r}"


def open_image(value, sample_id, column: str) -> Image.Image:
    """A PIL image, a ``{"bytes"|"path"}`` dict (datasets' undecoded Image), bytes or a path -> an opened image with
    only its header read (size and mode known, pixels not decoded)."""
    if value is None:
        raise BadImageError(f"{_where(sample_id, column)}: an entry is None, not an image; remove it from the "
                            "sample's list (or give the image).")
    try:
        if isinstance(value, dict):
            value = value.get("bytes") or value.get("path")
        if isinstance(value, bytes | bytearray):
            value = Image.open(io.BytesIO(value))
        elif isinstance(value, str | os.PathLike):
            value = Image.open(value)
        if not isinstance(value, Image.Image):
            raise TypeError(f"expected an image, got {type(value).__name__}")
        return value
    except Exception as e:
        raise BadImageError(f"{_where(sample_id, column)}: unreadable image ({e})") from e


def check_image(image: Image.Image, sample_id, column: str) -> None:
    """Refuse, from the header alone, an image no model can use: an unsupported mode, no pixels, or an aspect ratio
    over `MAX_ASPECT_RATIO`."""
    where = _where(sample_id, column)
    if image.mode not in SUPPORTED_MODES:
        raise BadImageError(f"{where}: image mode {image.mode!r} has no faithful conversion to RGB (supported: "
                            f"{', '.join(SUPPORTED_MODES)}); convert the image to RGB in the dataset.")
    width, height = image.size
    if min(width, height) < 1:
        raise BadImageError(f"{where}: image of size {width}x{height} has no pixels; remove it from the dataset.")
    if max(width, height) / min(width, height) > MAX_ASPECT_RATIO:
        raise BadImageError(
            f"{where}: image of size {width}x{height} has an aspect ratio over {MAX_ASPECT_RATIO}, which the image "
            "processors refuse; crop or pad it, or drop the sample (`opsd-trl build-vt-cache --skip-bad` skips it)."
        )


ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB, or RGBA for an image with transparency (see the module docstring for the rule per mode)."""
    if image.mode in ALPHA_MODES or (image.mode in PLAIN_MODES and "transparency" in image.info):
        return image.convert("RGBA")
    if image.mode in SIXTEEN_BIT_MODES:
        scaled = np.asarray(image).astype(np.float64) * (255 / 65535)
    elif image.mode in RANGE_MODES:
        values = np.asarray(image).astype(np.float64)
        if not np.isfinite(values).all():
            raise ValueError("non-finite pixel values")
        lo, hi = values.min(), values.max()
        scaled = (values - lo) * (255 / (hi - lo)) if hi > lo else np.clip(values, 0, 255)
    else:
        return image.convert("RGB")
    return Image.fromarray(np.rint(scaled).astype(np.uint8)).convert("RGB")


def decode_image(value, sample_id, column: str) -> Image.Image:
    """`open_image` + `check_image`, then decoded now (a truncated file fails here, naming the sample, not inside
    the encoder) and converted by `to_rgb`."""
    image = open_image(value, sample_id, column)
    check_image(image, sample_id, column)
    try:
        image.load()
        return to_rgb(image)
    except Exception as e:
        raise BadImageError(f"{_where(sample_id, column)}: unreadable image ({e})") from e
