"""Each loss term on inputs whose answer is known."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from capdiff.models.contrastive import LogitScale, contrastive_loss
from capdiff.models.diffusion import diffusion_loss
from capdiff.models.language import IGNORE, caption_loss


def test_diffusion_loss_is_plain_mse_without_min_snr() -> None:
    prediction, target = torch.zeros(2, 4, 3, 3), torch.ones(2, 4, 3, 3) * torch.tensor([1.0, 2.0]).view(2, 1, 1, 1)
    loss = diffusion_loss(prediction, target, torch.tensor([1.0, 50.0]), "epsilon", min_snr_gamma=0)
    assert loss.item() == pytest.approx((1 + 4) / 2)


@pytest.mark.parametrize(
    ("prediction_type", "weights"),
    [("epsilon", [1.0, 5 / 10]), ("v_prediction", [1 / 2, 5 / 11])],  # min(SNR, γ)/SNR and min(SNR, γ)/(SNR + 1)
)
def test_min_snr_weights(prediction_type: str, weights: list[float]) -> None:
    prediction, target = torch.zeros(2, 4, 2, 2), torch.ones(2, 4, 2, 2)
    loss = diffusion_loss(prediction, target, torch.tensor([1.0, 10.0]), prediction_type, min_snr_gamma=5.0)
    assert loss.item() == pytest.approx(sum(weights) / 2)


@pytest.mark.parametrize(
    ("prediction_type", "snr", "weights"),
    # x₀ weight min(SNR + 1, γ) over each MSE's own x₀ weight (SNR for ε, SNR + 1 for v); SNR 0 = zero terminal SNR
    [("v_prediction", [0.0, 1.0, 10.0], [1 / 1, 2 / 2, 5 / 11]), ("epsilon", [0.5, 1.0, 10.0], [1.5 / 0.5, 2, 5 / 10])],
)
def test_min_snr_plus_one_weights_keep_high_noise_steps(prediction_type: str, snr: list, weights: list) -> None:
    prediction, target = torch.zeros(3, 4, 2, 2), torch.ones(3, 4, 2, 2)
    snr = torch.tensor(snr)
    loss = diffusion_loss(prediction, target, snr, prediction_type, min_snr_gamma=5.0, weighting="min_snr_plus_one")
    assert loss.item() == pytest.approx(sum(weights) / 3)
    with pytest.raises(ValueError, match="min_snr_plus_one"):
        diffusion_loss(prediction, target, snr, prediction_type, min_snr_gamma=5.0, weighting="snr")


def test_caption_loss_counts_only_labelled_positions() -> None:
    vocab = 7
    logits = torch.zeros(1, 5, vocab)  # uniform everywhere: −log(1/7) per counted token
    labels = torch.tensor([[IGNORE, IGNORE, 3, 4, IGNORE]])
    assert caption_loss(logits, labels).item() == pytest.approx(math.log(vocab))
    # a confident, correct prediction of label 3 (made at position 1) lowers the loss on that token only
    logits[0, 1, 3] = 20.0
    assert caption_loss(logits, labels).item() == pytest.approx(math.log(vocab) / 2, rel=1e-3)
    # garbage at positions whose next label is ignored changes nothing
    logits[0, 0] = torch.randn(vocab) * 50
    logits[0, 4] = torch.randn(vocab) * 50
    assert caption_loss(logits, labels).item() == pytest.approx(math.log(vocab) / 2, rel=1e-3)


def test_contrastive_loss_matches_the_clip_formula() -> None:
    torch.manual_seed(0)
    image, text, scale = torch.randn(6, 8), torch.randn(6, 8), torch.tensor(10.0)
    i, t = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
    logits = scale * i @ t.T
    expected = (F.cross_entropy(logits, torch.arange(6)) + F.cross_entropy(logits.T, torch.arange(6))) / 2
    assert contrastive_loss(image, text, scale).item() == pytest.approx(expected.item(), rel=1e-6)


def test_contrastive_loss_is_small_for_aligned_pairs_and_large_for_shuffled() -> None:
    embeddings = torch.eye(4)
    aligned = contrastive_loss(embeddings, embeddings, torch.tensor(100.0))
    shuffled = contrastive_loss(embeddings, embeddings.roll(1, dims=0), torch.tensor(100.0))
    assert aligned.item() < 1e-6
    assert shuffled.item() > 50


def test_logit_scale_starts_at_one_over_0_07_and_is_clamped_at_100() -> None:
    scale = LogitScale()
    assert scale().item() == pytest.approx(1 / 0.07)
    with torch.no_grad():
        scale.log_scale.fill_(10.0)
    scale.clamp_()  # after each optimizer step, as a parameter
    assert scale().item() == pytest.approx(100.0)
    with torch.no_grad():
        scale.log_scale.fill_(-1.0)
    scale.clamp_()
    assert scale().item() == pytest.approx(1.0)


def test_the_logit_scale_is_a_vector_fsdp_can_shard_and_loads_from_checkpoints_that_saved_a_scalar() -> None:
    scale = LogitScale()
    assert scale.log_scale.shape == (1,) and scale().ndim == 0
    scale.load_state_dict({"log_scale": torch.tensor(2.5)})  # as checkpoints before the change saved it
    assert scale.log_scale.shape == (1,) and scale().item() == pytest.approx(math.exp(2.5))


def test_noising_under_bf16_autocast_is_float32() -> None:
    """Under bf16-mixed the VAE's convolutions return bf16; the latents, their noising and the target stay
    float32 (in bf16, ᾱ at t = 1 rounds to 1: the latents would go to the UNet without noise)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from capdiff.models.diffusion import LatentDiffusion

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, latent_channels=4, sample_size=8)
    unet = UNet2DConditionModel(sample_size=8, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=8,
                                attention_head_dim=4)  # fmt: skip
    diffusion = LatentDiffusion(unet, vae)
    seen = {}
    unet.register_forward_pre_hook(lambda m, args, kwargs: seen.update(sample=args[0]), with_kwargs=True)
    pixels = torch.rand(2, 3, 8, 8) * 2 - 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        latents = diffusion.encode(pixels)
        assert diffusion.vae.encode(pixels).latent_dist.mean.dtype == torch.bfloat16  # what the VAE gives
        assert latents.dtype == torch.float32
        noise = torch.randn_like(latents)
        diffusion.loss(latents.bfloat16(), torch.randn(2, 3, 8), noise=noise, timesteps=torch.tensor([1, 1]))
    a = diffusion.scheduler.alphas_cumprod[1]
    expected = a.sqrt() * latents.bfloat16().float() + (1 - a).sqrt() * noise
    assert seen["sample"].dtype == torch.float32
    torch.testing.assert_close(seen["sample"], expected)
    assert not torch.equal(seen["sample"], latents.bfloat16().float())
