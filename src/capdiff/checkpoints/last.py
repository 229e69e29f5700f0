"""Lightning's `ModelCheckpoint`, with `last.ckpt` kept at the newest save point.

Since Lightning 2.6, `save_last=True` writes `last.ckpt` only at a step where a top-k checkpoint was written too:
once the monitored loss stops improving, `last.ckpt` stops moving, and `ckpt_path=last`, a requeued job's resume,
evaluation and export then read an old step (a 30-epoch run whose last epoch did not improve `val/loss` kept
`last.ckpt` at epoch 28). Here every save point writes it: each epoch's end (after validation) and every
`every_n_train_steps`, whether or not the monitored value improved."""

from __future__ import annotations

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint as _LightningModelCheckpoint


class ModelCheckpoint(_LightningModelCheckpoint):
    def _catch_up_last(self, trainer: pl.Trainer) -> None:
        # skipped where Lightning wrote a checkpoint at this step already (last.ckpt with it, or not asked for)
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args, **kwargs) -> None:
        super().on_train_batch_end(trainer, pl_module, *args, **kwargs)
        n = self._every_n_train_steps
        if n >= 1 and trainer.global_step % n == 0 and trainer.global_step > 0:
            self._catch_up_last(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._catch_up_last(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._catch_up_last(trainer)
