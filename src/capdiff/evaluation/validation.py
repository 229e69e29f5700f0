"""Validation losses: a plain model's `losses(batch, "val", batch_idx)` (fixed noise and timesteps per batch, so
curves are comparable) logged as `val/<name>`, the same during training and in `evaluate.py`."""

from __future__ import annotations

import pytorch_lightning as pl
import torch


def log_validation_losses(module: pl.LightningModule, out: dict[str, torch.Tensor], batch: dict) -> None:
    size = batch["pixels"].shape[0]
    for name, value in out.items():
        module.log(f"val/{name}", value, on_epoch=True, sync_dist=True, prog_bar=name == "loss", batch_size=size)


class ValidationLosses(pl.LightningModule):
    """A trained model's validation losses under a Trainer (`trainer.validate`), without its training module."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        log_validation_losses(self, self.model.losses(batch, "val", batch_idx), batch)
