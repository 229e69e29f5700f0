"""Non-finite losses: a NaN/inf loss skips its optimizer step instead of poisoning the weights."""

from __future__ import annotations

import logging
from pathlib import Path

import pytorch_lightning as pl
import torch

log = logging.getLogger(__name__)


class NonFiniteGuard(pl.Callback):
    """A micro-batch whose loss is not finite on some rank skips its whole optimizer step on every rank (its
    gradients and those of the step's earlier micro-batches are dropped), with a warning and
    `train/skipped_nonfinite`, up to `max_skips` times in a run; the next one saves
    `checkpoints/nonfinite-step<N>.ckpt` (the last finite weights, with `checkpoint`) and stops the run.

    The backward of the non-finite loss still runs on every rank, so each gradient all-reduce of DDP and FSDP
    is made by all of them; the gradients are dropped before the optimizer reads them, where Lightning's
    loss scaler (16-mixed) has already unscaled them, so it steps nothing and lowers its scale. Under manual
    optimization (the GAN's D and G steps) each optimizer's step is judged by the backwards since the last
    one: a non-finite D loss skips D's step while G's goes on."""

    def __init__(self, max_skips: int = 10, checkpoint: bool = True) -> None:
        self.max_skips = max_skips
        self.checkpoint = checkpoint
        self.skipped = 0
        self.step_skipped = False  # whether the last optimizer step was skipped (the EMA reads it)
        self._pending: float | None = None  # the loss of a non-finite micro-batch of the step being accumulated
        self._to_report: float | None = None  # ... of the step just skipped

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        # one decision for all ranks, so that all of them skip the same steps
        finite = trainer.strategy.reduce_boolean_decision(bool(torch.isfinite(loss.detach()).item()), all=True)
        if not finite and self._pending is None:
            self._pending = float(loss.detach())

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        self.step_skipped = self._pending is not None
        if self.step_skipped:  # (kept for the batch's end: a later optimizer of the batch may step fine)
            self._to_report, self._pending = self._pending, None
            optimizer.zero_grad(set_to_none=True)  # AdamW leaves a parameter without a gradient as it is

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, *args) -> None:
        if self._to_report is None:
            return
        terms = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in (outputs or {}).items() if k.endswith("_loss"))
        terms = terms or f"loss={self._to_report:.4g} on another rank"
        self._to_report = None
        self.skipped += 1
        step = trainer.global_step - 1  # the step just skipped (Lightning counts it as taken)
        if self.skipped <= self.max_skips:
            log.warning(
                "step %d: non-finite loss (%s): step skipped (%d of callbacks.nonfinite.max_skips=%d)",
                step,
                terms,
                self.skipped,
                self.max_skips,
            )
            pl_module.log("train/skipped_nonfinite", float(self.skipped), on_step=True, batch_size=1)
            return
        saved = ""
        if self.checkpoint:
            path = Path(trainer.default_root_dir) / "checkpoints" / f"nonfinite-step{step:06d}.ckpt"
            trainer.save_checkpoint(path)
            saved = f" The last finite weights are in {path}."
        raise FloatingPointError(
            f"step {step}: the loss was non-finite ({terms}); {self.skipped} non-finite steps in this run are "
            f"more than callbacks.nonfinite.max_skips={self.max_skips}.{saved} Lower model.optim.lr, keep "
            "trainer.gradient_clip_val on, or train in 32-true / bf16-mixed instead of 16-mixed; raise "
            "callbacks.nonfinite.max_skips to tolerate more."
        )


def find_guard(trainer: pl.Trainer) -> NonFiniteGuard | None:
    return next((c for c in trainer.callbacks if isinstance(c, NonFiniteGuard)), None)
