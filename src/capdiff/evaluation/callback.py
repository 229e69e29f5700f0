"""A small version of `evaluate.py` during training: every N steps, fixed validation images and prompts with
fixed seeds, scored and logged (`peval/...`), so a run's curves show what the samples and captions are doing."""

from __future__ import annotations

import logging
import time

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Timer

from capdiff.data.shapes import ShapesDataModule
from capdiff.data.transforms import as_unit, unit_to_uint8
from capdiff.evaluation.shapes import ATTRIBUTES, attribute_accuracy, load_probe, parse_caption, probe_folder
from capdiff.evaluation.text import caption_scores
from capdiff.samplers import DEFAULT_SAMPLER, DEFAULT_STEPS, check_sampler
from capdiff.training.samples import call_model, caption_options, on_every_rank, same_on_every_rank, sampling_mode

log = logging.getLogger(__name__)


class PeriodicEval(pl.Callback):
    def __init__(
        self,
        every_n_steps: int = 250,
        num_samples: int = 32,
        steps: int = DEFAULT_STEPS,
        guidance_scale: float = 4.0,
        seed: int = 0,
        probe: bool = True,
        cache_dir: str = "data",
        sampler: str = DEFAULT_SAMPLER,
    ) -> None:
        self.sampler = check_sampler(sampler, "callbacks.periodic_eval.sampler")
        self.use_probe = probe  # prompt faithfulness of generations on the shapes data (trains the probe once)
        self.cache_dir = cache_dir  # where the shapes probe is cached (shared with evaluate.py)
        self.every_n_steps = every_n_steps
        self.num_samples = num_samples
        self.steps = steps
        self.guidance_scale = guidance_scale
        self.seed = seed
        self._batch: dict | None = None
        self._probe = None
        self.last_metrics: dict[str, float] = {}  # the latest evaluation's `peval/...` figures (rank 0)
        self._started = time.monotonic()
        # The optimizer step last evaluated: under gradient accumulation every micro-batch of a step ends with the
        # same global_step, and a resumed run starts at a step its checkpoint's run may have evaluated already.
        self._evaluated_step = -1

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._started = time.monotonic()
        self._evaluated_step = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args) -> None:
        step = trainer.global_step
        if self.every_n_steps and step % self.every_n_steps == 0 and step != self._evaluated_step:
            self._evaluated_step = step
            self.run(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.every_n_steps and trainer.global_step != self._evaluated_step:
            self._evaluated_step = trainer.global_step
            self.run(trainer, pl_module)

    def _fixed_batch(self, trainer: pl.Trainer) -> dict | None:
        if self._batch is None:
            loader = trainer.datamodule.val_loader() if trainer.datamodule is not None else []
            pixels, captions = [], []
            for batch in loader:
                pixels.append(as_unit(batch["pixels"]))
                captions += batch["captions"]
                if len(captions) >= self.num_samples:
                    break
            if captions:
                n = self.num_samples
                self._batch = {"pixels": torch.cat(pixels)[:n], "captions": captions[:n]}
        return self._batch

    def _shapes_probe(self, trainer: pl.Trainer):
        datamodule = trainer.datamodule
        if self._probe is None and isinstance(datamodule, ShapesDataModule):
            folder = probe_folder(self.cache_dir, datamodule)
            self._probe = load_probe(datamodule.shapes_train_urls, datamodule.val_urls, folder)[0]
        return self._probe

    @torch.no_grad()
    def run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not (trainer.is_global_zero or on_every_rank(trainer)):
            return
        batch = same_on_every_rank(trainer, lambda: self._fixed_batch(trainer))
        if batch is None:
            return
        metrics: dict[str, float] = {}
        pixels, captions = batch["pixels"].to(pl_module.device), batch["captions"]
        truth = [parse_caption(c) for c in captions]
        shapes = all(all(t.values()) for t in truth)
        model = pl_module.model
        with sampling_mode(trainer, pl_module):
            if model.can_caption:
                generated = call_model(trainer, pl_module, model.caption, pixels, **caption_options(trainer))
                metrics |= caption_scores(generated, [[c] for c in captions])
                if shapes:
                    scores = attribute_accuracy([parse_caption(g) for g in generated], truth)
                    metrics |= {f"caption_attr/{k}": v for k, v in scores.items()}
            # the shapes probe scores the generated images (rank 0 loads it, or trains it once)
            probed = shapes and self.use_probe and isinstance(trainer.datamodule, ShapesDataModule)
            if model.can_generate and probed:
                settings = {"steps": self.steps, "guidance_scale": self.guidance_scale, "seed": self.seed,
                            "sampler": self.sampler}  # fmt: skip
                images = call_model(trainer, pl_module, model.generate, captions, **settings)
                if trainer.is_global_zero:
                    predicted = self._shapes_probe(trainer).predict(unit_to_uint8(images).cpu())
                    scores = attribute_accuracy(predicted, truth)
                    metrics |= {f"probe_attr/{k}": v for k, v in scores.items() if k in (*ATTRIBUTES, "mean", "all")}
        if not trainer.is_global_zero:
            return
        metrics["train_minutes"] = self._train_minutes(trainer)
        metrics = {f"peval/{k}": v for k, v in metrics.items()}
        self.last_metrics = metrics
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        summary = ", ".join(f"{k.split('/', 1)[1]} {v:.3f}" for k, v in metrics.items() if k.endswith("/mean"))
        log.info("step %d: %s", trainer.global_step, summary or "evaluated")

    def _train_minutes(self, trainer: pl.Trainer) -> float:
        """Wall minutes of training so far, evaluations included: the `trainer.max_time` clock where there is
        one (it carries over a resume), else this process's since training started."""
        timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)
        seconds = timer.time_elapsed("train") if timer is not None else time.monotonic() - self._started
        return seconds / 60.0
