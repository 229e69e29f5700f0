"""Safe decoding of one WebDataset sample: the image member and the caption, nothing else.

Only the members named by `IMAGE_EXTENSIONS` and the caption key are ever read from a shard, and they are
decoded with PIL and `json`/UTF-8 only: a shard member such as `.pyd`, `.pickle` or `.pth` is never opened,
so a payload hidden in one cannot run. Every way a sample can be bad raises `BadSample` with a short reason
that the stream counts.
"""

from __future__ import annotations

import io
import json
import logging
import math
import multiprocessing as mp
import time
from collections import Counter
from dataclasses import dataclass, field

from PIL import Image, UnidentifiedImageError

from capdiff.data.transforms import to_rgb_uint8

log = logging.getLogger(__name__)

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
    def parse(cls, spec: str) -> CaptionKey:
        spec = spec.strip().lower()
        member, _, fld = spec.partition(".")
        if not member or (fld == "" and spec.endswith(".")):
            raise ValueError(
                f"data.caption_key={spec!r} is not a caption key: use a member extension such as 'txt', "
                "or a field of the json member such as 'json.caption'."
            )
        if fld and member != "json":
            raise ValueError(
                f"data.caption_key={spec!r}: only the json member has fields; use 'json.{fld}' or a "
                "plain member extension such as 'txt'."
            )
        if member in IMAGE_EXTENSIONS:
            raise ValueError(f"data.caption_key={spec!r} names an image member; use 'txt' or 'json.<field>'.")
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


SKIP_REASONS = (
    "shard_error",  # a shard that cannot be opened or read as tar
    "missing_image",
    "empty_image",
    "truncated_image",
    "undecodable_image",
    "too_large",  # over data.max_pixels
    "missing_caption",
    "empty_caption",
    "bad_caption",  # not UTF-8, or json that does not parse
    "missing_latents",  # data.latents=true and no latents.npy member
    "bad_latents",  # latents.npy that does not parse as 2×C×h×w
)


class SkipCounter:
    """Skipped samples per reason, in shared memory: dataloader workers add, the main process reads.

    Counting where the skip happens (rather than shipping counts with the next batch) loses nothing when
    the bad samples are the last of a stream.
    """

    def __init__(self) -> None:
        self._counts = mp.Array("q", len(SKIP_REASONS))

    def add(self, reason: str) -> None:
        with self._counts.get_lock():
            self._counts[SKIP_REASONS.index(reason)] += 1

    def totals(self) -> Counter:
        with self._counts.get_lock():
            return Counter({r: n for r, n in zip(SKIP_REASONS, self._counts[:], strict=True) if n})


@dataclass
class SkipLog:
    """A worker's view of skips: adds to the shared counter, logs each reason at most once per `every_s`."""

    counter: SkipCounter
    every_s: float = 30.0
    good: int = 0
    counts: Counter = field(default_factory=Counter)
    _last_log: dict = field(default_factory=dict)

    def skip(self, reason: str, where: str, detail: str) -> None:
        self.counter.add(reason)
        self.counts[reason] += 1
        now = time.monotonic()
        if now - self._last_log.get(reason, -math.inf) >= self.every_s:
            self._last_log[reason] = now
            log.warning(
                "skipped sample %s (%s: %s); %d skipped for this reason so far in this worker",
                where,
                reason,
                detail,
                self.counts[reason],
            )
