"""The joint model: an LLM captioner and a latent DDIM UNet conditioned on the same LLM, tied by a cross-modal
contrastive loss. A plain `nn.Module` (no Lightning): training wraps it in `capdiff.joint.module.JointModule`,
inference uses it as it is (`capdiff.pipeline.Pipeline`).

loss = λ_diff·L_diff + λ_cap·L_cap + λ_con·L_con from `model.loss.weights`. A term with weight 0 is not
computed, and the parts only it uses are not built, so they cost neither memory nor optimizer state.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from capdiff.data.transforms import as_unit
from capdiff.joint.spec import JointSpec, parse
from capdiff.models.compatibility import check_dimensions, check_positions, latent_size
from capdiff.models.conditioner import TextConditioner
from capdiff.models.contrastive import LogitScale, contrastive_loss
from capdiff.models.diffusion import LatentDiffusion, build_unet, build_vae
from capdiff.models.language import LanguageModel, caption_loss
from capdiff.models.lora import add_lora
from capdiff.models.tokenizer import load_tokenizer
from capdiff.models.vision import VisionEncoder
from capdiff.samplers import DEFAULT_SAMPLER, DEFAULT_STEPS, check_sampler
from capdiff.sampling import sample

log = logging.getLogger(__name__)

TERMS = ("diffusion", "caption", "contrastive")


class JointModel(nn.Module):
    """Built from a `JointSpec` (`JointModel.from_config(dict)` checks a plain config first).

    Parts: `llm` (always: the captioner's decoder and the text encoder of the UNet's condition), `vision`
    (with the caption or contrastive term), `diffusion` (UNet + frozen VAE, with the diffusion term),
    `conditioner` (LLM states → cross-attention tokens and the text embedding), `logit_scale`."""

    def __init__(self, spec: JointSpec) -> None:
        super().__init__()
        self.spec = spec
        self.weights = {t: float(getattr(spec.loss.weights, t)) for t in TERMS}
        if not any(self.weights.values()):
            raise ValueError("model.loss.weights are all 0: give at least one of diffusion, caption, contrastive.")
        self.caption_dropout = spec.caption_dropout
        llm, embed_dim = spec.llm, spec.contrastive.embed_dim
        if not (llm.tokenizer or llm.name_or_path):
            raise ValueError(
                "model.llm.tokenizer and model.llm.name_or_path are both null: name a pretrained LLM, or build the "
                "tiny preset through train.py, which makes its tokenizer from the data (capdiff.artifacts)."
            )
        tokenizer_key = "model.llm.tokenizer" if llm.tokenizer else "model.llm.name_or_path"
        tokenizer = load_tokenizer(llm.tokenizer or llm.name_or_path, tokenizer_key)
        self.llm = LanguageModel.build(
            llm.name_or_path, llm.config, tokenizer, prompt=llm.prompt, max_tokens=llm.max_tokens
        )

        # Not reentrant, said explicitly (transformers 4.x defaults to reentrant): the text-only pass's input
        # embeddings of a frozen LLM need no gradient, and a reentrant checkpoint then cuts the LoRA adapters' off.
        def checkpointing(part: nn.Module) -> None:
            part.gradient_checkpointing_enable({"use_reentrant": False})

        _adapt(self.llm.lm, llm, "model.llm", checkpointing)

        self.vision = None
        if self.weights["caption"] or self.weights["contrastive"]:
            resampler = vars(spec.vision.resampler)
            self.vision = VisionEncoder.build(
                spec.vision.name_or_path,
                spec.vision.config,
                llm_dim=self.llm.hidden_size,
                embed_dim=embed_dim,
                **resampler,
            )
            # Not reentrant either: the pixels need no gradient.
            if spec.vision.gradient_checkpointing and spec.vision.freeze and not spec.vision.lora.enabled:
                log.warning(
                    "model.vision.gradient_checkpointing=true does nothing here: the tower is frozen without LoRA "
                    "(model.vision.freeze=true), so no gradient flows through it and its forward keeps no "
                    "activations for one. Leave it false, or enable model.vision.lora."
                )
            _adapt(self.vision.tower, spec.vision, "model.vision", checkpointing)
            check_positions(self.llm, self.vision.num_tokens)

        self.diffusion = None
        cross_dim = self.llm.hidden_size
        if self.weights["diffusion"]:
            autoencoder = build_vae(spec.vae.name_or_path, spec.vae.config)
            size = latent_size(autoencoder.config, spec.image_size)
            net = build_unet(spec.unet.name_or_path, spec.unet.config, size)
            check_dimensions(
                net.config,
                autoencoder.config,
                spec.image_size,
                self.llm.hidden_size,
                vars(spec.conditioner),
                spec.unet.name_or_path,
            )
            self.diffusion = LatentDiffusion(net, autoencoder, latent_size=size, **vars(spec.diffusion))
            _adapt(net, spec.unet, "model.unet", lambda m: m.enable_gradient_checkpointing())
            cross_dim = net.config.cross_attention_dim

        self.conditioner = None
        if self.weights["diffusion"] or self.weights["contrastive"]:
            c = spec.conditioner
            self.conditioner = TextConditioner(
                self.llm.hidden_size,
                cross_dim,
                embed_dim,
                connector=c.connector,
                num_layers=self.llm.num_layers,
                pool=c.pool,
                diffusion_grad=c.diffusion_grad,
                lexical=c.lexical and bool(self.weights["diffusion"]),  # only the UNet reads it
                vocab_size=len(self.llm.tokenizer),
            )
        self.logit_scale = None
        if self.weights["contrastive"]:
            self.logit_scale = LogitScale(spec.contrastive.init_temperature, spec.contrastive.max_logit_scale)

    @classmethod
    def from_config(cls, values: Any, key: str = "model") -> JointModel:
        """From a plain config (dict or DictConfig); an unknown key fails naming it and the valid ones."""
        return cls(parse(JointSpec, values, key))

    # ----------------------------------------------------------------- parts
    @property
    def image_size(self) -> int:
        return self.spec.image_size

    @property
    def device(self) -> torch.device:
        return self.llm.device

    @property
    def can_caption(self) -> bool:
        return self.vision is not None and bool(self.weights["caption"])

    @property
    def can_generate(self) -> bool:
        return self.diffusion is not None

    def parts(self) -> list[nn.Module]:
        """The pretrained-or-built parts, each of which is frozen or trained as a whole unit."""
        parts = [self.llm.lm, self.conditioner, self.logit_scale]
        if self.vision is not None:
            parts += [self.vision.tower, self.vision]
        if self.diffusion is not None:
            parts += [self.diffusion.unet, self.diffusion.vae]
        return [p for p in parts if p is not None]

    def train(self, mode: bool = True) -> JointModel:
        """Training mode for the trained parts; a part with no trainable parameter (a frozen CLIP tower or
        GPT-2, the VAE) stays in eval mode, so it runs without dropout, as it was pretrained."""
        super().train(mode)
        if mode:
            for part in self.parts():
                if not any(p.requires_grad for p in part.parameters()):
                    part.eval()
        return self

    # ----------------------------------------------------------------- text
    def encode_text(self, captions: list[str], embed: bool = False) -> dict[str, torch.Tensor]:
        """The text-only LLM pass through the conditioner: `cond` (B×L×D), `cond_mask`, and with `embed` the
        contrastive `text_embed`."""
        connector = self.conditioner.connector
        text = self.llm.text_hidden(captions, layers=connector.hidden_layers, queries=connector.query_tokens())
        return self.conditioner(text["layers"], text["hidden"], text["mask"], embed=embed, ids=text["ids"])

    def empty_condition(self, length: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The fixed empty-prompt condition (classifier-free guidance), padded to `length` tokens."""
        empty = self.encode_text([""])
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

    # ----------------------------------------------------------------- losses
    def losses(self, batch: dict, stage: str, batch_idx: int = 0, gather=None) -> dict[str, torch.Tensor]:
        """`{"<term>_loss": ...}` for every active term, and `loss`, their weighted sum. `stage="train"` draws
        noise, timesteps and caption dropout; any other stage uses the fixed draws of `batch_idx`, so
        validation curves are comparable. `gather`: the contrastive term's rows of every rank
        (`capdiff.distributed.gather_rows`)."""
        pixels, captions = as_unit(batch["pixels"]), batch["captions"]
        out: dict[str, torch.Tensor] = {}
        vision = self.vision(pixels) if self.vision is not None else None
        if self.weights["caption"]:
            # the captioner's own targets when the data gives them (data.captioner_caption_key)
            teacher_forced = self.llm.caption_logits(vision["prefix"], batch.get("caption_targets", captions))
            out["caption_loss"] = caption_loss(teacher_forced["logits"], teacher_forced["labels"])
        embed = bool(self.weights["contrastive"])
        cond = self.encode_text(captions, embed=embed) if self.conditioner is not None else None
        if embed:
            out["contrastive_loss"] = contrastive_loss(
                vision["image_embed"], cond["text_embed"], self.logit_scale(), gather=gather
            )
        if self.weights["diffusion"]:
            out["diffusion_loss"] = self._diffusion_loss(batch, pixels, cond, stage, batch_idx)
        out["loss"] = sum(self.weights[name.removesuffix("_loss")] * value for name, value in out.items())
        return out

    def _diffusion_loss(self, batch: dict, pixels, cond: dict, stage: str, batch_idx: int) -> torch.Tensor:
        if "latent_mean" in batch:  # cached by capdiff.data.cache_latents: the VAE does not run
            latents = self.diffusion.sample_latents(batch["latent_mean"], batch["latent_std"])
        else:
            latents = self.diffusion.encode(pixels)
        if stage == "train":
            text, text_mask = self._drop_captions(cond["cond"], cond["cond_mask"])
            return self.diffusion.loss(latents, text, text_mask)
        generator = torch.Generator().manual_seed(batch_idx)
        noise = torch.randn(latents.shape, generator=generator).to(latents)
        steps = self.diffusion.scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, steps, (latents.shape[0],), generator=generator).to(latents.device)
        return self.diffusion.loss(latents, cond["cond"], cond["cond_mask"], noise=noise, timesteps=timesteps)

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """Keeps the contrastive temperature in its range (a clamp of the parameter, as CLIP does)."""
        if self.logit_scale is not None:
            self.logit_scale.clamp_()

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
        steps: int = DEFAULT_STEPS,
        guidance_scale: float = 4.0,
        eta: float = 0.0,
        seed: int = 0,
        seeds: list[int] | None = None,
        latents: torch.Tensor | None = None,
        strength: float = 1.0,
        guidance_rescale: float | None = None,
        sampler: str = DEFAULT_SAMPLER,
    ) -> torch.Tensor:
        """Images in `[-1, 1]` for `prompts` by `sampler` (`capdiff.samplers`) with classifier-free guidance;
        image i starts from the noise of `seeds[i]` (default `seed + i`), or from `latents` (see
        `capdiff.sampling.sample`)."""
        if self.diffusion is None:
            raise RuntimeError("this model was trained without the UNet (model.loss.weights.diffusion=0).")
        check_sampler(sampler, zero_terminal_snr=self.diffusion.zero_terminal_snr)  # before the text is encoded
        cond = self.encode_text(prompts)
        empty, empty_mask = self.empty_condition(cond["cond"].shape[1], len(prompts))
        latents = sample(
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
            sampler=sampler,
        )
        return self.diffusion.decode(latents)

    @torch.no_grad()
    def condition(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """The UNet's text condition for `prompts`: `cond` (B×L×D) and `cond_mask`."""
        return self.encode_text(prompts)


def _adapt(model: nn.Module, spec, key: str, checkpointing) -> None:
    """LoRA adapters (which freeze the part's own weights) and gradient checkpointing, as `spec` asks."""
    lora = spec.lora
    if lora.enabled:
        add_lora(model, lora.r, lora.alpha, lora.dropout, list(lora.target_modules), f"{key}.lora")
    if spec.gradient_checkpointing:
        checkpointing(model)
