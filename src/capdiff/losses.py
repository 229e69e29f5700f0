"""The three loss terms. Each returns a scalar; the module names them `<term>_loss` and sums the weighted terms."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.nn.functional import all_gather

IGNORE = -100


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


def caption_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy; positions labelled IGNORE (prefix, prompt, padding) do not count."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE)


def gather_with_grad(features: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Features of every rank, concatenated, with gradient flowing back to each rank's own rows."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return features, 0
    return torch.cat(all_gather(features), dim=0), dist.get_rank()


def contrastive_loss(
    image_embed: torch.Tensor, text_embed: torch.Tensor, logit_scale: torch.Tensor, gather: bool = True
) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP) with open_clip's local loss: this rank's rows against every rank's columns.

    Averaged over ranks (as DDP averages gradients) it equals the loss over the concatenated batch.
    """
    image = F.normalize(image_embed.float(), dim=-1)
    text = F.normalize(text_embed.float(), dim=-1)
    all_image, rank = gather_with_grad(image) if gather else (image, 0)
    all_text, _ = gather_with_grad(text) if gather else (text, 0)
    labels = torch.arange(image.shape[0], device=image.device) + rank * image.shape[0]
    logits_per_image = logit_scale * image @ all_text.T
    logits_per_text = logit_scale * text @ all_image.T
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
