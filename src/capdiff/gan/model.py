"""The text-conditioned GAN baseline (DF-GAN, Tao et al., 2022) on capdiff's text encoder: a prompt goes through
the joint recipe's LLM text pass and conditioner to a sentence vector; the generator maps noise and that vector
to an image; the discriminator judges (image, sentence) pairs. A plain `nn.Module`: `capdiff.gan.module.GANModule`
trains it, `capdiff.pipeline.Pipeline` and `evaluate.py` use it as they use the joint model."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from capdiff.gan.losses import discriminator_hinge_loss, generator_hinge_loss, gradient_penalty_from_logits
from capdiff.gan.networks import Discriminator, Generator, PairHead
from capdiff.gan.spec import GANSpec
from capdiff.joint.model import JointModel
from capdiff.joint.spec import JointSpec, parse
from capdiff.models.contrastive import contrastive_loss

TEXT_ONLY = {"diffusion": 0.0, "caption": 0.0, "contrastive": 1.0}


def text_spec(spec: GANSpec) -> JointSpec:
    """The joint model config of the text side: its own LLM, tokenizer, conditioner and vision side, with the
    contrastive term alone (no UNet, no captioner) and the GAN's image size."""
    text = {k: v for k, v in dict(spec.text).items() if k not in ("_target_", "optim")}
    text = text | {"loss": {"weights": TEXT_ONLY}, "image_size": spec.image_size}
    return parse(JointSpec, text, "model.text")


class TextGAN(nn.Module):
    """Parts: `text` (a contrastive-only `JointModel`: LLM, conditioner, vision side, temperature), `generator`,
    `discriminator` and `head` (D(x, s) = head(discriminator(x), s))."""

    def __init__(self, spec: GANSpec) -> None:
        super().__init__()
        self.spec = spec
        self.text = JointModel(text_spec(spec))
        dim = self.text.spec.contrastive.embed_dim
        nets = spec.gan
        self.generator = Generator(nets.noise_dim, dim, nets.base_channels, spec.image_size, nets.generator_multipliers)
        self.discriminator = Discriminator(nets.base_channels, spec.image_size, nets.discriminator_multipliers)
        self.head = PairHead(self.discriminator.out_channels, dim)

    @classmethod
    def from_config(cls, values: Any, key: str = "model") -> TextGAN:
        return cls(parse(GANSpec, values, key))

    @property
    def image_size(self) -> int:
        return self.spec.image_size

    @property
    def device(self) -> torch.device:
        return self.generator.fc.weight.device

    can_caption = False
    diffusion = None  # no latent diffusion: nothing to invert or edit
    can_generate = True
    vision = None  # no captioner and no retrieval of its own: the text side's vision tower serves its training only

    def train(self, mode: bool = True) -> TextGAN:
        super().train(mode)
        self.text.train(mode)  # its frozen parts stay in eval mode
        return self

    # ------------------------------------------------------------------ text
    def sentences(self, captions: list[str]) -> torch.Tensor:
        """Sentence vectors: the conditioner's text embedding, L2-normalised (the contrastive term that trains it
        fixes only its direction)."""
        return F.normalize(self.text.encode_text(list(captions), embed=True)["text_embed"].float(), dim=-1)

    def text_loss(self, pixels: torch.Tensor, sentences: torch.Tensor, gather=None) -> torch.Tensor:
        """The contrastive term that trains the text encoder, on the sentence vectors of this batch."""
        image = self.text.vision(pixels)["image_embed"]
        return contrastive_loss(image, sentences, self.text.logit_scale(), gather=gather)

    def noise(self, count: int, seeds: list[int] | None = None, generator: torch.Generator | None = None):
        """Generator inputs: image i's noise from `seeds[i]` (the same image whatever the batch), or `generator`."""
        dim = self.spec.gan.noise_dim
        if seeds is None:
            return torch.randn(count, dim, generator=generator).to(self.device)
        rows = [torch.randn(dim, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
        return torch.stack(rows).to(self.device)

    # ---------------------------------------------------------------- losses
    def judge(self, images: torch.Tensor, sentences: torch.Tensor) -> torch.Tensor:
        return self.head(self.discriminator(images), sentences)

    def discriminator_losses(
        self, real: torch.Tensor, fake: torch.Tensor, sentences: torch.Tensor, penalty: bool = True
    ) -> dict[str, torch.Tensor]:
        """DF-GAN's D objective on detached inputs: hinge on real / fake / mismatched pairs, + MA-GP on the real
        pairs with `penalty` (one real forward serves the hinge term and the penalty)."""
        real = real.detach().requires_grad_(penalty)
        sentences = sentences.detach().requires_grad_(penalty)
        features = self.discriminator(real)
        real_logits = self.head(features, sentences)
        mismatch_logits = self.head(features, sentences.roll(1, dims=0))  # another image's sentence
        out = discriminator_hinge_loss(real_logits, self.judge(fake.detach(), sentences), mismatch_logits)
        if penalty:
            k, p = self.spec.penalty.k, self.spec.penalty.p
            out["gp_loss"] = gradient_penalty_from_logits(real_logits, real, sentences, k, p)
            out["d_loss"] = out["d_loss"] + out["gp_loss"]
        return out

    def generator_losses(self, fake: torch.Tensor, sentences: torch.Tensor) -> dict:
        return generator_hinge_loss(self.judge(fake, sentences.detach()))

    def losses(self, batch: dict, stage: str, batch_idx: int = 0, gather=None) -> dict[str, torch.Tensor]:
        """The hinge terms of D and G, and `contrastive_loss` when the text side trains, for validation
        (`stage="val"`: the noise fixed by `batch_idx`, so curves compare). Without the penalty, which needs
        input gradients that evaluation (under inference mode) does not keep."""
        pixels, captions = batch["pixels"], batch["captions"]
        sentences = self.sentences(captions)
        generator = torch.Generator().manual_seed(batch_idx) if stage != "train" else None
        fake = self.generator(self.noise(len(captions), generator=generator), sentences)
        out = self.discriminator_losses(pixels, fake, sentences, penalty=False) | self.generator_losses(fake, sentences)
        if self.spec.text_weight:
            out["contrastive_loss"] = self.text_loss(pixels, sentences, gather)
        return out

    # ------------------------------------------------------------------- use
    def caption(self, pixels: torch.Tensor, **generate_kwargs) -> list[str]:
        raise RuntimeError("a text_gan model generates images only: it has no captioner.")

    @torch.no_grad()
    def generate(
        self, prompts: list[str], seed: int = 0, seeds: list[int] | None = None, **sampling: Any
    ) -> torch.Tensor:
        """Images in `[-1, 1]` for `prompts`, image i from the noise of `seeds[i]` (default `seed + i`). The
        diffusion sampler's settings (`steps`, `guidance_scale`, `eta`, ...) have no meaning for a GAN: they are
        accepted and ignored, so one call serves both recipes."""
        seeds = list(seeds) if seeds is not None else [seed + i for i in range(len(prompts))]
        sentences = self.sentences(prompts)
        return self.generator(self.noise(len(prompts), seeds), sentences.to(self.device)).float().clamp(-1, 1)
