"""The DF-GAN baseline's losses on inputs whose answer is known, and its networks' shapes, init and bf16 forward."""

from __future__ import annotations

import pytest
import torch

from capdiff.gan.losses import (
    discriminator_hinge_loss,
    generator_hinge_loss,
    gradient_penalty_from_logits,
    matching_aware_gradient_penalty,
)
from capdiff.gan.networks import (
    Affine,
    Discriminator,
    Generator,
    PairHead,
    default_discriminator_multipliers,
    default_generator_multipliers,
)

SENTENCE_DIM = 16


def test_hinge_losses_match_hand_computed_values() -> None:
    real, fake, mismatch = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.5]), torch.tensor([0.0, -1.0])
    d = discriminator_hinge_loss(real, fake, mismatch)
    assert d["d_real_loss"].item() == pytest.approx((0 + 0.5) / 2)  # relu(1 − 2), relu(1 − 0.5)
    assert d["d_fake_loss"].item() == pytest.approx((0 + 1.5) / 2)  # relu(1 − 2), relu(1 + 0.5)
    assert d["d_mismatch_loss"].item() == pytest.approx((1 + 0) / 2)  # relu(1 + 0), relu(1 − 1)
    assert d["d_loss"].item() == pytest.approx(0.25 + (0.75 + 0.5) / 2)
    assert generator_hinge_loss(fake)["g_loss"].item() == pytest.approx(-(-2.0 + 0.5) / 2)


@pytest.mark.parametrize(("k", "p"), [(2.0, 6.0), (1.0, 2.0)])
def test_ma_gp_on_a_linear_discriminator_is_closed_form(k: float, p: float) -> None:
    """D(x, s) = a·Σx + b·Σs: ∇_x = a and ∇_s = b everywhere, so ‖∇‖² = a²·n_x + b²·n_s for every sample."""
    a, b = torch.nn.Parameter(torch.tensor(0.3)), torch.nn.Parameter(torch.tensor(-0.2))
    images, sentences = torch.randn(3, 3, 4, 4), torch.randn(3, 5)
    n_x, n_s = 3 * 4 * 4, 5

    def head(features: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return a * features.flatten(1).sum(1) + b * s.sum(1)

    penalty = matching_aware_gradient_penalty(lambda x: x, head, images, sentences, k=k, p=p)
    squared = a.item() ** 2 * n_x + b.item() ** 2 * n_s
    assert penalty.item() == pytest.approx(k * squared ** (p / 2), rel=1e-5)
    assert not images.requires_grad and not sentences.requires_grad  # the caller's tensors are left alone

    penalty.backward()  # create_graph: the penalty is differentiable in D's parameters
    dsquared = k * (p / 2) * squared ** (p / 2 - 1)
    assert a.grad.item() == pytest.approx(dsquared * 2 * a.item() * n_x, rel=1e-5)
    assert b.grad.item() == pytest.approx(dsquared * 2 * b.item() * n_s, rel=1e-5)


def test_ma_gp_matches_the_official_form_and_trains_the_discriminator() -> None:
    torch.manual_seed(0)
    disc = Discriminator(base_channels=4, image_size=16)
    head = PairHead(disc.out_channels, SENTENCE_DIM)
    for block in disc.blocks:
        torch.nn.init.constant_(block.gamma, 0.5)  # γ = 0 at init would hide the residual branches' gradients
    images, sentences = torch.rand(3, 3, 16, 16) * 2 - 1, torch.randn(3, SENTENCE_DIM)
    penalty = matching_aware_gradient_penalty(disc, head, images, sentences)

    # tobran/DF-GAN lib/modules.py MA_GP, written out
    x, s = images.clone().requires_grad_(), sentences.clone().requires_grad_()
    out = head(disc(x), s)
    grads = torch.autograd.grad(out, (x, s), torch.ones_like(out), create_graph=True)
    grad = torch.cat((grads[0].view(3, -1), grads[1].view(3, -1)), dim=1)
    official = 2.0 * torch.mean(torch.sqrt(torch.sum(grad**2, dim=1)) ** 6)
    assert penalty.item() == pytest.approx(official.item(), rel=1e-4)
    assert torch.allclose(penalty, gradient_penalty_from_logits(out, x, s), rtol=1e-4)

    penalty.backward()
    # D is piecewise linear, so ∇ₓD and the penalty do not depend on its biases: only weights and γ get gradients.
    trained = [(n, p) for n, p in [*disc.named_parameters(), *head.named_parameters()] if not n.endswith("bias")]
    assert len(trained) == 1 + 2 * 4 + 2  # conv_img; per block γ, two residual convs, 1×1 shortcut; head's two convs
    for name, param in trained:
        assert param.grad is not None and param.grad.abs().sum() > 0, name


@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("batch", [1, 3])
def test_shapes(size: int, batch: int) -> None:
    gen = Generator(noise_dim=10, sentence_dim=SENTENCE_DIM, base_channels=8, image_size=size)
    disc = Discriminator(base_channels=8, image_size=size)
    head = PairHead(disc.out_channels, SENTENCE_DIM)
    sentences = torch.randn(batch, SENTENCE_DIM)
    fake = gen(torch.randn(batch, 10), sentences)
    assert fake.shape == (batch, 3, size, size)
    assert fake.min() >= -1 and fake.max() <= 1
    features = disc(fake)
    assert features.shape == (batch, 8 * 8, 4, 4)
    assert head(features, sentences).shape == (batch,)


def test_default_widths_follow_df_gan_at_256() -> None:
    assert default_generator_multipliers(256) == (8, 8, 8, 8, 4, 2, 1)
    assert default_discriminator_multipliers(256) == (1, 2, 4, 8, 8, 8, 8)
    assert default_generator_multipliers(32) == (2, 2, 2, 1)


@pytest.mark.parametrize("size", [4, 48, 100])
def test_invalid_image_size_names_the_key(size: int) -> None:
    with pytest.raises(ValueError, match=r"model\.gan\.image_size"):
        Generator(sentence_dim=SENTENCE_DIM, image_size=size)
    with pytest.raises(ValueError, match=r"model\.gan\.image_size"):
        Discriminator(image_size=size)


def test_wrong_multiplier_count_names_the_key() -> None:
    with pytest.raises(ValueError, match=r"model\.gan\.generator_multipliers"):
        Generator(sentence_dim=SENTENCE_DIM, image_size=32, channel_multipliers=(4, 2, 1))


def test_affine_fusion_is_identity_at_init() -> None:
    affine = Affine(cond_dim=SENTENCE_DIM + 10, channels=6)
    x, cond = torch.randn(2, 6, 5, 5), torch.randn(2, SENTENCE_DIM + 10) * 10
    assert torch.equal(affine.gamma(cond), torch.ones(2, 6))
    assert torch.equal(affine.beta(cond), torch.zeros(2, 6))
    assert torch.equal(affine(x, cond), x)


def test_bf16_autocast_forward_and_penalty_on_cpu() -> None:
    gen = Generator(noise_dim=10, sentence_dim=SENTENCE_DIM, base_channels=4, image_size=16)
    disc = Discriminator(base_channels=4, image_size=16)
    head = PairHead(disc.out_channels, SENTENCE_DIM)
    images, sentences = torch.rand(2, 3, 16, 16) * 2 - 1, torch.randn(2, SENTENCE_DIM)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fake = gen(torch.randn(2, 10), sentences)
        real_logits = head(disc(images), sentences)
        fake_logits = head(disc(fake.detach()), sentences)
        mismatch_logits = head(disc(images), sentences.roll(1, 0))
        d = discriminator_hinge_loss(real_logits, fake_logits, mismatch_logits)
        penalty = matching_aware_gradient_penalty(disc, head, images, sentences)
    assert fake.shape == (2, 3, 16, 16) and real_logits.shape == (2,)
    assert penalty.dtype == torch.float32 and d["d_loss"].dtype == torch.float32
    (d["d_loss"] + penalty).backward()
    assert all(torch.isfinite(p.grad).all() for p in disc.parameters() if p.grad is not None)
