"""Any PIL image mode -> 8-bit RGB, and EXIF orientation, as the original's decoder does.

The original VirTex decodes with ``cv2.imread(path)`` (8-bit, 3 channels, EXIF orientation
applied). :func:`to_rgb` follows the same rules for every mode PIL opens:

* ``RGB``, ``L`` (grey replicated), ``1`` (0/255), ``P`` (palette colours), ``YCbCr``,
  ``LAB``, ``HSV``: PIL's own conversion.
* Alpha (``RGBA``, ``LA``, ``PA``, ``RGBa``, ``P`` with a tRNS transparency): **dropped**,
  the colour under it is kept, as ``cv2.imread`` without ``IMREAD_UNCHANGED`` does; no
  compositing onto a background (a fully transparent pixel keeps its stored colour).
* ``CMYK``: ``R = round((255 - C) * (255 - K) / 255)`` and likewise G from M, B from Y.
  JPEG: PIL reads every CMYK JPEG as Adobe-inverted (Photoshop's convention, by far the
  most common); a CMYK JPEG *without* an Adobe APP14 marker stores plain ink amounts, so
  PIL's inversion is undone for it.
* 16-bit (``I;16``, ``I;16B``, ``I;16L``, ``I;16N``) and ``I`` (taken as 16-bit, clipped to
  0..65535): the high byte, ``v >> 8``, as libpng's 16 -> 8 strip in ``cv2.imread``; PIL's
  ``convert`` would clip everything above 255 to white.
* ``F`` (32-bit float): on the 0..255 scale, rounded to nearest and clipped, as cv2's
  8-bit conversion does.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

_ORIENTATION = 0x0112  # EXIF tag
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
UPRIGHT = "virtex_upright"  # info key of an image already turned by :func:`apply_orientation`
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def orientation(img: Image.Image) -> int:
    """The EXIF orientation (1..8) of ``img``; 1 when absent, not a valid value, or when
    ``img`` was already turned upright by :func:`apply_orientation` (its EXIF block is kept)."""
    if img.info.get(UPRIGHT):
        return 1
    try:
        value = img.getexif().get(_ORIENTATION, 1)
    except Exception:  # a damaged EXIF block: PIL decodes the pixels regardless
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def oriented_size(img: Image.Image) -> tuple[int, int]:
    """``(width, height)`` of ``img`` once its EXIF orientation is applied (header only)."""
    w, h = img.size
    return (h, w) if orientation(img) >= 5 else (w, h)


def apply_orientation(img: Image.Image, value: int) -> Image.Image:
    """``img`` turned upright for EXIF orientation ``value`` (1: unchanged), marked as upright
    so that a later decode does not turn it again."""
    if value in _TRANSPOSE:
        img = img.transpose(_TRANSPOSE[value])
    img.info[UPRIGHT] = True
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """``img`` (any mode) as an 8-bit RGB image, by the rules of the module docstring."""
    mode = img.mode
    if mode == "RGB":
        img.load()
        return img
    if mode in _SIXTEEN_BIT:
        values = np.asarray(img).astype(np.int64)
        gray = (np.clip(values, 0, 65535) >> 8).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    if mode == "F":
        gray = np.clip(np.rint(np.asarray(img, dtype=np.float64)), 0, 255).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    if mode == "P" and "transparency" in img.info:
        return img.convert("RGBA").convert("RGB")  # PIL's advice for palette + tRNS
    if mode in ("RGBA", "LA"):
        return img.convert("RGB")  # PIL drops the alpha band
    if mode in ("PA", "RGBa"):
        return img.convert("RGBA").convert("RGB")
    if mode == "CMYK":
        cmyk = np.asarray(img).astype(np.uint32)
        if img.format == "JPEG" and "adobe" not in img.info:
            cmyk = 255 - cmyk  # plain CMYK that PIL took for Adobe-inverted
        keep = 255 - cmyk[..., 3:]
        rgb = ((255 - cmyk[..., :3]) * keep * 2 + 255) // 510  # round(x / 255), ties up
        return Image.fromarray(rgb.astype(np.uint8), "RGB")
    return img.convert("RGB")
