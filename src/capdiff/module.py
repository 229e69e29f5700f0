"""The JointModule: one LightningModule that trains the captioner, the latent DDIM UNet and the contrastive
alignment together (README "The model").

loss = λ_diff·L_diff + λ_cap·L_cap + λ_con·L_con from `model.loss.weights`. A term with weight 0 is not
computed, and the parts only it uses are not built (or, when shared, are frozen), so they get no optimizer state.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.enums import GradClipAlgorithmType
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel

from capdiff.data.transforms import as_unit
from capdiff.losses import caption_loss, contrastive_loss
from capdiff.models.compatibility import check_dimensions, latent_size
from capdiff.models.conditioner import TextConditioner
from capdiff.models.contrastive import LogitScale
from capdiff.models.diffusion import LatentDiffusion, build_unet, build_vae
from capdiff.models.language import LanguageModel
from capdiff.models.lora import add_lora, freeze
from capdiff.models.tokenizer import load_tokenizer
from capdiff.models.vision import VisionEncoder
from capdiff.portable import PARTS_KEY, describe_parts
from capdiff.ranks import seed_for_rank
from capdiff.sampling import ddim_sample

TERMS = ("diffusion", "caption", "contrastive")
log = logging.getLogger(__name__)


class JointModule(pl.LightningModule):
    def __init__(
        self,
        llm: dict,
        unet: dict,
        vae: dict,
        vision: dict | None = None,
        conditioner: dict | None = None,
        diffusion: dict | None = None,
        contrastive: dict | None = None,
        loss: dict | None = None,
        optim: dict | None = None,
        image_size: int = 32,
        caption_dropout: float = 0.1,
        speed: dict | None = None,
        nonfinite: dict | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        weights = {t: float(((loss or {}).get("weights") or {}).get(t, 0.0)) for t in TERMS}
        if not any(weights.values()):
            raise ValueError("model.loss.weights are all 0: give at least one of diffusion, caption, contrastive.")
        self.weights = weights
        self.caption_dropout = caption_dropout
        self.optim = dict(optim or {})
        self.speed = {"channels_last": "auto", "compile": {}} | dict(speed or {})
        self.nonfinite = {"max_skips": 10, "checkpoint": True} | dict(nonfinite or {})
        self.skipped_steps = 0
        self._nonfinite_terms: str | None = None  # set by a non-finite micro-batch: its optimizer step is skipped
        self.step_skipped = False  # whether the last optimizer step was skipped (the EMA callback reads it)
        self._parts_record: dict | None = None  # what checkpoints carry to rebuild the model (on_save_checkpoint)
        contrastive = dict(contrastive or {})
        embed_dim = int(contrastive.get("embed_dim", 256))

        if not (llm.get("tokenizer") or llm.get("name_or_path")):
            raise ValueError(
                "model.llm.tokenizer and model.llm.name_or_path are both null: name a pretrained LLM, or build the "
                "tiny preset through train.py (capdiff.train.build_model), which makes its tokenizer from the data."
            )
        tokenizer_key = "model.llm.tokenizer" if llm.get("tokenizer") else "model.llm.name_or_path"
        tokenizer = load_tokenizer(llm.get("tokenizer") or llm["name_or_path"], tokenizer_key)
        self.llm = LanguageModel.build(
            llm.get("name_or_path"),
            llm.get("config"),
            tokenizer,
            prompt=llm.get("prompt", ""),
            max_tokens=int(llm.get("max_tokens", 48)),
        )
        _configure_part(self.llm.lm, llm, "model.llm", checkpointing=lambda m: m.gradient_checkpointing_enable())

        self.vision = None
        if weights["caption"] or weights["contrastive"]:
            vision = dict(vision or {})
            self.vision = VisionEncoder.build(
                vision.get("name_or_path"),
                vision.get("config"),
                llm_dim=self.llm.hidden_size,
                embed_dim=embed_dim,
                **(vision.get("resampler") or {}),
            )
            if vision.get("freeze"):
                freeze(self.vision.tower)
            check_positions(self.llm, self.vision.num_tokens)

        self.diffusion = None
        cross_dim = self.llm.hidden_size
        if weights["diffusion"]:
            autoencoder = build_vae(vae.get("name_or_path"), vae.get("config"))
            size = latent_size(autoencoder.config, image_size)
            net = build_unet(unet.get("name_or_path"), unet.get("config"), size)
            check_dimensions(
                net.config,
                autoencoder.config,
                image_size,
                self.llm.hidden_size,
                conditioner or {},
                unet.get("name_or_path"),
            )
            self.diffusion = LatentDiffusion(net, autoencoder, latent_size=size, **(diffusion or {}))
            _configure_part(net, unet, "model.unet", checkpointing=lambda m: m.enable_gradient_checkpointing())
            cross_dim = net.config.cross_attention_dim

        self.conditioner = None
        if weights["diffusion"] or weights["contrastive"]:
            options = {k: v for k, v in (conditioner or {}).items() if k in ("hidden", "pool", "diffusion_grad")}
            self.conditioner = TextConditioner(self.llm.hidden_size, cross_dim, embed_dim, **options)
        self.logit_scale = None
        if weights["contrastive"]:
            self.logit_scale = LogitScale(
                contrastive.get("init_temperature", 0.07), contrastive.get("max_logit_scale", 100.0)
            )
        self._freeze_unused()
        self._compile(self.speed.get("compile") or {})

    # ----------------------------------------------------------------- parts
    def _compile(self, spec: dict) -> None:
        """`model.speed.compile.{unet,llm}`: torch.compile in place (`Module.compile`), so checkpoint keys stay
        the same with and without it."""
        options = {k: v for k, v in spec.items() if k not in ("unet", "llm") and v is not None}
        if spec.get("unet") and self.diffusion is not None:
            self.diffusion.unet.compile(**options)
        if spec.get("llm"):
            self.llm.lm.compile(**options)

    def setup(self, stage: str) -> None:
        if stage != "fit":
            return
        # Lightning leaves every module in the mode it had, and from_pretrained hands a part over in eval mode:
        # trained parts to training mode, frozen ones to eval (`train`), before anything reports or runs them.
        self.train()
        # Before the strategy moves and wraps the model: DDP builds its gradient buckets from the parameters'
        # layout, and a layout changed after that costs a copy per bucket every step.
        self.use_channels_last(self.trainer.strategy.root_device)

    def use_channels_last(self, device: torch.device | str) -> None:
        """The UNet in channels_last memory format when `model.speed.channels_last` says so for `device`: it
        speeds convolutions up on GPUs (tensor cores); on 2 CPU cores it measured 3% slower."""
        wanted = self.speed.get("channels_last")
        on_gpu = torch.device(device).type == "cuda"
        if self.diffusion is not None and (wanted is True or (wanted == "auto" and on_gpu)):
            self.diffusion.unet.to(memory_format=torch.channels_last)
            self.diffusion.channels_last = True

    def on_train_start(self) -> None:
        # seed_everything gave every rank the same generator: noise, timesteps, posterior draws and dropout
        # masks would repeat on every rank. Offset by the global rank once the model is built (as open_clip
        # does), and by the step a resumed run starts at, so it does not repeat the draws of step 0; the data
        # order has its own generators (capdiff.data.pipeline) and does not change.
        seed_for_rank(self.global_rank, self.global_step * self.trainer.world_size)

    def train(self, mode: bool = True) -> JointModule:
        """Training mode for the trained parts; a part with no trainable parameter (a frozen CLIP tower or
        GPT-2, the VAE) stays in eval mode, so it runs without dropout, as it was pretrained."""
        super().train(mode)
        if mode:
            for part in self._parts():
                if not any(p.requires_grad for p in part.parameters()):
                    part.eval()
        return self

    def _parts(self) -> list[nn.Module]:
        parts = [self.llm.lm, self.conditioner, self.logit_scale]
        if self.vision is not None:
            parts += [self.vision.tower, self.vision]
        if self.diffusion is not None:
            parts += [self.diffusion.unet, self.diffusion.vae]
        return [p for p in parts if p is not None]

    def _freeze_unused(self) -> None:
        """Parameters no active term reaches stay out of the optimizer (and out of DDP's gradient sync)."""
        if self.vision is not None and not self.weights["caption"]:
            freeze(self.vision.to_prefix)
        if self.vision is not None and not self.weights["contrastive"]:
            freeze(self.vision.to_embed)
        if self.conditioner is not None and not self.weights["contrastive"]:
            freeze(self.conditioner.to_embed)
        if self.conditioner is not None and not self.weights["diffusion"]:
            freeze(self.conditioner.connector)
        llm_grad = self.conditioner is not None and self.conditioner.diffusion_grad and self.weights["diffusion"]
        if not (self.weights["caption"] or self.weights["contrastive"] or llm_grad):
            freeze(self.llm.lm)  # only read: the UNet's condition does not train it (model.conditioner.diffusion_grad)
        if not self.weights["caption"]:
            head = self.llm.lm.get_output_embeddings()
            if head is not None and head.weight is not self.llm.lm.get_input_embeddings().weight:
                freeze(head)

    def param_groups(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """Trainable parameters by part: `llm`, `vision` (tower + resampler), `heads`, `unet`."""
        groups: dict[str, list] = {"llm": [], "vision": [], "heads": [], "unet": []}
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            if name.startswith("llm."):
                groups["llm"].append((name, param))
            elif name.startswith(("vision.tower.", "vision.resampler.")):
                groups["vision"].append((name, param))
            elif name.startswith("diffusion.unet."):
                groups["unet"].append((name, param))
            else:
                groups["heads"].append((name, param))
        return {k: v for k, v in groups.items() if v}

    def ema_parameters(self) -> dict[str, nn.Parameter]:
        """What the EMA callback averages: every trained parameter. Sampling reads the LLM (the text pass),
        the connector and the UNet, captioning the vision side and the LLM: averaging them all keeps the two
        directions of one checkpoint consistent."""
        return {n: p for n, p in self.named_parameters() if p.requires_grad}

    # ------------------------------------------------------------------ steps
    def _condition(self, captions: list[str], embed: bool) -> dict[str, torch.Tensor]:
        text = self.llm.text_hidden(captions)
        return self.conditioner(text["hidden"], text["mask"], embed=embed)

    def empty_condition(self, length: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The fixed empty-prompt condition (classifier-free guidance), padded to `length` tokens."""
        empty = self._condition([""], embed=False)
        cond = torch.zeros(batch, length, empty["cond"].shape[-1], device=self.device, dtype=empty["cond"].dtype)
        cond = cond + nn.functional.pad(empty["cond"], (0, 0, 0, length - empty["cond"].shape[1]))
        mask = torch.zeros(batch, length, dtype=torch.long, device=self.device)
        mask[:, : empty["cond_mask"].shape[1]] = 1
        return cond, mask

    def caption_dropout_mask(self, batch: int, device: torch.device) -> torch.Tensor:
        """Which captions of a training batch become the empty prompt (`model.caption_dropout`)."""
        return torch.rand(batch, device=device) < self.caption_dropout

    def _drop_captions(self, cond: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.caption_dropout:
            return cond, mask
        drop = self.caption_dropout_mask(cond.shape[0], cond.device)
        # The empty prompt's LLM pass runs whether or not this rank drew a drop: the ranks draw differently, and
        # under FSDP every forward is a collective that every rank must make.
        empty, empty_mask = self.empty_condition(cond.shape[1], cond.shape[0])
        return torch.where(drop[:, None, None], empty, cond), torch.where(drop[:, None], empty_mask, mask)

    def losses(self, batch: dict, stage: str, batch_idx: int = 0) -> dict[str, torch.Tensor]:
        """`{"<term>_loss": ...}` for every active term, and `loss`, their weighted sum."""
        pixels, captions = as_unit(batch["pixels"]), batch["captions"]
        out: dict[str, torch.Tensor] = {}
        vision = self.vision(pixels) if self.vision is not None else None
        if self.weights["caption"]:
            teacher = self.llm.caption_logits(vision["prefix"], captions)
            out["caption_loss"] = caption_loss(teacher["logits"], teacher["labels"])
        cond = self._condition(captions, embed=bool(self.weights["contrastive"])) if self.conditioner else None
        if self.weights["contrastive"]:
            out["contrastive_loss"] = contrastive_loss(
                vision["image_embed"], cond["text_embed"], self.logit_scale(), gather=stage == "train"
            )
        if self.weights["diffusion"]:
            if "latent_mean" in batch:  # cached by capdiff.data.cache_latents: the VAE does not run
                latents = self.diffusion.sample_latents(batch["latent_mean"], batch["latent_std"])
            else:
                latents = self.diffusion.encode(pixels)
            noise = timesteps = None
            if stage == "train":
                text, text_mask = self._drop_captions(cond["cond"], cond["cond_mask"])
            else:  # the same noise and timesteps at every validation, so the curve is comparable
                text, text_mask = cond["cond"], cond["cond_mask"]
                generator = torch.Generator().manual_seed(batch_idx)
                noise = torch.randn(latents.shape, generator=generator).to(latents)
                steps = self.diffusion.scheduler.config.num_train_timesteps
                timesteps = torch.randint(0, steps, (latents.shape[0],), generator=generator).to(latents.device)
            out["diffusion_loss"] = self.diffusion.loss(latents, text, text_mask, noise=noise, timesteps=timesteps)
        out["loss"] = sum(self.weights[name.removesuffix("_loss")] * value for name, value in out.items())
        return out

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        out = self.losses(batch, "train", batch_idx)
        size = batch["pixels"].shape[0]
        if not self._finite(out):
            # Its optimizer step is skipped (optimizer_step). The backward still runs, of a zero that reaches
            # every trained parameter: under DDP every rank must take part in each gradient all-reduce.
            return sum(p.sum() * 0.0 for p in self.parameters() if p.requires_grad)
        for name, value in out.items():
            self.log(f"train/{name}", value, on_step=True, on_epoch=False, prog_bar=name == "loss", batch_size=size)
        if self.logit_scale is not None:
            self.log("train/logit_scale", self.logit_scale(), on_step=True, batch_size=size)
        datamodule = getattr(self.trainer, "datamodule", None)
        for reason, count in (getattr(datamodule, "skipped", None) or {}).items():
            self.log(f"data/skipped_{reason}", float(count), on_step=True, reduce_fx="sum", batch_size=size)
        return out["loss"]

    def _finite(self, out: dict[str, torch.Tensor]) -> bool:
        """Whether the loss is finite on every rank (one decision for all); a non-finite one marks the current
        optimizer step (every micro-batch of it, under gradient accumulation) to be skipped."""
        finite = bool(torch.isfinite(out["loss"].detach()).item())
        if self._trainer is not None:
            finite = self.trainer.strategy.reduce_boolean_decision(finite, all=True)
        if not finite:
            self._nonfinite_terms = ", ".join(f"{k}={v.item():.4g}" for k, v in out.items() if k != "loss")
        return finite

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer, optimizer_closure=None) -> None:
        """One optimizer step, skipped whole when a micro-batch of it had a non-finite loss (its gradients,
        the earlier micro-batches' included, are dropped); then the logit scale is clamped as a parameter."""

        def closure():
            loss = optimizer_closure() if optimizer_closure is not None else None
            if self._nonfinite_terms is None:
                return loss
            # AdamW leaves parameters without gradients as they are; no loss tells a 16-mixed loss scaler that
            # there is nothing to step (it would fail on gradients it never saw).
            optimizer.zero_grad(set_to_none=True)
            return None

        optimizer.step(closure=closure)
        self.step_skipped = self._nonfinite_terms is not None
        if self.step_skipped:
            terms, self._nonfinite_terms = self._nonfinite_terms, None
            self._skip_nonfinite(terms)
        elif self.logit_scale is not None:
            self.logit_scale.clamp_()

    def _skip_nonfinite(self, terms: str) -> None:
        """A NaN/inf loss skips its step with a warning, up to `model.nonfinite.max_skips` times in a run; the
        next one saves `checkpoints/nonfinite-step<N>.ckpt` (the last finite weights) and stops the run."""
        self.skipped_steps += 1
        step = self.global_step
        if self.skipped_steps <= int(self.nonfinite["max_skips"]):
            log.warning(
                "step %d: non-finite loss (%s): step skipped (%d of model.nonfinite.max_skips=%d)",
                step,
                terms,
                self.skipped_steps,
                self.nonfinite["max_skips"],
            )
            self.log("train/skipped_nonfinite", float(self.skipped_steps), on_step=True, batch_size=1)
            return
        saved = ""
        if self.nonfinite.get("checkpoint") and self._trainer is not None:
            path = Path(self.trainer.default_root_dir) / "checkpoints" / f"nonfinite-step{step:06d}.ckpt"
            self.trainer.save_checkpoint(path)
            saved = f" The last finite weights are in {path}."
        raise FloatingPointError(
            f"step {step}: the loss was non-finite ({terms}); {self.skipped_steps} non-finite steps in this run are "
            f"more than model.nonfinite.max_skips={self.nonfinite['max_skips']}.{saved} Lower model.optim.lr, keep "
            "trainer.gradient_clip_val on, or train in 32-true / bf16-mixed instead of 16-mixed; raise "
            "model.nonfinite.max_skips to tolerate more."
        )

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        out = self.losses(batch, "val", batch_idx)
        size = batch["pixels"].shape[0]
        for name, value in out.items():
            self.log(f"val/{name}", value, on_epoch=True, sync_dist=True, prog_bar=name == "loss", batch_size=size)

    # ------------------------------------------------------------------ resume
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        repair_epoch_progress(checkpoint)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Every part's config and the tokenizer's files, so the checkpoint loads anywhere (capdiff.portable);
        # they do not change during a run, so they are gathered (the tokenizer written out and read back) once.
        if self._parts_record is None:
            self._parts_record = describe_parts(self)
        checkpoint[PARTS_KEY] = self._parts_record

    # -------------------------------------------------------------- optimizer
    def configure_optimizers(self) -> dict[str, Any]:
        base = {"lr": 3e-4, "weight_decay": 0.01, "betas": (0.9, 0.999), "warmup_steps": 100, "min_lr_ratio": 0.1}
        optim = base | {k: v for k, v in self.optim.items() if k != "groups"}
        per_group = self.optim.get("groups") or {}
        groups = []
        for part, named in self.param_groups().items():
            settings = {"lr": optim["lr"], "weight_decay": optim["weight_decay"]} | (per_group.get(part) or {})
            decay = [p for n, p in named if p.ndim >= 2]
            no_decay = [p for n, p in named if p.ndim < 2]
            groups.append({"params": decay, "name": part, **settings})
            if no_decay:
                groups.append(
                    {"params": no_decay, "name": f"{part}_no_decay", "lr": settings["lr"], "weight_decay": 0.0}
                )
        # Fused AdamW: one kernel for all parameters. On 2 CPU cores it took the tiny preset's optimizer step
        # from 23 ms to 5 ms (the default, per-parameter loop is what torch picks on CPU). Not under 16-mixed:
        # its loss scaler would hand the fused kernel scaled gradients that clipping cannot see unscaled.
        fused = optim.get("fused")
        scaled = self._trainer is not None and getattr(self.trainer.precision_plugin, "scaler", None) is not None
        fused = self.device.type in ("cuda", "cpu") and not scaled if fused in (None, "auto") else bool(fused)
        optimizer = torch.optim.AdamW(groups, betas=tuple(optim["betas"]), fused=fused)

        def total() -> int:
            return max(1, int(self.trainer.estimated_stepping_batches)) if self._trainer else 1

        schedule = warmup_cosine(int(optim["warmup_steps"]), total, float(optim["min_lr_ratio"]))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """`trainer.gradient_clip_val`, on every strategy and precision capdiff runs: FSDP clips by the norm
        over every rank's shards (its root module's `clip_grad_norm_`; Lightning's FSDP plugin refuses norm
        clipping); without a loss scaler (32-true, bf16-mixed) the gradients are the true ones and are clipped
        directly, fused AdamW included (Lightning's mixed-precision plugin refuses any fused optimizer)."""
        if not gradient_clip_val:
            return
        by_value = gradient_clip_algorithm == GradClipAlgorithmType.VALUE
        root = self.trainer.strategy.model
        if isinstance(root, FullyShardedDataParallel) and not by_value:
            root.clip_grad_norm_(gradient_clip_val)
        elif getattr(self.trainer.precision_plugin, "scaler", None) is None:
            params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            clip = nn.utils.clip_grad_value_ if by_value else nn.utils.clip_grad_norm_
            clip(params, gradient_clip_val)
        else:
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    # ------------------------------------------------------------------- use
    @torch.no_grad()
    def caption(self, pixels: torch.Tensor, **generate_kwargs) -> list[str]:
        if self.vision is None:
            raise RuntimeError("this model was trained without the captioner (model.loss.weights.caption=0).")
        return self.llm.generate(self.vision(as_unit(pixels.to(self.device)))["prefix"], **generate_kwargs)

    @torch.no_grad()
    def generate(
        self,
        prompts: list[str],
        steps: int = 50,
        guidance_scale: float = 4.0,
        eta: float = 0.0,
        seed: int = 0,
        seeds: list[int] | None = None,
        latents: torch.Tensor | None = None,
        strength: float = 1.0,
        guidance_rescale: float | None = None,
    ) -> torch.Tensor:
        """Images in `[-1, 1]` for `prompts` by DDIM with classifier-free guidance; image i starts from the
        noise of `seeds[i]` (default `seed + i`), or from `latents` (see `capdiff.sampling.ddim_sample`)."""
        if self.diffusion is None:
            raise RuntimeError("this model was trained without the UNet (model.loss.weights.diffusion=0).")
        cond = self._condition(prompts, embed=False)
        empty, empty_mask = self.empty_condition(cond["cond"].shape[1], len(prompts))
        latents = ddim_sample(
            self.diffusion,
            cond["cond"],
            cond["cond_mask"],
            empty,
            empty_mask,
            steps=steps,
            guidance_scale=guidance_scale,
            eta=eta,
            seed=seed,
            seeds=seeds,
            latents=latents,
            strength=strength,
            guidance_rescale=guidance_rescale,
        )
        return self.diffusion.decode(latents)

    @torch.no_grad()
    def condition(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """The UNet's text condition for `prompts`: `cond` (B×L×D) and `cond_mask`."""
        return self._condition(prompts, embed=False)


def repair_epoch_progress(checkpoint: dict[str, Any]) -> None:
    """Puts back the epoch counters of a checkpoint written by a run that was itself resumed from a checkpoint
    of an epoch's last batch (Lightning 2.6 then skips `ready`/`started` for the next epoch, so they lag one
    behind). Lightning reads such a checkpoint as an epoch boundary and trains its epoch again from the start:
    a run killed and resumed a few times ended 4 steps (one epoch) past its plan. Runs before module hooks
    restore the loops (`_restore_modules_and_callbacks`); a consistent checkpoint is left as it is.
    """
    loop = (checkpoint.get("loops") or {}).get("fit_loop") or {}
    epochs, batches = loop.get("epoch_progress"), loop.get("epoch_loop.batch_progress")
    if not epochs or not batches:
        return
    done = batches["current"]
    # saved inside an epoch: after a batch (or a validation in mid-epoch), not after the run's last epoch
    finished = done["completed"] == done["ready"] and batches.get("is_last_batch")
    current = epochs["current"]
    inside_epoch = done["ready"] > 0 and not finished and current["processed"] == current["completed"]
    for counts in (epochs["current"], epochs["total"]):
        # inside an epoch: ready = started = processed + 1; after it (saved at its end): = processed
        expected = counts["processed"] + (1 if inside_epoch else 0)
        if counts["ready"] == counts["started"] == expected - 1:
            counts["ready"] = counts["started"] = expected


def warmup_cosine(warmup: int, total: int | Callable[[], int], min_ratio: float):
    """Linear warm-up to the base LR, then a cosine decay to `min_ratio` of it at the last step.

    `total` may be a function, called once, when the decay starts: a Lightning run's length
    (`trainer.estimated_stepping_batches`) must not be read in `configure_optimizers`, where it would build the
    train loader before a resumed run's checkpoint is restored, so that loader would start at epoch 0.
    """
    known: list[int] = []

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if step == warmup:
            return 1.0  # the top of the cosine, whatever the length
        if not known:
            known.append(total() if callable(total) else total)
        progress = min(1.0, (step - warmup) / max(1, known[0] - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def _configure_part(model: nn.Module, spec: dict, key: str, checkpointing) -> None:
    lora = spec.get("lora") or {}
    if lora.get("enabled"):
        add_lora(
            model,
            int(lora.get("r", 8)),
            float(lora.get("alpha", 16)),
            float(lora.get("dropout", 0.0)),
            list(lora.get("target_modules") or []),
            f"{key}.lora",
        )
    elif spec.get("freeze"):
        freeze(model)
    if spec.get("gradient_checkpointing"):
        checkpointing(model)


def check_positions(llm: LanguageModel, prefix: int) -> None:
    """The caption sequence (prefix + prompt + caption) must fit the LLM's position table."""
    positions = getattr(llm.lm.config, "max_position_embeddings", None)
    needed = prefix + len(llm.prompt_ids) + llm.max_tokens
    if positions is not None and needed > positions:
        raise ValueError(
            f"the image prefix ({prefix} tokens: model.vision.resampler.num_queries + model.vision.resampler.grid²)"
            f" + the prompt ({len(llm.prompt_ids)} tokens) + model.llm.max_tokens={llm.max_tokens} = {needed} "
            f"exceeds the LLM's {positions} positions: set "
            f"model.llm.max_tokens={max(1, positions - prefix - len(llm.prompt_ids))} or use fewer prefix tokens."
        )
