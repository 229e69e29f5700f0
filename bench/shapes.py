"""Stable Diffusion 1.5-shaped parts from configs, with random weights (nothing is downloaded).

The shapes are those of the sd15_gpt2 preset (`conf/parts/sd15_gpt2.yaml`): its UNet config as written there, the
`stabilityai/sd-vae-ft-mse` VAE's published config, the CLIP ViT-B/16 vision tower and GPT-2 small.
"""

from __future__ import annotations

from common import REPO
from diffusers import AutoencoderKL, UNet2DConditionModel
from omegaconf import OmegaConf

SD_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 256,
    "scaling_factor": 0.18215,
}
CLIP_VIT_B16 = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "patch_size": 16,
}
GPT2_SMALL = {"model_type": "gpt2", "n_embd": 768, "n_layer": 12, "n_head": 12, "n_positions": 1024}


def sd_unet_config(latent_size: int) -> dict:
    config = OmegaConf.to_container(OmegaConf.load(REPO / "conf/parts/sd15_gpt2.yaml").unet.config)
    return config | {"sample_size": latent_size}


def sd_unet(latent_size: int) -> UNet2DConditionModel:
    return UNet2DConditionModel(**sd_unet_config(latent_size))


def sd_vae() -> AutoencoderKL:
    return AutoencoderKL(**SD_VAE)
