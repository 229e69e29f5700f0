"""DF-GAN's losses (Tao et al., CVPR 2022): hinge losses with matching-aware mismatched pairs, and the matching-aware
zero-centred gradient penalty (MA-GP). Logits are one per (image, sentence) pair, shape (B,); every loss is computed
in float32, so bf16 logits are fine. Losses return `{"<name>_loss": ...}` (capdiff's convention)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def discriminator_hinge_loss(
    real_logits: torch.Tensor, fake_logits: torch.Tensor, mismatch_logits: torch.Tensor
) -> dict[str, torch.Tensor]:
    """DF-GAN's discriminator hinge loss (MA-GP excluded, add it to `d_loss`):

        d_real_loss     = E[relu(1 − D(x, s))]        real image, its sentence
        d_fake_loss     = E[relu(1 + D(G(z, s), s))]  generated image, its sentence
        d_mismatch_loss = E[relu(1 + D(x, ŝ))]        real image, another image's sentence
        d_loss          = d_real_loss + ½·d_fake_loss + ½·d_mismatch_loss

    The three terms are reported unweighted; only `d_loss` carries the ½ weights."""
    real = F.relu(1.0 - real_logits.float()).mean()
    fake = F.relu(1.0 + fake_logits.float()).mean()
    mismatch = F.relu(1.0 + mismatch_logits.float()).mean()
    return {
        "d_real_loss": real,
        "d_fake_loss": fake,
        "d_mismatch_loss": mismatch,
        "d_loss": real + 0.5 * (fake + mismatch),
    }


def generator_hinge_loss(fake_logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """DF-GAN's generator loss: g_loss = −E[D(G(z, s), s)]."""
    return {"g_loss": -fake_logits.float().mean()}


def gradient_penalty_from_logits(
    logits: torch.Tensor, images: torch.Tensor, sentences: torch.Tensor, k: float = 2.0, p: float = 6.0
) -> torch.Tensor:
    """MA-GP from logits already computed on `images` and `sentences`, which must require grad and be the tensors
    the logits were computed from (DF-GAN's `MA_GP(img, sent, out)`: lets one real forward serve both the hinge
    term and the penalty):

        L_MA-GP = k · E[ ‖(∇_x D(x, s), ∇_s D(x, s))‖₂^p ]

    with the gradients of both inputs flattened and concatenated per sample. Computed as k·E[(‖·‖₂²)^{p/2}], equal to
    the official `k·mean(sqrt(sum(g²))^p)` but without sqrt's infinite derivative at a zero gradient (NaN in the
    double backward). The gradients are cast to float32 before the norm, so bf16 autocast is safe."""
    grad_images, grad_sentences = torch.autograd.grad(
        outputs=logits,
        inputs=(images, sentences),
        grad_outputs=torch.ones_like(logits),
        retain_graph=True,
        create_graph=True,  # the penalty is a function of D's parameters and must train them
        only_inputs=True,
    )
    batch = logits.shape[0]
    squared_norm = grad_images.float().reshape(batch, -1).pow(2).sum(1) + grad_sentences.float().reshape(batch, -1).pow(
        2
    ).sum(1)
    return k * squared_norm.pow(p / 2).mean()


def matching_aware_gradient_penalty(
    discriminator: Callable[[torch.Tensor], torch.Tensor],
    head: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    sentences: torch.Tensor,
    k: float = 2.0,
    p: float = 6.0,
) -> torch.Tensor:
    """DF-GAN's MA-GP on real matched pairs: k · E[ ‖(∇_x D(x, s), ∇_s D(x, s))‖₂^p ] with D(x, s) =
    head(discriminator(x), s); defaults k = 2, p = 6 as in the paper. See `gradient_penalty_from_logits`.

    `images` and `sentences` are detached copies made to require grad here, so callers pass plain tensors and the
    penalty does not reach whatever produced them (the text encoder): it trains only `discriminator` and `head`.
    The returned scalar is an ordinary differentiable loss (the input gradients are taken with create_graph=True);
    adding it to the D loss and calling backward carries its gradients to D's parameters through the normal
    backward, so under DDP the usual all-reduce hooks sync them. No autograd.grad over parameters is taken."""
    images = images.detach().requires_grad_(True)
    sentences = sentences.detach().requires_grad_(True)
    return gradient_penalty_from_logits(head(discriminator(images), sentences), images, sentences, k=k, p=p)
