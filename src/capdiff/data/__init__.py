"""Image–text data: WebDataset streams, the built-in shapes dataset and shard tools."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from capdiff.data.datamodule import ImageTextDataModule
    from capdiff.data.decode import BadSample, CaptionKey
    from capdiff.data.shapes import ShapesDataModule
    from capdiff.data.streams import TrainStream, ValStream

# Loaded on first use (PEP 562): the shard tools (`python -m capdiff.data.shards`, `cache_latents`) import this
# package too, and the data modules would bring in Lightning and torch, ~6 s of start-up a shard tool never uses.
_HOMES = {
    "ImageTextDataModule": "capdiff.data.datamodule",
    "BadSample": "capdiff.data.decode",
    "CaptionKey": "capdiff.data.decode",
    "TrainStream": "capdiff.data.streams",
    "ValStream": "capdiff.data.streams",
    "ShapesDataModule": "capdiff.data.shapes",
}
__all__ = ["BadSample", "CaptionKey", "ImageTextDataModule", "ShapesDataModule", "TrainStream", "ValStream"]


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name]), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
