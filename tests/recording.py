"""A callback that records what a training run in another process did, step by step, for tests to read:
`+callbacks.record._target_=tests.recording.RecordSteps +callbacks.record.out=<folder>`."""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
import torch


def trainable(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in module.named_parameters() if p.requires_grad}


class RecordSteps(pl.Callback):
    """Per micro-batch: its sample keys, random draws (timesteps, noise, the standard normal of the posterior
    draw, the caption-dropout mask), the step and EMA counters; the trainable weights after each optimizer
    step; the EMA shadow at the end. Written to `<out>/rank<r>.pt`. `poison=[rank, micro-batch]` makes that
    micro-batch's loss NaN on that rank alone."""

    def __init__(self, out: str, poison: list[int] | None = None) -> None:
        self.out = Path(out)
        self.poison = list(poison) if poison is not None else None
        self.records: list[dict] = []
        self.weights: dict[int, dict] = {}
        self.current: dict = {}
        self.micro_batch = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.weights[trainer.global_step] = trainable(pl_module.model)
        model = pl_module.model
        diffusion = model.diffusion
        add_noise, sample_latents = diffusion.scheduler.add_noise, diffusion.sample_latents
        dropout_mask, losses = model.caption_dropout_mask, model.losses

        def recorded_noise(latents, noise, timesteps):
            self.current |= {"noise": noise.detach().cpu(), "timesteps": timesteps.cpu()}
            return add_noise(latents, noise, timesteps)

        def recorded_draw(mean, std, generator=None):
            latents = sample_latents(mean, std, generator)
            self.current["posterior_noise"] = ((latents / diffusion.scaling_factor - mean) / std).cpu()
            return latents

        def recorded_mask(batch, device):
            mask = dropout_mask(batch, device)
            self.current["dropped"] = mask.cpu()
            return mask

        def poisoned(batch, stage, batch_idx=0, **kwargs):
            out = losses(batch, stage, batch_idx, **kwargs)
            if stage == "train" and self.poison == [trainer.global_rank, self.micro_batch]:
                out = {k: v * float("nan") for k, v in out.items()}
            return out

        diffusion.scheduler.add_noise, diffusion.sample_latents = recorded_noise, recorded_draw
        model.caption_dropout_mask, model.losses = recorded_mask, poisoned

    def on_train_batch_start(self, trainer, pl_module, batch: dict, batch_idx: int) -> None:
        self.current = {"keys": list(batch["keys"])}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self.current |= {"global_step": trainer.global_step, "ema_updates": _ema(trainer).updates}
        self.records.append(self.current)
        self.micro_batch += 1
        if trainer.global_step not in self.weights:
            self.weights[trainer.global_step] = trainable(pl_module.model)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        ema = _ema(trainer)
        conv = pl_module.model.diffusion.unet.conv_in.weight
        state = {
            "records": self.records,
            "weights": self.weights,
            "ema": {k: v.cpu() for k, v in ema.shadow.items()},
            "ema_updates": ema.updates,
            "unet_channels_last": conv.is_contiguous(memory_format=torch.channels_last),
        }
        self.out.mkdir(parents=True, exist_ok=True)
        torch.save(state, self.out / f"rank{trainer.global_rank}.pt")


def _ema(trainer: pl.Trainer):
    return next(c for c in trainer.callbacks if type(c).__name__ == "EMA")


class FinalWeights(pl.Callback):
    """Any recipe: its plain model's trainable weights when training starts and when it ends, the step count
    and the EMA's update count, written to `<out>/rank<r>.pt`."""

    def __init__(self, out: str) -> None:
        self.out = Path(out)
        self.first: dict[str, torch.Tensor] = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.first = trainable(pl_module.model)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        state = {
            "first": self.first,
            "last": trainable(pl_module.model),
            "global_step": trainer.global_step,
            "ema_updates": _ema(trainer).updates,
        }
        self.out.mkdir(parents=True, exist_ok=True)
        torch.save(state, self.out / f"rank{trainer.global_rank}.pt")


class FailOnRank(pl.Callback):
    """Raises on one rank as training starts, after the ranks have met (a rank that breaks mid-run)."""

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_rank == self.rank:
            raise RuntimeError(f"rank {self.rank} breaks on purpose")


class OptimizerGroups(pl.Callback):
    """Saves, per rank, each optimizer group's weight decay and the names of its parameters (as the model
    names them before any wrapping) to `<out>/rank<r>.pt`."""

    def __init__(self, out: str) -> None:
        self.out = Path(out)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from capdiff.distributed import unwrapped_name

        names = {id(p): unwrapped_name(n) for n, p in pl_module.model.named_parameters()}
        groups = {
            g["name"]: (g["weight_decay"], sorted(names[id(p)] for p in g["params"]))
            for g in trainer.optimizers[0].param_groups
        }
        self.out.mkdir(parents=True, exist_ok=True)
        torch.save(groups, self.out / f"rank{trainer.global_rank}.pt")
