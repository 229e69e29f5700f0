"""Samples during training: image grids for fixed prompts and captions of fixed validation images, under the
EMA weights."""

from __future__ import annotations

import json
import logging
import textwrap
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import pytorch_lightning as pl
import torch
from PIL import Image, ImageDraw, ImageFont
from pytorch_lightning.strategies import FSDPStrategy

from capdiff.data.transforms import as_unit, unit_to_uint8
from capdiff.samplers import DEFAULT_SAMPLER, DEFAULT_STEPS, check_sampler
from capdiff.training.ema import find_ema

log = logging.getLogger(__name__)


def on_every_rank(trainer: pl.Trainer) -> bool:
    """Whether sampling during training runs on every rank. Rank 0 alone samples under DDP (the others wait
    at their next collective); under FSDP every forward gathers each unit's weights from all ranks, so every
    rank takes part, on the same inputs, and rank 0 writes what comes out."""
    return isinstance(trainer.strategy, FSDPStrategy)


def same_on_every_rank(trainer: pl.Trainer, read: Callable[[], object]):
    """What `read()` gives on rank 0, on every rank that samples (their validation batches differ): read by
    rank 0 alone and broadcast where every rank samples."""
    if not on_every_rank(trainer):
        return read()
    return trainer.strategy.broadcast(read() if trainer.is_global_zero else None, src=0)


def call_model(trainer: pl.Trainer, pl_module: pl.LightningModule, method: Callable, *args, **kwargs):
    """`method(*args, **kwargs)` of the model, inside the FSDP root's forward where the model is sharded.

    Outside its root forward a sharded model's own weights (those in no block unit, such as the token
    embedding) are each rank's flat shard; the root forward gathers them, and each block unit gathers its own
    when called (as Lightning runs `training_step` through the root)."""
    if not on_every_rank(trainer):
        return method(*args, **kwargs)
    root = trainer.strategy.model

    def restore() -> None:  # the class's forward again (no instance attribute left behind)
        pl_module.__dict__.pop("forward", None)

    def redirected(*a, **k):
        restore()
        return method(*a, **k)

    pl_module.forward = redirected
    try:
        return root(*args, **kwargs)
    finally:
        restore()


def caption_options(trainer: pl.Trainer) -> dict:
    """Greedy captioning stops when every caption has ended, which can differ by rank: under FSDP the ranks
    run the LLM in step until all have ended (transformers' `synced_gpus`)."""
    return {"synced_gpus": True} if on_every_rank(trainer) else {}


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
        steps: int = DEFAULT_STEPS,
        guidance_scale: float = 4.0,
        seed: int = 0,
        folder: str = "samples",
        sampler: str = DEFAULT_SAMPLER,
    ) -> None:
        self.sampler = check_sampler(sampler, "callbacks.sample_grid.sampler")
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
            batch = next(iter(datamodule.val_loader()), None) if has_val else None
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

    def render(self, trainer: pl.Trainer, pl_module: pl.LightningModule, tag: str) -> None:
        if not (trainer.is_global_zero or on_every_rank(trainer)):
            return
        batch = same_on_every_rank(trainer, lambda: self._first_val_batch(trainer))
        prompts = self.prompts or (batch["captions"] if batch else None)
        model, made = pl_module.model, {}
        with sampling_mode(trainer, pl_module):
            if prompts and model.can_generate:
                settings = {"steps": self.steps, "guidance_scale": self.guidance_scale, "seed": self.seed,
                            "sampler": self.sampler}  # fmt: skip
                made["generated"] = call_model(trainer, pl_module, model.generate, prompts, **settings)
            if batch is not None and model.can_caption:
                made["captions"] = call_model(
                    trainer, pl_module, model.caption, batch["pixels"], **caption_options(trainer)
                )
        if trainer.is_global_zero:
            self.write(trainer, tag, prompts, batch, made)

    def write(self, trainer: pl.Trainer, tag: str, prompts: list[str] | None, batch: dict | None, made: dict) -> None:
        folder = Path(trainer.default_root_dir) / self.folder
        folder.mkdir(parents=True, exist_ok=True)
        images = {}
        if "generated" in made:
            grid = caption_grid(made["generated"], prompts)
            grid.save(folder / f"generated_{tag}.png")
            images["samples/generated"] = grid
        if "captions" in made:
            captions = made["captions"]
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
