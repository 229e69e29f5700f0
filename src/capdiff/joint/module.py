"""The LightningModule of the joint recipe: training and validation steps, logging and the optimizer around a
`JointModel`. What the steps share with other recipes lives in `capdiff.training` (optimizer and schedule,
EMA, non-finite steps, samples) and `capdiff.checkpoints` (what a checkpoint carries, resuming)."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch

from capdiff.checkpoints.portable import describe_parts
from capdiff.checkpoints.resume import CheckpointHooks
from capdiff.data.skips import log_skipped
from capdiff.distributed import gather_rows, seed_for_rank
from capdiff.evaluation.validation import log_validation_losses
from capdiff.joint.model import JointModel
from capdiff.joint.spec import JointSpec, Optim, parse
from capdiff.models.compatibility import check_parts
from capdiff.models.connectors import check_connector
from capdiff.training.optimization import apply_freezing, build_optimizer, clip_gradients, trained_parameters


class JointModule(CheckpointHooks, pl.LightningModule):
    """`model.*` of the config: the joint model's keys (`capdiff.joint.spec.JointSpec`) and `optim`
    (`capdiff.joint.spec.Optim`); an unknown key fails naming the valid ones."""

    describe = staticmethod(describe_parts)  # every part's config and the tokenizer: the checkpoint loads anywhere

    def __init__(self, optim: dict | None = None, **model: Any) -> None:
        super().__init__()
        self.save_hyperparameters()
        spec, self.optim = self.parse_config({"optim": optim, **model})
        self.model = JointModel(spec)
        apply_freezing(self.model)
        compile_spec = spec.speed.compile
        options = {k: v for k, v in vars(compile_spec).items() if k not in ("unet", "llm") and v is not None}
        # in place (`Module.compile`), so checkpoint keys stay the same with and without it
        if compile_spec.unet and self.model.diffusion is not None:
            self.model.diffusion.unet.compile(**options)
        if compile_spec.llm:
            self.model.llm.lm.compile(**options)

    @staticmethod
    def parse_config(model: dict) -> tuple[JointSpec, Optim]:
        """The `model` config as the joint model's spec and the optimizer settings."""
        model = {k: v for k, v in model.items() if k != "_target_"}
        spec = parse(JointSpec, {k: v for k, v in model.items() if k != "optim"}, "model")
        check_connector(spec.conditioner.connector)
        return spec, parse(Optim, model.get("optim"), "model.optim")

    @classmethod
    def check_config(cls, model: dict) -> None:
        """What `train.py` checks before any work: every key known, every pretrained part found (config files
        only) and the parts' sizes fitting together."""
        spec, _ = cls.parse_config(model)
        check_parts(model, spec.image_size)

    def setup(self, stage: str) -> None:
        if stage != "fit":
            return
        # Lightning leaves every module in the mode it had, and from_pretrained hands a part over in eval mode:
        # trained parts to training mode, frozen ones to eval (`JointModel.train`), before anything runs them.
        self.train()
        # Before the strategy moves and wraps the model: DDP builds its gradient buckets from the parameters'
        # layout, and a layout changed after that costs a copy per bucket every step.
        self.use_channels_last(self.trainer.strategy.root_device)
        # Each weight's own number of dimensions, read before FSDP flattens it (it then sees 1-D shards): which
        # weights get weight decay.
        self.param_ndims = {name: param.ndim for name, param in self.model.named_parameters()}

    def use_channels_last(self, device: torch.device | str) -> None:
        """The UNet in channels_last memory format when `model.speed.channels_last` says so for `device`: it
        speeds convolutions up on GPUs (tensor cores) and slows them down on CPUs (docs/benchmarks.md)."""
        wanted = self.model.spec.speed.channels_last
        diffusion = self.model.diffusion
        if diffusion is not None and (wanted is True or (wanted == "auto" and torch.device(device).type == "cuda")):
            diffusion.unet.to(memory_format=torch.channels_last)
            diffusion.channels_last = True

    def on_train_start(self) -> None:
        # seed_everything gave every rank the same generator: noise, timesteps, posterior draws and dropout
        # masks would repeat on every rank. Offset by the global rank once the model is built (as open_clip
        # does), and by the step a resumed run starts at, so it does not repeat the draws of step 0; the data
        # order has its own generators (capdiff.data.streams) and does not change.
        seed_for_rank(self.global_rank, self.global_step * self.trainer.world_size)

    def ema_parameters(self) -> dict[str, torch.nn.Parameter]:
        """What the EMA callback averages, named as in the plain model (`capdiff.checkpoints.portable`)."""
        return trained_parameters(self.model)

    # ------------------------------------------------------------------ steps
    def training_step(self, batch: dict, batch_idx: int) -> dict[str, torch.Tensor]:
        out = self.model.losses(batch, "train", batch_idx, gather=gather_rows(self))
        size = batch["pixels"].shape[0]
        for name, value in out.items():
            self.log(f"train/{name}", value, on_step=True, on_epoch=False, prog_bar=name == "loss", batch_size=size)
        if self.model.logit_scale is not None:
            self.log("train/logit_scale", self.model.logit_scale(), on_step=True, batch_size=size)
        log_skipped(self, "train")
        return out

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        losses = self.model.losses(batch, "val", batch_idx)
        if not batch.get("padding"):  # a repeated batch that keeps the ranks in step under FSDP (EvenBatches)
            log_validation_losses(self, losses, batch)

    def on_validation_epoch_end(self) -> None:
        log_skipped(self, "val")

    # -------------------------------------------------------------- optimizer
    def configure_optimizers(self) -> dict[str, Any]:
        return build_optimizer(self.model, self.optim, self._trainer, getattr(self, "param_ndims", None))

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        self.model.after_optimizer_step()

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        clip_gradients(self, optimizer, gradient_clip_val, gradient_clip_algorithm)
