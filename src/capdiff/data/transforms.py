"""Image transforms with PIL, numpy and torch only. torchvision is not a dependency: the registry's builds do
not match the CPU torch build, and once installed they break the torchmetrics, Lightning and diffusers imports."""

from __future__ import annotations

import random

import numpy as np
import torch
from PIL import Image

_WHITE = (255, 255, 255)


def to_rgb_uint8(image: Image.Image) -> Image.Image:
    """Any PIL mode → 8-bit RGB; transparency is composited on white."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16/32-bit greyscale: PIL's convert("L") clips instead of scaling, so scale by the data's range.
        array = np.asarray(image, dtype=np.float64)
        top = array.max() if array.size else 1.0
        array = np.clip(array / (top if top > 0 else 1.0) * 255.0, 0, 255).astype(np.uint8)
        image = Image.fromarray(array, mode="L")
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info)
    if has_alpha:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*_WHITE, 255))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    if image.mode != "RGB":
        return image.convert("RGB")
    return image


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
