"""Sampling: DDIM (Song et al., 2021) with classifier-free guidance (Ho & Salimans, 2022)."""

from __future__ import annotations

import torch

from capdiff.models.diffusion import LatentDiffusion


@torch.no_grad()
def ddim_sample(
    diffusion: LatentDiffusion,
    cond: torch.Tensor,
    cond_mask: torch.Tensor,
    uncond: torch.Tensor,
    uncond_mask: torch.Tensor,
    steps: int = 50,
    guidance_scale: float = 4.0,
    eta: float = 0.0,
    seed: int = 0,
    latents: torch.Tensor | None = None,
) -> torch.Tensor:
    """Latents for the conditions `cond` (B×L×D), guided away from `uncond` by `guidance_scale`.

    Each image's starting noise comes from its own generator seeded with `seed + index`, so an image does
    not change when the batch it is sampled in does.
    """
    scheduler = diffusion.sampling_scheduler()
    scheduler.set_timesteps(steps, device=cond.device)
    unet = diffusion.unet
    if latents is None:
        channels, size = unet.config.in_channels, unet.config.sample_size
        noise = [
            torch.randn((channels, size, size), generator=torch.Generator().manual_seed(seed + i))
            for i in range(cond.shape[0])
        ]
        latents = torch.stack(noise).to(cond.device, unet.dtype) * scheduler.init_noise_sigma
    guided = guidance_scale != 1.0
    context = torch.cat([uncond, cond]) if guided else cond
    context_mask = torch.cat([uncond_mask, cond_mask]) if guided else cond_mask
    generator = torch.Generator().manual_seed(seed) if eta > 0 else None
    for t in scheduler.timesteps:
        model_in = torch.cat([latents, latents]) if guided else latents
        model_in = scheduler.scale_model_input(model_in, t)
        prediction = unet(model_in, t, encoder_hidden_states=context, encoder_attention_mask=context_mask).sample
        if guided:
            unconditional, conditional = prediction.chunk(2)
            prediction = unconditional + guidance_scale * (conditional - unconditional)
        latents = scheduler.step(prediction, t, latents, eta=eta, generator=generator).prev_sample
    return latents
