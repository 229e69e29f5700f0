"""`eval.postprocess`: the post-processing chain evaluate.py scores generated images with, besides scoring them
as they are. A `color` step matches the colours of a reference set: the training images by default."""

from __future__ import annotations

import itertools
import logging

from omegaconf import DictConfig, OmegaConf

from capdiff.data import ImageTextDataModule
from capdiff.postprocess import PostProcess, Reference, build_chain

log = logging.getLogger(__name__)


def _step_name(step) -> str:
    return step if isinstance(step, str) else str(step.get("name"))


def postprocess_from(cfg: DictConfig, datamodule: ImageTextDataModule) -> PostProcess | None:
    """The chain of `eval.postprocess` (None when empty), with the reference its `color` step needs."""
    node = cfg.eval.get("postprocess")
    steps = OmegaConf.to_container(node, resolve=True) if node else []
    if not steps:
        return None
    reference = None
    if any(_step_name(s) == "color" for s in steps):
        reference = color_reference(cfg, datamodule)
    return build_chain(steps, reference, key="eval.postprocess")


def color_reference(cfg: DictConfig, datamodule: ImageTextDataModule) -> Reference:
    """The per-channel statistics of `eval.postprocess_reference.urls` (default: the training shards, which the
    built-in shapes always have), over `eval.postprocess_reference.batches` batches."""
    spec = cfg.eval.get("postprocess_reference") or {}
    urls = spec.get("urls") or datamodule.train_urls
    if not urls:
        raise ValueError(
            "eval.postprocess has a color step, which matches the colours of a reference set, and the checkpoint's "
            "training shards are not read here: give eval.postprocess_reference.urls='<training shards>'."
        )
    reader = ImageTextDataModule(
        train_urls=None, val_urls=urls, image_size=datamodule.image_size, caption_key=datamodule.caption_key.spec,
        batch_size=datamodule.val_batch_size, num_workers=0,
    )  # fmt: skip
    reader.setup_streams(0, 1)
    batches = int(spec.get("batches") or 8)
    reference = Reference.from_images(b["pixels"] for b in itertools.islice(reader.val_dataloader(), batches))
    log.info("post-processing colour reference: %d batches of %s", batches, urls[0])
    return reference
