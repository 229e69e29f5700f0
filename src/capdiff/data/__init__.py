"""Image–text data: WebDataset streams, the built-in shapes dataset and shard tools."""

from capdiff.data.datamodule import ImageTextDataModule
from capdiff.data.decode import BadSample, CaptionKey
from capdiff.data.pipeline import TrainStream, ValStream
from capdiff.data.shapes import ShapesDataModule

__all__ = ["BadSample", "CaptionKey", "ImageTextDataModule", "ShapesDataModule", "TrainStream", "ValStream"]
