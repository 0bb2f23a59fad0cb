"""Input images -> 8-bit RGB, whatever the file holds: EXIF orientation applied, 16-bit and float modes
converted by their value range (PIL's own convert("RGB") clips them: a 16-bit PNG would come out white,
a float TIFF black), anything unreadable refused with the file's name."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

INTEGER_RANGES = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535}


def open_image(path: str | Path) -> Image.Image:
    """Read an image file fully, as 8-bit RGB the right way up; one clear error for a missing or corrupt file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image {path} does not exist (or is not a file)")
    try:
        with Image.open(path) as image:
            image.load()
            return to_rgb(image)
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise ValueError(f"image {path} cannot be read ({e}); check the file or save it again as PNG or JPEG") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image -> 8-bit RGB: EXIF orientation applied; 16-bit and 32-bit integer images scaled from
    their bit depth, float images from [0, 1] (or [-1, 1], or [0, 255]); other ranges refused."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGB", "L", "P", "RGBA", "LA", "PA", "CMYK", "YCbCr", "LAB", "HSV", "1", "RGBX", "La"):
        return image.convert("RGB")
    values = np.asarray(image).astype(np.float64)
    if values.size and not np.isfinite(values).all():
        raise ValueError(f"the {image.mode} image holds NaN or Inf pixels: it cannot be converted to colours")
    lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if image.mode in INTEGER_RANGES or (image.mode == "I" and 0 <= lo and hi <= 65535):
        scale = 255 if image.mode == "I" and hi <= 255 else 65535  # "I" holds 16-bit PNGs on some PIL versions
        unit = values / scale
    elif image.mode == "F" and 0 <= lo and hi <= 1:
        unit = values
    elif image.mode == "F" and -1 <= lo and hi <= 1:
        unit = (values + 1) / 2
    elif image.mode == "F" and 0 <= lo and hi <= 255:
        unit = values / 255
    else:
        raise ValueError(
            f"cannot convert a {image.mode} image with values in [{lo:g}, {hi:g}] to colours: expected 16-bit "
            "integers, or floats in [0, 1], [-1, 1] or [0, 255]; convert it to 8-bit RGB first"
        )
    gray = Image.fromarray(np.round(unit * 255).astype(np.uint8))
    return gray.convert("RGB")
