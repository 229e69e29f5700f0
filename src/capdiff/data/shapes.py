"""The built-in "shapes" dataset: coloured shapes on coloured backgrounds, with captions and true attributes.

Deterministic by seed, written as ordinary WebDataset shards (`<key>.png`, `<key>.txt`, `<key>.json`) on
first use. The `.json` member holds the attributes the captions were written from, so evaluation can check
generated images and captions against the truth.

Web captions are often vague or wrong; `CaptionNoise` (`data.shapes.vague_fraction`, `wrong_fraction`) makes
that share of the training captions name only some attributes, or a wrong colour or shape, so that recaptioning
(`capdiff.recaption`) has something to repair. The validation captions stay complete and correct, and each
noisy sample's json records which of its captions were degraded (`caption_quality`) next to the truth.
"""

from __future__ import annotations

import io
import json
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import webdataset as wds
from PIL import Image, ImageDraw

from capdiff.data.datamodule import ImageTextDataModule
from capdiff.data.urls import expand_urls, local_path
from capdiff.distributed import is_global_leader, partial_path, wait_until

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
SHAPES = ("circle", "square", "triangle")
COLORS = {
    "red": (214, 39, 40),
    "green": (44, 160, 44),
    "blue": (31, 90, 220),
    "yellow": (240, 215, 30),
    "purple": (148, 60, 189),
    "orange": (255, 127, 14),
}
BACKGROUNDS = {**COLORS, "white": (245, 245, 245), "black": (18, 18, 18), "gray": (128, 128, 128)}
SIZES = {"small": 0.3, "large": 0.5}  # side of the shape's bounding box, as a fraction of the image
POSITIONS = {  # centre of the shape, as fractions of width and height
    "top left": (0.28, 0.28),
    "top right": (0.72, 0.28),
    "bottom left": (0.28, 0.72),
    "bottom right": (0.72, 0.72),
    "center": (0.5, 0.5),
}
TEMPLATES = (
    "a {size} {color} {shape} in the {position} on a {background} background",
    "{size} {color} {shape}, {position}, {background} background",
    "a {background} background with a {size} {color} {shape} in the {position}",
    "there is a {color} {shape} in the {position}; it is {size} and the background is {background}",
    "a picture of a {size} {color} {shape} placed in the {position} over {background}",
    "{color} {shape} ({size}) in the {position} of a {background} image",
)
# Each names a strict subset of the five attributes, with the colour before the shape as every full template
# has it, so capdiff.evaluation.shapes.parse_caption reads what a vague caption does say.
VAGUE_TEMPLATES = (
    "a picture",
    "an image",
    "a {shape}",
    "a {color} {shape}",
    "a {shape} on a {background} background",
    "a {size} {shape} in the {position}",
    "a {color} {shape} in the {position}",
)
SUPERSAMPLE = 4  # draw at 4× and box-filter down: antialiased edges without ringing


@dataclass(frozen=True)
class CaptionNoise:
    """The share of training captions that are vague (name only some attributes, or none) and that are wrong
    (name a wrong colour or shape); each caption is drawn on its own."""

    vague_fraction: float = 0.0
    wrong_fraction: float = 0.0

    def __post_init__(self) -> None:
        for name in ("vague_fraction", "wrong_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"data.shapes.{name}={getattr(self, name)} is not in [0, 1].")
        if self.vague_fraction + self.wrong_fraction > 1.0:
            raise ValueError(
                f"data.shapes.vague_fraction + wrong_fraction = {self.vague_fraction + self.wrong_fraction:g} is "
                "over 1: they are shares of the same captions; lower one of them."
            )

    @property
    def clean(self) -> bool:
        return not (self.vague_fraction or self.wrong_fraction)

    @property
    def folder_tag(self) -> str:
        """What the training shards' folder name carries (conf/data/synthetic.yaml), so that shards, tokenizers
        and latents of noisy captions never mix with the clean ones: empty when clean."""
        return "" if self.clean else f"-vague{self.vague_fraction:g}-wrong{self.wrong_fraction:g}"

    def degrade(self, caption: str, attributes: dict, rng: random.Random) -> tuple[str, str]:
        """(caption, quality): `caption` as it is ("clean"), or a "vague" or "wrong" one in its place."""
        draw = rng.random()
        if draw < self.vague_fraction:
            return rng.choice(VAGUE_TEMPLATES).format(**attributes), "vague"
        if draw < self.vague_fraction + self.wrong_fraction:
            return rng.choice(TEMPLATES).format(**wrong_attributes(attributes, rng)), "wrong"
        return caption, "clean"


CLEAN = CaptionNoise()


def wrong_attributes(attributes: dict, rng: random.Random) -> dict:
    """`attributes` with the colour or the shape (one of the two, drawn) replaced by another one."""
    if rng.random() < 0.5:
        others = [c for c in COLORS if c not in (attributes["color"], attributes["background"])]
        return attributes | {"color": rng.choice(others)}
    return attributes | {"shape": rng.choice([s for s in SHAPES if s != attributes["shape"]])}


def shapes_folder_tag(vague_fraction: float, wrong_fraction: float, holdout: bool = False) -> str:
    """`CaptionNoise.folder_tag` of the two fractions, and `-holdout` when the training split leaves the
    HELD_OUT pairs out (the `capdiff.shapes_tag` config resolver)."""
    return CaptionNoise(float(vague_fraction), float(wrong_fraction)).folder_tag + ("-holdout" if holdout else "")


# With `data.shapes.holdout`, the training split never shows these shape–position pairs (one in five of the
# 15): every shape and every position is still trained, each with other partners, and the validation split has
# them all, so generating exactly these prompts measures compositional generalisation.
HELD_OUT = (("circle", "top right"), ("square", "bottom left"), ("triangle", "center"))


def is_held_out(attributes: dict) -> bool:
    return (attributes["shape"], attributes["position"]) in HELD_OUT


def sample_attributes(rng: random.Random) -> dict:
    color = rng.choice(list(COLORS))
    return {
        "shape": rng.choice(SHAPES),
        "color": color,
        "size": rng.choice(list(SIZES)),
        "position": rng.choice(list(POSITIONS)),
        "background": rng.choice([b for b in BACKGROUNDS if b != color]),
    }


def captions_for(attributes: dict, rng: random.Random, count: int = 3) -> list[str]:
    return [t.format(**attributes) for t in rng.sample(TEMPLATES, count)]


def render(attributes: dict, image_size: int, rng: random.Random) -> Image.Image:
    """Draw the shape with a little jitter in place and size, so no two images are identical."""
    canvas = image_size * SUPERSAMPLE
    image = Image.new("RGB", (canvas, canvas), BACKGROUNDS[attributes["background"]])
    draw = ImageDraw.Draw(image)
    side = SIZES[attributes["size"]] * canvas * rng.uniform(0.9, 1.1)
    cx, cy = POSITIONS[attributes["position"]]
    cx = (cx + rng.uniform(-0.04, 0.04)) * canvas
    cy = (cy + rng.uniform(-0.04, 0.04)) * canvas
    half = side / 2
    fill = COLORS[attributes["color"]]
    if attributes["shape"] == "circle":
        draw.ellipse((cx - half, cy - half, cx + half, cy + half), fill=fill)
    elif attributes["shape"] == "square":
        draw.rectangle((cx - half, cy - half, cx + half, cy + half), fill=fill)
    else:
        draw.polygon([(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)], fill=fill)
    return image.resize((image_size, image_size), Image.Resampling.BOX)


def make_sample(
    index: int, split: str, seed: int, image_size: int, noise: CaptionNoise = CLEAN, holdout: bool = False
) -> dict:
    """The sample at `index` of a split: the same bytes for the same (index, split, seed, size, noise, holdout).
    The image and the true attributes do not depend on `noise`; with it, the json also holds `caption_quality`.
    With `holdout`, attributes of a HELD_OUT pair are drawn again."""
    rng = random.Random(f"capdiff/shapes/{seed}/{split}/{index}")
    attributes = sample_attributes(rng)
    while holdout and is_held_out(attributes):
        attributes = sample_attributes(rng)
    captions = captions_for(attributes, rng)
    buffer = io.BytesIO()
    render(attributes, image_size, rng).save(buffer, format="PNG", optimize=False)
    record = attributes | {"captions": captions}
    if not noise.clean:
        # A stream of its own, so that the image and the clean captions are those of the clean dataset.
        noise_rng = random.Random(f"capdiff/shapes/{seed}/{split}/{index}/caption-noise")
        captions, quality = zip(*(noise.degrade(c, attributes, noise_rng) for c in captions), strict=True)
        record = attributes | {"captions": list(captions), "caption_quality": list(quality)}
    return {
        "__key__": f"{split}-{index:07d}",
        "png": buffer.getvalue(),
        "txt": captions[0].encode(),
        "json": json.dumps(record).encode(),
    }


def write_split(
    paths: Sequence[Path],
    split: str,
    num_samples: int,
    seed: int,
    image_size: int,
    noise: CaptionNoise = CLEAN,
    holdout: bool = False,
) -> None:
    """Spread `num_samples` over the given shard files, each written to a temp name and renamed when whole."""
    if num_samples < len(paths):
        raise ValueError(f"data.shapes: {num_samples} {split} samples cannot fill {len(paths)} shards.")
    bounds = [round(i * num_samples / len(paths)) for i in range(len(paths) + 1)]
    for shard, path in enumerate(paths):
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = partial_path(path)
        with wds.TarWriter(str(partial), encoder=False) as sink:
            for index in range(bounds[shard], bounds[shard + 1]):
                sink.write(make_sample(index, split, seed, image_size, noise, holdout))
        partial.replace(path)


def ensure_split(
    urls: list[str],
    split: str,
    num_samples: int,
    seed: int,
    image_size: int,
    wait_s: float = 0.0,
    noise: CaptionNoise = CLEAN,
    holdout: bool = False,
) -> bool:
    """Write the split's shards unless a manifest says the same ones exist; True when it wrote them.

    With `wait_s` > 0 (every rank but global rank 0) it only waits for another process to write
    them, so two processes never write the same files.
    """
    paths = [local_path(u) for u in urls]
    if any(p is None for p in paths):
        raise ValueError(f"data.{split}_urls for the shapes dataset must be local paths, got {urls[0]!r}.")
    manifest = paths[0].parent / f"{split}.manifest.json"
    wanted = {
        "version": FORMAT_VERSION,
        "split": split,
        "num_samples": num_samples,
        "seed": seed,
        "image_size": image_size,
        "shards": [p.name for p in paths],
    }
    if not noise.clean:  # clean shards keep the manifest they had before the noise existed, and are not rewritten
        wanted["caption_noise"] = {"vague_fraction": noise.vague_fraction, "wrong_fraction": noise.wrong_fraction}
    if holdout:
        wanted["held_out"] = [list(pair) for pair in HELD_OUT]

    def ready() -> bool:
        return _manifest_matches(manifest, wanted) and all(p.is_file() for p in paths)

    if wait_s:
        wait_until(ready, wait_s, f"the shapes {split} shards in {manifest.parent}")
        return False
    if ready():
        return False
    log.info("writing %d shapes %s samples to %d shards in %s", num_samples, split, len(paths), paths[0].parent)
    write_split(paths, split, num_samples, seed, image_size, noise, holdout)
    manifest.write_text(json.dumps(wanted, indent=1))
    return True


def _manifest_matches(manifest: Path, wanted: dict) -> bool:
    try:
        return json.loads(manifest.read_text()) == wanted
    except (OSError, ValueError):
        return False


class ShapesDataModule(ImageTextDataModule):
    """`data=synthetic`: writes the shapes shards named by `train_urls`/`val_urls` on first use, then reads them
    through the same pipeline as any other shards. `data.shapes.vague_fraction` / `wrong_fraction` degrade the
    training captions only (`CaptionNoise`).

    With `data.sources` the model trains on that mixture instead (e.g. recaptioned copies of the shapes, or the
    shapes mixed with other shards); the shapes' own training split (`shapes_train_urls`) is still written, as
    the probe that scores generations is trained on it."""

    def __init__(
        self, train_urls: str | Sequence[str] | None = None, *args, shapes: dict | None = None, **kwargs
    ) -> None:
        sources = kwargs.get("sources")
        super().__init__(None if sources is not None else train_urls, *args, **kwargs)
        self.shapes_train_urls = expand_urls(train_urls, "data.train_urls") if train_urls is not None else []
        shapes = dict(shapes or {})
        self.num_train = int(shapes.pop("num_train", 4096))
        self.num_val = int(shapes.pop("num_val", 512))
        self.shapes_seed = int(shapes.pop("seed", 0))
        self.caption_noise = CaptionNoise(
            float(shapes.pop("vague_fraction", 0.0)), float(shapes.pop("wrong_fraction", 0.0))
        )
        self.holdout = bool(shapes.pop("holdout", False))
        if shapes:
            raise ValueError(
                f"data.shapes has unknown keys {sorted(shapes)}; known: num_train, num_val, seed, vague_fraction, "
                "wrong_fraction, holdout."
            )

    @property
    def written_as(self) -> dict:
        """What the shards at these paths are written from. A run with other sizes (a benchmark's `--quick`)
        rewrites the same paths, so the caches built from them (tokenizer, first stage, probe, latents) are keyed
        by this too: a probe trained on 256 images was once read back for the 4 096-image data."""
        sizes = {"num_train": self.num_train, "num_val": self.num_val, "image_size": self.image_size}
        return sizes | {"seed": self.shapes_seed, "caption_noise": vars(self.caption_noise), "holdout": self.holdout}

    def prepare_data(self) -> None:
        if self.reading_latents:  # the urls now name the cached copies (capdiff.artifacts.prepare_latents)
            return
        wait_s = 0.0 if is_global_leader() else 600.0
        if self.shapes_train_urls:
            ensure_split(
                self.shapes_train_urls, "train", self.num_train, self.shapes_seed, self.image_size, wait_s,
                self.caption_noise, self.holdout,
            )  # fmt: skip
        if self.val_urls:
            ensure_split(self.val_urls, "val", self.num_val, self.shapes_seed, self.image_size, wait_s)
