"""Latent diffusion (Rombach et al., 2022): a frozen AutoencoderKL and a text-conditioned UNet2DConditionModel.

Training uses diffusers' `DDPMScheduler` for the forward process; the model owns its parametrization (ε or v)
and hence its loss weighting, so the training step does not care which one it is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from torch import nn

from capdiff.models.hub import load_pretrained
from capdiff.samplers import DEFAULT_SAMPLER, build_scheduler


def diffusion_loss(
    prediction: torch.Tensor,
    target: torch.Tensor,
    snr: torch.Tensor,
    prediction_type: str,
    min_snr_gamma: float,
    weighting: str = "min_snr",
) -> torch.Tensor:
    """Per-sample MSE, weighted by timestep; γ = 0 turns the weighting off.

    Written as a weight on the x₀ error (ε-MSE = SNR·x₀-MSE, v-MSE = (SNR + 1)·x₀-MSE):
    - `min_snr` (Hang et al., 2023): min(SNR, γ). At high noise the weight goes to 0 with the SNR.
    - `min_snr_plus_one`: min(SNR + 1, γ): 1 at high noise, where the layout and the colours of an image are
      decided from the text (and at zero terminal SNR, where `min_snr` gives 0), capped at γ at low noise.
    """
    if weighting not in ("min_snr", "min_snr_plus_one"):
        raise ValueError(f"model.diffusion.weighting={weighting!r}: use 'min_snr' or 'min_snr_plus_one'.")
    per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if min_snr_gamma <= 0:
        return per_sample.mean()
    snr = snr.float()
    x0_weight = torch.clamp(snr + 1 if weighting == "min_snr_plus_one" else snr, max=min_snr_gamma)
    native = snr + 1 if prediction_type == "v_prediction" else snr.clamp_min(1e-8)  # this MSE's own x₀ weight
    return (per_sample * x0_weight / native).mean()


def build_unet(name_or_path: str | None, config: dict | None, latent_size: int | None = None) -> UNet2DConditionModel:
    """A pretrained UNet (its folder or repo, or the `unet/` of a whole pipeline), or one from `config`
    whose `sample_size` is the run's latent size (a pretrained one keeps its own: it is only a default)."""
    if name_or_path:
        return load_pretrained(UNet2DConditionModel.from_pretrained, name_or_path, "model.unet.name_or_path", "unet")
    config = dict(config or {})
    if latent_size is not None:
        config["sample_size"] = latent_size
    return UNet2DConditionModel(**config)


def build_vae(name_or_path: str | None, config: dict | None = None) -> AutoencoderKL:
    """A pretrained AutoencoderKL (its folder or repo, or the `vae/` of a whole pipeline), or one from `config`
    (a checkpoint's own, whose weights it then loads)."""
    if name_or_path:
        return load_pretrained(AutoencoderKL.from_pretrained, name_or_path, "model.vae.name_or_path", "vae")
    if config:
        return AutoencoderKL.from_config(config)
    raise ValueError(
        "model.vae.name_or_path is null: name a pretrained VAE (e.g. stabilityai/sd-vae-ft-mse), or build the tiny "
        "preset through train.py, which trains its first-stage autoencoder on the data (model.vae.first_stage)."
    )


class LatentDiffusion(nn.Module):
    def __init__(
        self,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL,
        prediction_type: str = "epsilon",
        num_train_timesteps: int = 1000,
        beta_schedule: str = "scaled_linear",
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        min_snr_gamma: float = 5.0,
        zero_terminal_snr: bool = False,
        weighting: str = "min_snr",
        latent_size: int | None = None,
    ) -> None:
        super().__init__()
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"model.diffusion.prediction_type={prediction_type!r}: use 'epsilon' or 'v_prediction'.")
        if zero_terminal_snr and prediction_type != "v_prediction":
            raise ValueError(
                "model.diffusion.zero_terminal_snr=true needs model.diffusion.prediction_type=v_prediction "
                "(ε-prediction is undefined at zero SNR; Lin et al., 2024)."
            )
        self.unet = unet
        self.vae = vae
        # The latent side every sampler starts from: data.image_size ÷ the VAE's downsampling, whatever the
        # UNet's `sample_size` says (a pipeline default, 64 for SD-1.5's 512² images).
        self.latent_size = int(latent_size or unet.config.sample_size)
        self.vae.requires_grad_(False)
        self.vae.eval()
        self.scheduler = DDPMScheduler(
            num_train_timesteps=num_train_timesteps,
            beta_schedule=beta_schedule,
            beta_start=beta_start,
            beta_end=beta_end,
            prediction_type=prediction_type,
            rescale_betas_zero_snr=zero_terminal_snr,
            timestep_spacing="trailing" if zero_terminal_snr else "leading",
            clip_sample=False,
        )
        self.min_snr_gamma = min_snr_gamma
        self.weighting = weighting
        self.channels_last = False  # set with the UNet's memory format (model.speed.channels_last)
        alphas = self.scheduler.alphas_cumprod
        self.register_buffer("snr", alphas / (1 - alphas).clamp_min(1e-12), persistent=False)

    def train(self, mode: bool = True) -> LatentDiffusion:
        super().train(mode)
        self.vae.eval()  # frozen: no dropout, no running statistics
        return self

    @property
    def zero_terminal_snr(self) -> bool:
        return bool(self.scheduler.config.get("rescale_betas_zero_snr"))

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    def sampling_scheduler(self, sampler: str = DEFAULT_SAMPLER) -> SchedulerMixin:
        """The scheduler `sampler` names (`capdiff.samplers`), built from the training config: its betas,
        prediction type, zero terminal SNR and spacing, with clip_sample and set_alpha_to_one off, steps_offset 1."""
        return build_scheduler(self.scheduler.config, sampler)

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor, sample: bool = True, generator: torch.Generator | None = None):
        """Scaled latents of `pixels` in [-1, 1]: a draw from the VAE posterior (its mean with `sample=False`),
        float32 whatever precision the VAE ran in (under bf16 autocast its convolutions return bf16), as the
        cached latents and sampling are."""
        posterior = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist
        latents = posterior.sample(generator) if sample else posterior.mode()
        return latents.float() * self.scaling_factor

    @torch.no_grad()
    def posterior(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE posterior's mean and std (unscaled): what `capdiff.data.cache_latents` stores."""
        posterior = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist
        return posterior.mean.float(), posterior.std.float()

    def sample_latents(
        self, mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Scaled latents drawn from a cached posterior: the same draw `encode` makes for the same noise."""
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return (mean + std * noise) * self.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in `[-1, 1]`, float32 whatever precision the VAE ran in."""
        return self.vae.decode(latents / self.scaling_factor).sample.float().clamp(-1, 1)

    def loss(
        self,
        latents: torch.Tensor,
        cond: torch.Tensor,
        cond_mask: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        timesteps: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The denoising loss at random timesteps (given ones in tests), min-SNR-γ weighted.

        The noising and the target are computed in float32: the scheduler casts ᾱ to the latents' dtype, and in
        bf16 ᾱ at t ≤ 1 rounds to 1 (no noise at all) and the small-t steps collapse together. The UNet itself
        runs in the trainer's precision (autocast)."""
        batch = latents.shape[0]
        latents = latents.float()
        noise = torch.randn_like(latents) if noise is None else noise.float()
        if timesteps is None:
            timesteps = torch.randint(0, self.scheduler.config.num_train_timesteps, (batch,), device=latents.device)
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        if self.channels_last:
            noisy = noisy.contiguous(memory_format=torch.channels_last)
        if self.scheduler.config.prediction_type == "v_prediction":
            target = self.scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        prediction = self.unet(noisy, timesteps, encoder_hidden_states=cond, encoder_attention_mask=cond_mask).sample
        return diffusion_loss(
            prediction,
            target,
            self.snr[timesteps],
            self.scheduler.config.prediction_type,
            self.min_snr_gamma,
            self.weighting,
        )
