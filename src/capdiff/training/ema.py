"""Exponential moving average of the trained weights, kept by a callback, saved in checkpoints and swapped in
for sampling and captioning."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import pytorch_lightning as pl
import torch
from pytorch_lightning.strategies import FSDPStrategy
from torch.distributed.fsdp import FullStateDictConfig, FullyShardedDataParallel, StateDictType

from capdiff.distributed import unwrapped_name
from capdiff.training.nonfinite import find_guard

log = logging.getLogger(__name__)


class EMA(pl.Callback):
    """Exponential moving average of every trained parameter (`pl_module.ema_parameters()`), saved in
    checkpoints and swapped in for sampling and captioning.

    Under FSDP each rank averages its own shard of the weights (as the optimizer updates them) and a checkpoint
    holds the whole average, gathered by FSDP's full state dict onto rank 0 and named as without FSDP; a resume
    (on any number of ranks) gives each rank its shard of it again.

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
        self._sharded: pl.LightningModule | None = None  # the module, while it trains under FSDP
        self._full: dict[str, torch.Tensor] | None = None  # a checkpoint's whole average, until it is sharded

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # here, not in on_fit_start: under FSDP a checkpoint's state is restored after on_fit_start
        params = pl_module.ema_parameters()
        if isinstance(trainer.strategy, FSDPStrategy):
            self._sharded = pl_module
            if self._full is not None:
                self.shadow = self._shard(self._full)
        self._full = None
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
        guard = find_guard(trainer)
        if (guard is not None and guard.step_skipped) or step % self.every_n_steps:
            return
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        params = pl_module.ema_parameters()
        # One multi-tensor kernel, in place, instead of a Python loop over hundreds of tensors.
        torch._foreach_lerp_(list(self.shadow.values()), [params[n].detach() for n in self.shadow], 1 - decay)

    def state_dict(self) -> dict:
        shadow = self._gather() if self._sharded is not None else self.shadow
        return {"shadow": shadow, "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state_dict: dict) -> None:
        self.shadow = dict(state_dict["shadow"])
        self.updates = int(state_dict["updates"])
        self._full = self.shadow  # sharded at on_train_start when the run trains under FSDP

    def _gather(self) -> dict[str, torch.Tensor]:
        """The whole average on rank 0 (on the CPU), named as without FSDP; {} on the other ranks. Every rank
        takes part (FSDP's full state dict is a collective), as every rank builds the checkpoint."""
        pl_module = self._sharded
        root = pl_module.trainer.strategy.model
        # On GPUs, gathered onto rank 0 alone and moved to the CPU unit by unit; on the CPU, where torch's FSDP
        # offloading has nowhere to move it (and crashes), every rank gathers it.
        on_gpu = root.compute_device.type == "cuda"
        config = FullStateDictConfig(offload_to_cpu=on_gpu, rank0_only=on_gpu)
        with (
            self.swapped(pl_module),
            FullyShardedDataParallel.state_dict_type(root, StateDictType.FULL_STATE_DICT, config),
        ):
            full = root.state_dict()
        if not pl_module.trainer.is_global_zero:
            return {}
        names = (unwrapped_name(n) for n in self.shadow)
        return {name: full[f"model.{name}"] for name in names if f"model.{name}" in full}

    def _shard(self, full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This rank's shard of a whole average: loaded into the weights through FSDP's full state dict, read
        back, and the live weights put back."""
        pl_module = self._sharded
        root = pl_module.trainer.strategy.model
        params = pl_module.ema_parameters()
        live = {n: p.detach().clone() for n, p in params.items()}
        config = FullStateDictConfig(offload_to_cpu=False, rank0_only=False)
        with torch.no_grad(), FullyShardedDataParallel.state_dict_type(root, StateDictType.FULL_STATE_DICT, config):
            root.load_state_dict({f"model.{n}": t for n, t in full.items()}, strict=False)
        shadow = {n: p.detach().clone() for n, p in params.items() if unwrapped_name(n) in full}
        with torch.no_grad():
            for name, value in live.items():
                params[name].copy_(value)
        return shadow

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


def find_ema(trainer: pl.Trainer) -> EMA | None:
    return next((c for c in trainer.callbacks if isinstance(c, EMA)), None)
