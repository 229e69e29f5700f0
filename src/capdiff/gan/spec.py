"""The GAN baseline's config (`model.*` of `experiment=text_gan`), typed as `capdiff.joint.spec` is, so an
unknown key fails naming the valid ones before anything is built."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Networks:
    """DF-GAN's generator and discriminator (`capdiff.gan.networks`); multipliers null: sized by the image."""

    noise_dim: int = 100
    base_channels: int = 32
    generator_multipliers: list[int] | None = None
    discriminator_multipliers: list[int] | None = None


@dataclass
class Penalty:
    """The matching-aware gradient penalty, k·E[‖∇D‖^p] (DF-GAN: k = 2, p = 6)."""

    k: float = 2.0
    p: float = 6.0


@dataclass
class GANSpec:
    """What builds a `capdiff.gan.model.TextGAN`.

    `text` is a joint model config (the `tiny` or `sd15_gpt2` preset under `model.text`): its LLM, tokenizer
    and text conditioner encode the prompts exactly as the joint recipe's do, and its contrastive term (with
    its vision side) trains that text encoder, the role DAMSM plays for DF-GAN. `text_weight` is that term's
    weight; 0 freezes the text encoder (a pretrained LLM such as GPT-2 read as it is)."""

    text: dict[str, Any] = field(default_factory=dict)
    text_weight: float = 1.0
    gan: Networks = field(default_factory=Networks)
    penalty: Penalty = field(default_factory=Penalty)
    image_size: int = 32


@dataclass
class GANOptim:
    """Adam for each network, DF-GAN's settings by default (β = (0, 0.9); G 1e-4, D 4e-4); the text side
    (with `text_weight` > 0) steps with the discriminator, at `text_lr`."""

    generator_lr: float = 1e-4
    discriminator_lr: float = 4e-4
    text_lr: float = 3e-4
    betas: list[float] = field(default_factory=lambda: [0.0, 0.9])
    weight_decay: float = 0.0
