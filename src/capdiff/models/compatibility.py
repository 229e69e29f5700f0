"""Sizes that must agree between the parts, checked from their configs alone: `train.py` runs these checks
before any work (shards, tokenizer, autoencoder, latent caches), reading only the config.json of each
pretrained part, and the joint model runs them again on the parts it built.

An SD UNet is convolutional: its `sample_size` is only a pipeline default, so a pretrained UNet with
`sample_size: 64` (512² images) trains at 256² as well. The latent side always comes from `data.image_size`
and the VAE's downsampling; what must agree is the channels, the cross-attention width, and an image size
that the VAE and then every downsampling of the UNet divide evenly.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch

from capdiff.models.connectors import build_connector
from capdiff.models.hub import TOKENIZER, load_pretrained, locate


def _with_defaults(cls: type, config: Mapping[str, Any]) -> dict[str, Any]:
    """A from-scratch config as the class will see it: its constructor defaults filled in."""
    defaults = {
        name: p.default
        for name, p in inspect.signature(cls.__init__).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    return defaults | dict(config)


def vae_factor(vae: Mapping[str, Any]) -> int:
    """How much the VAE downsamples: one halving per encoder block but the last."""
    return 2 ** (len(vae["block_out_channels"]) - 1)


def unet_factor(unet: Mapping[str, Any]) -> int:
    """How much the UNet downsamples its input: every down block but the last halves it."""
    return 2 ** (len(unet["down_block_types"]) - 1)


def latent_size(vae: Mapping[str, Any], image_size: int) -> int:
    return image_size // vae_factor(vae)


def check_dimensions(
    unet: Mapping[str, Any],
    vae: Mapping[str, Any],
    image_size: int,
    llm_dim: int,
    conditioner: Mapping[str, Any],
    pretrained_unet: str | None = None,
) -> None:
    """Fail naming both config keys and the value that would fit (`pretrained_unet`: the UNet's hub id or
    folder, whose config cannot be changed by model.unet.config)."""
    cross = unet["cross_attention_dim"]
    if conditioner.get("in_dim") not in (None, llm_dim):
        raise ValueError(
            f"model.conditioner.in_dim={conditioner['in_dim']} but the LLM (model.llm) has hidden size {llm_dim}: "
            f"set model.conditioner.in_dim={llm_dim} (or null to follow the LLM)."
        )
    if conditioner.get("out_dim") not in (None, cross):
        raise ValueError(
            f"model.conditioner.out_dim={conditioner['out_dim']} but the UNet's cross_attention_dim is {cross}: "
            f"set model.conditioner.out_dim={cross} (or null to follow the UNet)."
        )
    latent_channels = vae["latent_channels"]
    for side in ("in_channels", "out_channels"):
        if unet[side] == latent_channels:
            continue
        if pretrained_unet:
            raise ValueError(
                f"model.unet.name_or_path={pretrained_unet!r} has {side}={unet[side]} but the VAE "
                f"(model.vae.name_or_path) makes {latent_channels}-channel latents: use a VAE with {unet[side]} "
                f"latent channels, or a UNet made for this VAE (model.unet.name_or_path=null trains one from "
                f"model.unet.config)."
            )
        raise ValueError(
            f"model.unet.config.{side}={unet[side]} but the VAE (model.vae.name_or_path) makes "
            f"{latent_channels}-channel latents: set model.unet.config.{side}={latent_channels}."
        )
    factor, down = vae_factor(vae), unet_factor(unet)
    if image_size % (factor * down):
        below, above = image_size // (factor * down) * factor * down, -(-image_size // (factor * down)) * factor * down
        sizes = " or ".join(str(s) for s in (below, above) if s > 0)
        raise ValueError(
            f"data.image_size={image_size}: the VAE downsamples by {factor} and the UNet then halves its latents "
            f"{down.bit_length() - 1} times, so the image size must be a multiple of {factor * down}: set "
            f"data.image_size={sizes}."
        )


def _diffusers_config(cls: type, spec: Mapping[str, Any], key: str, subfolder: str) -> dict[str, Any]:
    config = load_pretrained(cls.load_config, spec["name_or_path"], key, subfolder=subfolder)
    found = config.get("_class_name")
    if found not in (None, cls.__name__):
        raise ValueError(
            f"{key}={spec['name_or_path']!r} holds {found}, not {cls.__name__}, and has no {subfolder}/ "
            f"sub-folder with one: name a repo or folder with a {cls.__name__} (a whole Stable Diffusion "
            f"pipeline keeps it in {subfolder}/)."
        )
    return _with_defaults(cls, config)


def llm_config(llm: Mapping[str, Any]):
    from transformers import AutoConfig

    if llm.get("name_or_path"):
        return load_pretrained(AutoConfig.from_pretrained, llm["name_or_path"], "model.llm.name_or_path")
    spec = dict(llm.get("config") or {})
    return AutoConfig.for_model(spec.pop("model_type", "gpt2"), **spec)


def check_parts(model: Mapping[str, Any], image_size: int) -> None:
    """Find every pretrained part the model config names and check that the parts fit together, reading
    config files only. Raises the error of `capdiff.models.hub` (with the fix) for a part it cannot find."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPVisionConfig

    weights = (model.get("loss") or {}).get("weights") or {}
    llm = model.get("llm") or {}
    if llm.get("tokenizer"):
        locate(llm["tokenizer"], "model.llm.tokenizer", markers=TOKENIZER)
    llm_settings = llm_config(llm)
    llm_dim = llm_settings.hidden_size
    vision = model.get("vision") or {}
    if (weights.get("caption") or weights.get("contrastive")) and vision.get("name_or_path"):
        load_pretrained(CLIPVisionConfig.from_pretrained, vision["name_or_path"], "model.vision.name_or_path")
    if not weights.get("diffusion"):
        return
    unet, vae = model.get("unet") or {}, model.get("vae") or {}
    if unet.get("name_or_path"):
        unet_config = _diffusers_config(UNet2DConditionModel, unet, "model.unet.name_or_path", "unet")
    else:
        unet_config = _with_defaults(UNet2DConditionModel, unet.get("config") or {})
    if vae.get("name_or_path"):
        vae_config = _diffusers_config(AutoencoderKL, vae, "model.vae.name_or_path", "vae")
    elif (vae.get("first_stage") or {}).get("config"):  # trained on the run's data first (the tiny preset)
        vae_config = _with_defaults(AutoencoderKL, vae["first_stage"]["config"])
    else:
        raise ValueError("model.vae.name_or_path is null and model.vae.first_stage is not set: give one of them.")
    conditioner = model.get("conditioner") or {}
    check_dimensions(unet_config, vae_config, image_size, llm_dim, conditioner, unet.get("name_or_path"))
    if conditioner.get("connector"):
        with torch.device("meta"):  # its own checks (sizes that fit each other), without allocating weights
            cross = unet_config["cross_attention_dim"]
            build_connector(conditioner["connector"], llm_dim, cross, llm_settings.num_hidden_layers)


def check_positions(llm, prefix: int) -> None:
    """The caption sequence (prefix + prompt + caption) of a `capdiff.models.language.LanguageModel` must fit
    its position table."""
    positions = getattr(llm.lm.config, "max_position_embeddings", None)
    needed = prefix + len(llm.prompt_ids) + llm.max_tokens
    if positions is not None and needed > positions:
        raise ValueError(
            f"the image prefix ({prefix} tokens: model.vision.resampler.num_queries + model.vision.resampler.grid²)"
            f" + the prompt ({len(llm.prompt_ids)} tokens) + model.llm.max_tokens={llm.max_tokens} = {needed} "
            f"exceeds the LLM's {positions} positions: set "
            f"model.llm.max_tokens={max(1, positions - prefix - len(llm.prompt_ids))} or use fewer prefix tokens."
        )
