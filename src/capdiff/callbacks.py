"""Training callbacks: EMA of the generator's weights, and sample grids + captions written during training."""

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

log = logging.getLogger(__name__)


class EMA(pl.Callback):
    """Exponential moving average of every trained parameter (`pl_module.ema_parameters()`), saved in
    checkpoints and swapped in for sampling and captioning.

    One update per optimizer step: not per micro-batch under `trainer.accumulate_grad_batches`, and none for a
    step skipped for a non-finite loss. The decay warms up as min(decay, (1 + n) / (10 + n)) after n updates
    (diffusers' `EMAModel` default), so early averages are not dominated by the random initialisation.

    capdiff keeps its own rather than diffusers' `EMAModel`: that one allocates a second copy of the shadow on
    every update (`_foreach_sub` out of place) and another on every load (a deep copy of the state), where
    this one updates in place with one `_foreach_lerp_` (bench/ema.py measures both at SD-1.5 size).
    """

    def __init__(self, decay: float = 0.999, every_n_steps: int = 1) -> None:
        self.decay = decay
        self.every_n_steps = every_n_steps
        self.shadow: dict[str, torch.Tensor] = {}
        self.updates = 0
        self._seen_step: int | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # here, not in on_fit_start: under FSDP a checkpoint's state is restored after on_fit_start
        params = pl_module.ema_parameters()
        if self.shadow and set(self.shadow) != set(params):
            log.warning(
                "the checkpoint's EMA averages other parameters than this run trains (%d vs %d): the average "
                "starts again from the current weights",
                len(self.shadow),
                len(params),
            )
            self.shadow, self.updates = {}, 0
        if self.shadow:
            self.shadow = {n: t.to(params[n].device) for n, t in self.shadow.items()}
        else:
            self.shadow = {n: p.detach().clone() for n, p in params.items()}
        self._seen_step = trainer.global_step

    @torch.no_grad()
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args) -> None:
        step = trainer.global_step
        if step == self._seen_step:  # a micro-batch whose gradients are still accumulating
            return
        self._seen_step = step
        if getattr(pl_module, "step_skipped", False) or step % self.every_n_steps:
            return
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        params = pl_module.ema_parameters()
        # One multi-tensor kernel, in place, instead of a Python loop over hundreds of tensors.
        torch._foreach_lerp_(list(self.shadow.values()), [params[n].detach() for n in self.shadow], 1 - decay)

    def state_dict(self) -> dict:
        return {"shadow": self.shadow, "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state_dict: dict) -> None:
        self.shadow = dict(state_dict["shadow"])
        self.updates = int(state_dict["updates"])

    @contextmanager
    def swapped(self, pl_module: pl.LightningModule) -> Iterator[None]:
        """The averaged weights in place of the live ones, restored afterwards."""
        params = pl_module.ema_parameters()
        live = {n: p.detach().clone() for n, p in params.items() if n in self.shadow}
        with torch.no_grad():
            for name in live:
                params[name].copy_(self.shadow[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, value in live.items():
                    params[name].copy_(value)


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


def batch_size(batch: dict) -> int:
    """Samples in a batch, for Lightning's `ThroughputMonitor` (`batch_size_fn`, see conf/callbacks/default.yaml)."""
    return len(batch["keys"])


def find_ema(trainer: pl.Trainer) -> EMA | None:
    return next((c for c in trainer.callbacks if isinstance(c, EMA)), None)


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
            if prompts and pl_module.diffusion is not None:
                generated = pl_module.generate(
                    prompts, steps=self.steps, guidance_scale=self.guidance_scale, seed=self.seed
                )
                grid = caption_grid(generated, prompts)
                grid.save(folder / f"generated_{tag}.png")
                images["samples/generated"] = grid
            if batch is not None and pl_module.vision is not None and pl_module.weights["caption"]:
                captions = pl_module.caption(batch["pixels"])
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
