"""Safe decoding of one WebDataset sample: the image member and the caption, nothing else.

Only the members named by `IMAGE_EXTENSIONS` and the caption key are ever read from a shard, and they are
decoded with PIL and `json`/UTF-8 only: a shard member such as `.pyd`, `.pickle` or `.pth` is never opened,
so a payload hidden in one cannot run. Every way a sample can be bad raises `BadSample` with a short reason
that the stream counts (`capdiff.data.skips`).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from capdiff.data.transforms import to_rgb_uint8

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


class BadSample(Exception):
    """A sample that cannot be used; `reason` is the counter it is filed under."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class CaptionKey:
    """Where a sample's caption lives: a whole member (`txt`) or a field of the `json` member (`json.caption`).

    A field may hold one string or a list of strings (several captions of one image).
    """

    member: str
    field: str | None = None

    @classmethod
    def parse(cls, spec: str, key: str = "data.caption_key") -> CaptionKey:
        """`key`: the config key it came from, for the errors."""
        spec = str(spec).strip().lower()
        member, _, fld = spec.partition(".")
        if not member or (fld == "" and spec.endswith(".")):
            raise ValueError(
                f"{key}={spec!r} is not a caption key: use a member extension such as 'txt', "
                "or a field of the json member such as 'json.caption'."
            )
        if fld and member != "json":
            raise ValueError(
                f"{key}={spec!r}: only the json member has fields; use 'json.{fld}' or a "
                "plain member extension such as 'txt'."
            )
        if member in IMAGE_EXTENSIONS:
            raise ValueError(f"{key}={spec!r} names an image member; use 'txt' or 'json.<field>'.")
        return cls(member=member, field=fld or None)

    @property
    def spec(self) -> str:
        return f"{self.member}.{self.field}" if self.field else self.member

    def present_in(self, sample: dict) -> bool:
        """Whether the sample has this key at all (used for the start-up check, not for decoding)."""
        if self.member not in sample:
            return False
        if self.field is None:
            return True
        try:
            return self.field in json.loads(sample[self.member])
        except (ValueError, TypeError):
            return False


def normalize_caption(text: str) -> str:
    return " ".join(text.split())


def decode_captions(sample: dict, key: CaptionKey) -> list[str]:
    """All non-empty, whitespace-normalized captions of a sample, in their stored order."""
    raw = sample.get(key.member)
    if raw is None:
        raise BadSample("missing_caption", f"no .{key.member} member")
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
    except UnicodeDecodeError as err:
        raise BadSample("bad_caption", f".{key.member} is not UTF-8 ({err.reason})") from err
    if key.field is None:
        values: object = text
    else:
        try:
            values = json.loads(text)
        except ValueError as err:
            raise BadSample("bad_caption", f".json does not parse ({err})") from err
        if not isinstance(values, dict) or key.field not in values:
            raise BadSample("missing_caption", f".json has no field {key.field!r}")
        values = values[key.field]
    items = values if isinstance(values, list) else [values]
    captions = [normalize_caption(v) for v in items if isinstance(v, str)]
    captions = [c for c in captions if c]
    if not captions:
        raise BadSample("empty_caption", f"{key.spec} is empty")
    return captions


def image_member(sample: dict) -> str:
    for ext in IMAGE_EXTENSIONS:
        if ext in sample:
            return ext
    raise BadSample("missing_image", f"no member among {', '.join(IMAGE_EXTENSIONS)}")


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """Open image bytes lazily and refuse those over `max_pixels` before any pixel is decoded."""
    if not data:
        raise BadSample("empty_image", "zero-byte image")
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as err:
        raise BadSample("too_large", str(err)) from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as err:
        raise _undecodable(err) from err
    width, height = image.size
    if width * height > max_pixels:
        raise BadSample("too_large", f"{width}x{height} exceeds data.max_pixels={max_pixels}")
    if width == 0 or height == 0:
        raise BadSample("undecodable_image", f"{width}x{height} image")
    return image


def load_rgb(data: bytes, max_pixels: int, draft_size: int | None = None) -> Image.Image:
    """Decode to an RGB image (alpha composited on white).

    `draft_size` lets JPEG decode at a reduced DCT scale that still covers `draft_size` pixels on each side,
    which is several times faster than decoding a large JPEG in full and then shrinking it.
    """
    image = open_image(data, max_pixels)
    if draft_size is not None and image.format == "JPEG":
        image.draft("RGB", (draft_size, draft_size))
    try:
        image.load()
        return to_rgb_uint8(image)
    except Image.DecompressionBombError as err:
        raise BadSample("too_large", str(err)) from err
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise _undecodable(err) from err


def _undecodable(err: Exception) -> BadSample:
    message = str(err)
    truncated = "truncated" in message.lower() or isinstance(err, EOFError)
    return BadSample("truncated_image" if truncated else "undecodable_image", message)
