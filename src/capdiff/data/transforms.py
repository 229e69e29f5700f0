"""Image transforms with PIL, numpy and torch only. torchvision is not a dependency: the registry's builds do
not match the CPU torch build, and once installed they break the torchmetrics, Lightning and diffusers imports."""

from __future__ import annotations

import random

import numpy as np
import torch
from PIL import Image

_WHITE = (255, 255, 255)

# The value that stands for white in each mode whose `convert("L")` clips rather than scales (PIL turns a
# 16-bit 4096, a dark grey, into 255). "I" is what PIL 12 gives 16-bit PGM (any maxval, rescaled to 65535)
# and older Pillow gave 16-bit PNG; "F" is float TIFF, whose image tools write [0, 1].
_FULL_SCALE = {"I;16": 65535, "I;16B": 65535, "I;16L": 65535, "I;16N": 65535, "I": 65535, "F": 1.0}
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def to_rgb_uint8(image: Image.Image) -> Image.Image:
    """Any PIL mode → 8-bit RGB; transparency (alpha, or a PNG's transparent colour) is composited on white.

    High-bit-depth greyscale is scaled by its bit depth, never by its own range, so a dark 16-bit image stays
    dark. PIL itself reduces 16-bit RGB and RGBA PNGs to 8 bits when it opens them, and decodes CMYK JPEGs
    with the Adobe (inverted) convention that Photoshop writes.
    """
    if image.mode in _FULL_SCALE:
        image = _wide_grey_to_8bit(image)
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*_WHITE, 255))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    if image.mode != "RGB":
        return image.convert("RGB")
    return image


def _wide_grey_to_8bit(image: Image.Image) -> Image.Image:
    """16/32-bit integer or float greyscale → "L", or "LA" when a 16-bit PNG names a transparent grey level."""
    values = np.asarray(image)
    full = _FULL_SCALE[image.mode]
    unit = np.nan_to_num(values.astype(np.float64) / full, nan=0.0, posinf=1.0, neginf=0.0)
    grey = Image.fromarray(np.rint(np.clip(unit, 0.0, 1.0) * 255).astype(np.uint8))
    key = image.info.get("transparency")
    if not isinstance(key, int):
        return grey
    # The key is a 16-bit level: matched before scaling, which maps up to 257 levels onto each 8-bit one.
    alpha = Image.fromarray(np.where(values == key, 0, 255).astype(np.uint8))
    return Image.merge("LA", (grey, alpha))


def resize_crop(image: Image.Image, size: int, random_crop: bool = False, rng: random.Random | None = None):
    """Resize the shorter side to `size` (antialiased) and crop a `size`×`size` square.

    The square is cut in source coordinates and resized in one call (`box=`), which resamples only the
    pixels that are kept.
    """
    width, height = image.size
    side = min(width, height)
    if random_crop:
        rng = rng or random
        left = rng.randint(0, width - side)
        top = rng.randint(0, height - side)
    else:
        left = (width - side) // 2
        top = (height - side) // 2
    box = (left, top, left + side, top + side)
    return image.resize((size, size), Image.Resampling.BICUBIC, box=box, reducing_gap=None)


def to_uint8_chw(image: Image.Image) -> torch.Tensor:
    return to_uint8_hwc(image).permute(2, 0, 1)


def to_uint8_hwc(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())


def uint8_to_unit(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 `[0, 255]` → float `[-1, 1]`, contiguous whatever the input's strides."""
    return pixels.to(torch.float32, memory_format=torch.contiguous_format).div_(127.5).sub_(1.0)


def as_unit(pixels: torch.Tensor) -> torch.Tensor:
    """Batches travel as uint8 (a quarter of the bytes between processes and to the GPU) and become float
    `[-1, 1]` where they are used; float pixels pass through unchanged."""
    return uint8_to_unit(pixels) if pixels.dtype == torch.uint8 else pixels


def unit_to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """float `[-1, 1]` → uint8, clamped and rounded (never wrapped)."""
    return ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
