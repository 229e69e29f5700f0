"""The LightningModule of the GAN baseline: DF-GAN's alternating discriminator and generator steps around a
`TextGAN`, with manual optimization (two Adam optimizers). Everything else is shared with the joint recipe: data,
EMA (of the generator and the text side, used for sampling), non-finite steps, sample grids, periodic
evaluation, checkpoints.

Lightning counts every optimizer step, so a batch advances `trainer.global_step` by 2 (`trainer.max_steps`
counts optimizer steps)."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch

from capdiff.checkpoints.portable import describe_gan_parts
from capdiff.checkpoints.resume import CheckpointHooks
from capdiff.data.skips import log_skipped
from capdiff.distributed import gather_rows, seed_for_rank
from capdiff.evaluation.validation import log_validation_losses
from capdiff.gan.model import TextGAN, text_spec
from capdiff.gan.spec import GANOptim, GANSpec
from capdiff.joint.spec import parse
from capdiff.models.compatibility import check_parts
from capdiff.models.lora import freeze
from capdiff.training.optimization import apply_freezing, trained_parameters


class GANModule(CheckpointHooks, pl.LightningModule):
    """`model.*` of `experiment=text_gan`: `capdiff.gan.spec.GANSpec`'s keys and `optim`
    (`capdiff.gan.spec.GANOptim`); an unknown key fails naming the valid ones."""

    describe = staticmethod(describe_gan_parts)
    text_key = "text"  # where the joint model config of the text side is (capdiff.artifacts derives its tokenizer)

    def __init__(self, optim: dict | None = None, **model: Any) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        spec, self.optim = self.parse_config({"optim": optim, **model})
        self.model = TextGAN(spec)
        apply_freezing(self.model.text)
        if not spec.text_weight:
            freeze(self.model.text)

    @staticmethod
    def parse_config(model: dict) -> tuple[GANSpec, GANOptim]:
        model = {k: v for k, v in model.items() if k not in ("_target_", "_recursive_")}
        spec = parse(GANSpec, {k: v for k, v in model.items() if k != "optim"}, "model")
        return spec, parse(GANOptim, model.get("optim"), "model.optim")

    @classmethod
    def check_config(cls, model: dict) -> None:
        """Every key known (the text side's too), its pretrained parts found and their sizes fitting."""
        spec, _ = cls.parse_config(model)
        text = text_spec(spec)
        check_parts(dict(spec.text) | {"loss": {"weights": vars(text.loss.weights)}}, spec.image_size)

    def setup(self, stage: str) -> None:
        if stage == "fit":
            self.train()

    def on_train_start(self) -> None:
        # each rank its own noise and dropout draws (as JointModule); the data order has its own generators
        seed_for_rank(self.global_rank, self.global_step * self.trainer.world_size)

    def ema_parameters(self) -> dict[str, torch.nn.Parameter]:
        """What sampling reads and training changes: the generator and the trained text side."""
        return {n: p for n, p in trained_parameters(self.model).items() if n.startswith(("generator.", "text."))}

    # ------------------------------------------------------------------ steps
    def training_step(self, batch: dict, batch_idx: int) -> dict[str, torch.Tensor]:
        generator_opt, discriminator_opt = self.optimizers()
        model, pixels = self.model, batch["pixels"]
        sentences = model.sentences(batch["captions"])
        fake = model.generator(model.noise(pixels.shape[0]), sentences.detach())

        d_out = model.discriminator_losses(pixels, fake, sentences)
        d_total = d_out["d_loss"]
        if model.spec.text_weight:
            d_out["contrastive_loss"] = model.text_loss(pixels, sentences, gather_rows(self))
            d_total = d_total + model.spec.text_weight * d_out["contrastive_loss"]
        discriminator_opt.zero_grad(set_to_none=True)
        self.manual_backward(d_total + self._untouched(model.generator))
        discriminator_opt.step()
        if model.spec.text_weight:
            model.text.after_optimizer_step()  # the contrastive temperature stays in its range

        g_out = model.generator_losses(fake, sentences)
        generator_opt.zero_grad(set_to_none=True)
        self.manual_backward(g_out["g_loss"] + self._untouched(model.text))
        generator_opt.step()

        out = {k: v.detach() for k, v in (d_out | g_out).items()}
        size = pixels.shape[0]
        for name, value in out.items():
            self.log(f"train/{name}", value, on_step=True, on_epoch=False, prog_bar=name in ("d_loss", "g_loss"),
                     batch_size=size)  # fmt: skip
        log_skipped(self, "train")
        return out

    def _untouched(self, part: torch.nn.Module) -> torch.Tensor | float:
        """A zero that reaches every trained parameter of `part`, which this backward does not otherwise reach:
        under DDP every trained parameter must take part in each gradient all-reduce (and no rank skips one)."""
        if self.trainer.world_size == 1:
            return 0.0
        return sum((p.sum() * 0.0 for p in part.parameters() if p.requires_grad), torch.zeros((), device=self.device))

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        log_validation_losses(self, self.model.losses(batch, "val", batch_idx), batch)

    def on_validation_epoch_end(self) -> None:
        log_skipped(self, "val")

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        o, model = self.optim, self.model
        betas = tuple(o.betas)
        trained = [p for p in model.generator.parameters() if p.requires_grad]
        generator = torch.optim.Adam(trained, lr=o.generator_lr, betas=betas, weight_decay=o.weight_decay)
        groups = [{"params": [*model.discriminator.parameters(), *model.head.parameters()], "lr": o.discriminator_lr}]
        text = [p for p in model.text.parameters() if p.requires_grad]
        if text:
            groups.append({"params": text, "lr": o.text_lr})
        discriminator = torch.optim.Adam(groups, betas=betas, weight_decay=o.weight_decay)
        return [generator, discriminator]
