"""FSDP on CPU processes over gloo, for tests: `trainer.strategy._target_=tests.fsdp_cpu.fsdp`.

Lightning runs FSDPStrategy only on CUDA: it refuses the class itself on a CPU accelerator, and wraps with
the root device's index as `device_id`, which is None on the CPU and which torch's FSDP then refuses. A
subclass is not refused, and this one wraps with `device_id=cpu`; everything else is Lightning's strategy
with capdiff's options (`capdiff.strategies.fsdp_options`)."""

from __future__ import annotations

import torch
from pytorch_lightning.strategies import FSDPStrategy
from pytorch_lightning.strategies.fsdp import _setup_activation_checkpointing
from torch.distributed.fsdp import FullyShardedDataParallel

from capdiff.strategies import fsdp_options


class CPUFSDPStrategy(FSDPStrategy):
    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
            return super()._setup_model(model)
        model = FullyShardedDataParallel(
            module=model,
            cpu_offload=self.cpu_offload,
            mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy,
            device_id=torch.device("cpu"),
            **self.kwargs,
        )
        _setup_activation_checkpointing(model, self._activation_checkpointing_kwargs)
        return model


def fsdp(**options) -> CPUFSDPStrategy:
    return CPUFSDPStrategy(**fsdp_options(**options))
