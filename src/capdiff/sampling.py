"""Sampling: one loop with classifier-free guidance (Ho & Salimans, 2022) over any diffusers scheduler built from
the model's own noise schedule, DDIM inversion, and the two ways capdiff edits an image by text: invert under
the source caption and regenerate under the target (inversion), or noise the image part-way and denoise under the
target (SDEdit, Meng et al., 2022).

The scheduler carries the method: DDIM (Song et al., 2021), DPM-Solver++ (Lu et al., 2022), UniPC (Zhao et al.,
2023), Euler, Heun, ... are picked by name (`SAMPLERS`, or a diffusers scheduler class name) and stepped by the
same loop. Inversion stays DDIM: it runs the deterministic DDIM update backwards, which maps an image to the
noise that the same DDIM update forward maps back to it; another solver's discretisation would not return there.
"""

from __future__ import annotations

import inspect

import torch
from diffusers import DDIMInverseScheduler

from capdiff.models.diffusion import LatentDiffusion
from capdiff.samplers import DEFAULT_SAMPLER, DEFAULT_STEPS, STOCHASTIC


@torch.no_grad()
def sample(
    diffusion: LatentDiffusion,
    cond: torch.Tensor,
    cond_mask: torch.Tensor | None,
    uncond: torch.Tensor,
    uncond_mask: torch.Tensor | None,
    steps: int = DEFAULT_STEPS,
    guidance_scale: float = 4.0,
    eta: float = 0.0,
    seed: int = 0,
    latents: torch.Tensor | None = None,
    seeds: list[int] | None = None,
    strength: float = 1.0,
    guidance_rescale: float | None = None,
    sampler: str = DEFAULT_SAMPLER,
) -> torch.Tensor:
    """Latents for the conditions `cond` (B×L×D), guided away from `uncond` by `guidance_scale`, by `sampler`
    in `steps` steps (a second-order sampler such as `heun` evaluates the UNet twice in most of them).

    Each image has its own random generator, seeded with `seeds[i]` or else `seed + i`: it draws the image's
    starting noise and, for a stochastic sampler (`STOCHASTIC`, or DDIM with `eta` > 0), the noise of every
    step, so an image does not change when the batch it is sampled in does. Given `latents` and `strength` < 1
    (SDEdit), the latents are noised to the `strength` share of the schedule with that noise and denoised from
    there; given `latents` at strength 1, they are the starting noise itself (e.g. from `ddim_invert`).
    `guidance_rescale` (Lin et al., 2024, eq. 16) defaults to 0.7 for models trained with zero terminal SNR
    and 0 otherwise.
    """
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength={strength} must be in (0, 1]: the share of the sampling steps run on the image.")
    if seeds is not None and len(seeds) != cond.shape[0]:
        raise ValueError(f"{len(seeds)} seeds for {cond.shape[0]} conditions: give one seed per prompt.")
    scheduler = diffusion.sampling_scheduler(sampler)
    accepts = set(inspect.signature(scheduler.step).parameters)
    if eta > 0 and "eta" not in accepts:
        raise ValueError(
            f"eta={eta} is DDIM's noise level and {sampler!r} has none: use sampler=ddim with eta, or a stochastic "
            f"sampler ({', '.join(STOCHASTIC)}) with eta=0."
        )
    scheduler.set_timesteps(steps, device=cond.device)
    unet = diffusion.unet
    timesteps = scheduler.timesteps
    if guidance_rescale is None:
        guidance_rescale = 0.7 if diffusion.zero_terminal_snr else 0.0
    seeds = seeds if seeds is not None else [seed + i for i in range(cond.shape[0])]
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    if latents is None or strength < 1.0:
        side = latents.shape[-2:] if latents is not None else (diffusion.latent_size,) * 2
        shape = (unet.config.in_channels, *side)
        noise = torch.stack([torch.randn(shape, generator=g) for g in generators]).to(cond.device, unet.dtype)
        if latents is None:
            latents = noise * scheduler.init_noise_sigma
        else:
            # as diffusers' image-to-image pipelines: skip the first steps (each `order` entries of the schedule)
            skip = (steps - max(1, round(steps * strength))) * scheduler.order
            timesteps = timesteps[skip:]
            if hasattr(scheduler, "set_begin_index"):
                scheduler.set_begin_index(skip)
            latents = scheduler.add_noise(latents, noise, timesteps[:1].repeat(latents.shape[0]))
    guided = guidance_scale != 1.0
    context = torch.cat([uncond, cond]) if guided else cond
    if cond_mask is None or uncond_mask is None:  # no padding anywhere: attention skips the mask
        context_mask = None
    else:
        context_mask = torch.cat([uncond_mask, cond_mask]) if guided else cond_mask
    options = {"eta": eta} if "eta" in accepts else {}
    if "generator" in accepts:  # diffusers draws a batch's step noise from a list of generators, one an image
        options["generator"] = generators
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
        latents = scheduler.step(prediction, t, latents, **options).prev_sample
    return latents


@torch.no_grad()
def ddim_invert(
    diffusion: LatentDiffusion, latents: torch.Tensor, cond: torch.Tensor, cond_mask: torch.Tensor, steps: int = 50
) -> torch.Tensor:
    """The noise that deterministic DDIM (η = 0) under `cond` maps back to `latents` (diffusers'
    `DDIMInverseScheduler`, no guidance: guided inversion drifts). Regenerate from it with `sampler="ddim"`."""
    config = diffusion.sampling_scheduler("ddim").config
    scheduler = DDIMInverseScheduler.from_config(config)
    scheduler.set_timesteps(steps, device=latents.device)
    for t in scheduler.timesteps:
        prediction = diffusion.unet(latents, t, encoder_hidden_states=cond, encoder_attention_mask=cond_mask).sample
        latents = scheduler.step(prediction.to(latents.dtype), t, latents).prev_sample
    return latents
