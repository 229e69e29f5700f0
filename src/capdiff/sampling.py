"""Sampling: DDIM (Song et al., 2021) with classifier-free guidance (Ho & Salimans, 2022), DDIM inversion, and
the two ways capdiff edits an image by text: invert under the source caption and regenerate under the target
(inversion), or noise the image part-way and denoise under the target (SDEdit, Meng et al., 2022)."""

from __future__ import annotations

import torch
from diffusers import DDIMInverseScheduler

from capdiff.models.diffusion import LatentDiffusion


@torch.no_grad()
def ddim_sample(
    diffusion: LatentDiffusion,
    cond: torch.Tensor,
    cond_mask: torch.Tensor | None,
    uncond: torch.Tensor,
    uncond_mask: torch.Tensor | None,
    steps: int = 50,
    guidance_scale: float = 4.0,
    eta: float = 0.0,
    seed: int = 0,
    latents: torch.Tensor | None = None,
    seeds: list[int] | None = None,
    strength: float = 1.0,
    guidance_rescale: float | None = None,
) -> torch.Tensor:
    """Latents for the conditions `cond` (B×L×D), guided away from `uncond` by `guidance_scale`.

    Each image's starting noise comes from its own generator, seeded with `seeds[i]` or else `seed + i`, so an
    image does not change when the batch it is sampled in does. Given `latents` and `strength` < 1 (SDEdit),
    the latents are noised to the `strength` share of the schedule with that noise and denoised from there;
    given `latents` at strength 1, they are the starting noise itself (e.g. from `ddim_invert`).
    `guidance_rescale` (Lin et al., 2024, eq. 16) defaults to 0.7 for models trained with zero terminal SNR
    and 0 otherwise.
    """
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength={strength} must be in (0, 1]: the share of the DDIM steps run on the image.")
    if seeds is not None and len(seeds) != cond.shape[0]:
        raise ValueError(f"{len(seeds)} seeds for {cond.shape[0]} conditions: give one seed per prompt.")
    scheduler = diffusion.sampling_scheduler()
    scheduler.set_timesteps(steps, device=cond.device)
    unet = diffusion.unet
    timesteps = scheduler.timesteps
    if guidance_rescale is None:
        guidance_rescale = 0.7 if scheduler.config.get("rescale_betas_zero_snr") else 0.0
    if latents is None or strength < 1.0:
        side = latents.shape[-2:] if latents is not None else (diffusion.latent_size,) * 2
        shape = (unet.config.in_channels, *side)
        seeds = seeds if seeds is not None else [seed + i for i in range(cond.shape[0])]
        noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])
        noise = noise.to(cond.device, unet.dtype)
        if latents is None:
            latents = noise * scheduler.init_noise_sigma
        else:
            skip = steps - max(1, round(steps * strength))
            timesteps = timesteps[skip:]
            latents = scheduler.add_noise(latents, noise, timesteps[:1].repeat(latents.shape[0]))
    guided = guidance_scale != 1.0
    context = torch.cat([uncond, cond]) if guided else cond
    if cond_mask is None or uncond_mask is None:  # no padding anywhere: attention skips the mask
        context_mask = None
    else:
        context_mask = torch.cat([uncond_mask, cond_mask]) if guided else cond_mask
    generator = torch.Generator().manual_seed(seed) if eta > 0 else None
    for t in timesteps:
        model_in = torch.cat([latents, latents]) if guided else latents
        model_in = scheduler.scale_model_input(model_in, t)
        prediction = unet(model_in, t, encoder_hidden_states=context, encoder_attention_mask=context_mask).sample
        prediction = prediction.to(latents.dtype)  # guidance and the scheduler step in the latents' precision
        if guided:
            unconditional, conditional = prediction.chunk(2)
            prediction = unconditional + guidance_scale * (conditional - unconditional)
            if guidance_rescale > 0:
                dims = tuple(range(1, prediction.ndim))
                rescaled = prediction * (conditional.std(dims, keepdim=True) / prediction.std(dims, keepdim=True))
                prediction = guidance_rescale * rescaled + (1 - guidance_rescale) * prediction
        latents = scheduler.step(prediction, t, latents, eta=eta, generator=generator).prev_sample
    return latents


@torch.no_grad()
def ddim_invert(
    diffusion: LatentDiffusion, latents: torch.Tensor, cond: torch.Tensor, cond_mask: torch.Tensor, steps: int = 50
) -> torch.Tensor:
    """The noise that deterministic DDIM (η = 0) under `cond` maps back to `latents` (diffusers'
    `DDIMInverseScheduler`, no guidance: guided inversion drifts)."""
    config = diffusion.sampling_scheduler().config
    scheduler = DDIMInverseScheduler.from_config(config)
    scheduler.set_timesteps(steps, device=latents.device)
    for t in scheduler.timesteps:
        prediction = diffusion.unet(latents, t, encoder_hidden_states=cond, encoder_attention_mask=cond_mask).sample
        latents = scheduler.step(prediction.to(latents.dtype), t, latents).prev_sample
    return latents
