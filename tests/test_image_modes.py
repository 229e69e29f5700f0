"""Every image mode a shard can hold decodes to the 8-bit RGB a viewer shows (issue 18): a dark 16-bit image
stays dark, palettes and CMYK keep their colours, transparency lands on white."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from capdiff.data.decode import load_rgb
from capdiff.data.transforms import to_rgb_uint8

MAX_PIXELS = 1_000_000
SIZE = (16, 16)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def raw_png(pixel: tuple[int, ...], color_type: int, depth: int, trns: bytes = b"") -> bytes:
    """A uniform PNG written chunk by chunk, for the bit depths PIL cannot save (16-bit RGB, LA and RGBA)."""
    width, height = SIZE
    if depth == 16:
        row = np.tile(np.asarray(pixel, ">u2"), width).tobytes()
    else:
        row = np.packbits(np.tile(np.unpackbits(np.asarray(pixel, np.uint8))[-depth:], width)).tobytes()
    header = struct.pack(">IIBBBBB", width, height, depth, color_type, 0, 0, 0)
    return b"".join(
        (
            b"\x89PNG\r\n\x1a\n",
            _chunk(b"IHDR", header),
            _chunk(b"tRNS", trns) if trns else b"",
            _chunk(b"IDAT", zlib.compress((b"\x00" + row) * height)),
            _chunk(b"IEND", b""),
        )
    )


def saved(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def uniform(mode: str, value, fmt: str = "PNG", **options) -> bytes:
    return saved(Image.new(mode, SIZE, value), fmt, **options)


def grey16(value: int, **options) -> bytes:
    return saved(Image.fromarray(np.full(SIZE[::-1], value, np.uint16)), "PNG", **options)


def palette(rgba: tuple[int, int, int, int]) -> bytes:
    """A one-colour palette PNG; an alpha below 255 is stored as the palette's tRNS alpha."""
    return saved(Image.new("RGBA", SIZE, rgba).quantize(), "PNG")


# (bytes, the mode PIL 12 opens them in, the RGB a viewer shows). Measured with Pillow 12.3; a row that fails
# after a Pillow upgrade names the mode PIL now gives.
CASES = {
    "16-bit grey 4096 (dark)": (grey16(4096), "I;16", (16, 16, 16)),
    "16-bit grey 65535": (grey16(65535), "I;16", (255, 255, 255)),
    "16-bit grey 0": (grey16(0), "I;16", (0, 0, 0)),
    "16-bit grey, another level transparent": (grey16(4096, transparency=9), "I;16", (16, 16, 16)),
    "16-bit grey, this level transparent": (grey16(4096, transparency=4096), "I;16", (255, 255, 255)),
    "16-bit RGB": (raw_png((4096, 32768, 65535), 2, 16), "RGB", (16, 128, 255)),
    "16-bit grey+alpha, opaque": (raw_png((4096, 65535), 4, 16), "RGBA", (16, 16, 16)),
    "16-bit grey+alpha, transparent": (raw_png((4096, 0), 4, 16), "RGBA", (255, 255, 255)),
    "16-bit RGBA, half transparent": (raw_png((0, 32768, 65535, 32768), 6, 16), "RGBA", (127, 191, 255)),
    "2-bit grey": (raw_png((1,), 0, 2), "L", (85, 85, 85)),
    "1-bit black": (uniform("1", 0), "1", (0, 0, 0)),
    "1-bit white": (uniform("1", 1), "1", (255, 255, 255)),
    "8-bit grey": (uniform("L", 100), "L", (100, 100, 100)),
    "8-bit grey, this level transparent": (uniform("L", 100, transparency=100), "L", (255, 255, 255)),
    "RGB, this colour transparent": (uniform("RGB", (10, 200, 30), transparency=(10, 200, 30)), "RGB", (255, 255, 255)),
    "grey+alpha": (uniform("LA", (100, 128)), "LA", (177, 177, 177)),
    "RGBA on white": (uniform("RGBA", (255, 0, 0, 128)), "RGBA", (255, 127, 127)),
    "palette": (palette((10, 200, 30, 255)), "P", (10, 200, 30)),
    "palette, transparent entry": (palette((10, 200, 30, 0)), "P", (255, 255, 255)),
    "palette, half-transparent entry": (palette((255, 0, 0, 128)), "P", (255, 127, 127)),
    "JPEG grey": (uniform("L", 100, "JPEG", quality=95), "L", (100, 100, 100)),
    "JPEG RGB": (uniform("RGB", (10, 200, 30), "JPEG", quality=95), "RGB", (10, 200, 30)),
    "JPEG CMYK red": (uniform("CMYK", (0, 255, 255, 0), "JPEG", quality=95), "CMYK", (255, 0, 0)),
    "JPEG CMYK with black": (uniform("CMYK", (128, 0, 0, 128), "JPEG", quality=95), "CMYK", (63, 127, 127)),
    "WebP grey (stored as RGB)": (uniform("L", 100, "WEBP", lossless=True), "RGB", (100, 100, 100)),
    "WebP RGBA on white": (uniform("RGBA", (255, 0, 0, 128), "WEBP", lossless=True), "RGBA", (255, 127, 127)),
}


@pytest.mark.parametrize(("data", "opened_as", "expected"), CASES.values(), ids=CASES.keys())
def test_each_image_mode_decodes_to_the_rgb_a_viewer_shows(data: bytes, opened_as: str, expected) -> None:
    assert Image.open(io.BytesIO(data)).mode == opened_as
    image = load_rgb(data, MAX_PIXELS)
    assert image.mode == "RGB" and image.size == SIZE
    pixels = np.asarray(image, dtype=np.int16)
    assert np.abs(pixels - np.asarray(expected)).max() <= 1, f"got {pixels[8, 8]}, expected {expected}"


def test_cmyk_jpegs_are_read_with_the_adobe_inverted_convention() -> None:
    # PIL writes, and always reads, CMYK JPEG as Photoshop does: inverted ink values and an Adobe APP14 marker.
    data = uniform("CMYK", (0, 0, 0, 0), "JPEG")
    assert b"\xff\xee\x00\x0eAdobe" in data
    assert Image.open(io.BytesIO(data)).info["adobe"]
    assert np.asarray(load_rgb(data, MAX_PIXELS)).min() >= 254  # no ink is white paper


@pytest.mark.parametrize(
    ("mode", "raw", "expected"),
    [
        ("I;16", np.full(4, 4096, "<u2"), 16),
        ("I;16L", np.full(4, 4096, "<u2"), 16),
        ("I;16B", np.full(4, 4096, ">u2"), 16),
        ("I;16N", np.full(4, 4096, "=u2"), 16),
        ("I", np.full(4, 4096, "=i4"), 16),
        ("I", np.full(4, -5, "=i4"), 0),
        ("I", np.full(4, 1 << 20, "=i4"), 255),
        ("F", np.full(4, 0.5, "=f4"), 128),
        ("F", np.full(4, 2.0, "=f4"), 255),
        ("F", np.full(4, np.nan, "=f4"), 0),
    ],
)
def test_wide_greyscale_is_scaled_by_its_bit_depth_not_its_own_range(mode: str, raw: np.ndarray, expected: int) -> None:
    # No jpg, png or webp opens in these modes with Pillow 12 (16-bit PNG is "I;16"), but a big-endian TIFF
    # ("I;16B"), a 16-bit PGM ("I") or a float TIFF ("F") in a member named .png does.
    image = Image.frombytes(mode, (2, 2), raw.tobytes())
    assert np.all(np.asarray(to_rgb_uint8(image)) == expected)
