"""Samples during training: image grids for fixed prompts and captions of fixed validation images, under the
EMA weights."""

from __future__ import annotations

import json
import logging
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import pytorch_lightning as pl
import torch
from PIL import Image, ImageDraw, ImageFont
from pytorch_lightning.utilities import rank_zero_only

from capdiff.data.transforms import as_unit, unit_to_uint8
from capdiff.training.ema import find_ema

log = logging.getLogger(__name__)


@contextmanager
def sampling_mode(trainer: pl.Trainer, pl_module: pl.LightningModule) -> Iterator[None]:
    """What sampling during training runs under: eval mode, the EMA weights when the run keeps them, and the
    trainer's precision (bf16 autocast under bf16-mixed), as the training step does; training mode after."""
    was_training = pl_module.training
    pl_module.eval()
    ema = find_ema(trainer)
    try:
        with ema.swapped(pl_module) if ema else nullcontext(), trainer.precision_plugin.forward_context():
            yield
    finally:
        pl_module.train(was_training)


def caption_grid(images: torch.Tensor, texts: list[str], tile: int = 128, width: int = 24) -> Image.Image:
    """Images in `[-1, 1]` side by side, each with its text wrapped underneath."""
    font = ImageFont.load_default()
    lines = [textwrap.wrap(t, width)[:5] or [""] for t in texts]
    text_height = 12 * max(len(block) for block in lines) + 6
    columns = min(len(texts), 8)
    rows = (len(texts) + columns - 1) // columns
    grid = Image.new("RGB", (columns * (tile + 4), rows * (tile + text_height + 4)), "white")
    draw = ImageDraw.Draw(grid)
    pixels = unit_to_uint8(images.float().cpu()).permute(0, 2, 3, 1).numpy()
    for i, (array, block) in enumerate(zip(pixels, lines, strict=True)):
        x, y = (i % columns) * (tile + 4), (i // columns) * (tile + text_height + 4)
        grid.paste(Image.fromarray(array).resize((tile, tile), Image.Resampling.NEAREST), (x, y))
        for j, line in enumerate(block):
            draw.text((x + 2, y + tile + 3 + 12 * j), line, fill="black", font=font)
    return grid


class SampleGrid(pl.Callback):
    """Every `every_n_epochs` validations and at the end of training: images for fixed prompts (the first
    validation captions unless `prompts` are given) with fixed seeds, and captions of the first validation
    images, written to `<run>/samples/` and logged to W&B when it is the logger."""

    def __init__(
        self,
        prompts: list[str] | None = None,
        num_prompts: int = 8,
        every_n_epochs: int = 1,
        steps: int = 25,
        guidance_scale: float = 4.0,
        seed: int = 0,
        folder: str = "samples",
    ) -> None:
        self.prompts = list(prompts) if prompts else None
        self.num_prompts = num_prompts
        self.every_n_epochs = every_n_epochs
        self.steps = steps
        self.guidance_scale = guidance_scale
        self.seed = seed
        self.folder = folder
        self._val_batch: dict | None = None

    def _first_val_batch(self, trainer: pl.Trainer) -> dict | None:
        if self._val_batch is None:
            datamodule = trainer.datamodule
            has_val = datamodule is not None and bool(getattr(datamodule, "val_urls", None))
            batch = next(iter(datamodule.val_dataloader()), None) if has_val else None
            if batch is not None:
                n = self.num_prompts
                self._val_batch = {
                    "pixels": as_unit(batch["pixels"][:n]),
                    "captions": batch["captions"][:n],
                    "keys": batch["keys"][:n],
                }
        return self._val_batch

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        self.render(trainer, pl_module, f"epoch{trainer.current_epoch:03d}")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.render(trainer, pl_module, "final")

    @rank_zero_only
    def render(self, trainer: pl.Trainer, pl_module: pl.LightningModule, tag: str) -> None:
        folder = Path(trainer.default_root_dir) / self.folder
        folder.mkdir(parents=True, exist_ok=True)
        batch = self._first_val_batch(trainer)
        prompts = self.prompts or (batch["captions"] if batch else None)
        images = {}
        with sampling_mode(trainer, pl_module):
            model = pl_module.model
            if prompts and model.can_generate:
                generated = model.generate(
                    prompts, steps=self.steps, guidance_scale=self.guidance_scale, seed=self.seed
                )
                grid = caption_grid(generated, prompts)
                grid.save(folder / f"generated_{tag}.png")
                images["samples/generated"] = grid
            if batch is not None and model.can_caption:
                captions = model.caption(batch["pixels"])
                grid = caption_grid(
                    batch["pixels"], [f"{c}\n(true: {r})" for c, r in zip(captions, batch["captions"], strict=True)]
                )
                grid.save(folder / f"captions_{tag}.png")
                images["samples/captions"] = grid
                with (folder / f"captions_{tag}.jsonl").open("w") as out:
                    for key, ref, gen in zip(batch["keys"], batch["captions"], captions, strict=True):
                        out.write(json.dumps({"key": key, "reference": ref, "generated": gen}) + "\n")
        log.info("samples for %s written to %s", tag, folder)
        for logger in trainer.loggers:
            if hasattr(logger, "log_image") and images:
                logger.log_image(
                    key="samples", images=list(images.values()), caption=list(images), step=trainer.global_step
                )
