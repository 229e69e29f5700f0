"""The networks of a text-conditioned GAN baseline in the DF-GAN family (Tao et al., "DF-GAN: A Simple and Effective
Baseline for Text-to-Image Synthesis", CVPR 2022).

- `Generator`: noise → 4×4 map → `UpBlock`s whose convolutions are interleaved with deep text-image fusion
  (`DFBlock`: stacked text-conditioned channel-wise affine transforms, `Affine`) → RGB in [-1, 1].
- `Discriminator`: image → 4×4 feature map through residual downsampling blocks (`DownBlock`, DF-GAN's D_Block).
- `PairHead`: DF-GAN's conditional head; one logit per (image, sentence) pair from the features and the sentence.

The judgement of a pair is `PairHead(Discriminator(image), sentence)`. Images are B×3×S×S in [-1, 1]; sentences are
B×D sentence vectors. No module assumes a dtype, so all run under bf16 autocast.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

LEAK = 0.2


def _levels(image_size: int) -> int:
    """Number of resolutions 4, 8, …, image_size; raises unless image_size = 4·2^k ≥ 8."""
    if image_size < 8 or image_size & (image_size - 1):
        valid = ", ".join(str(4 * 2**k) for k in range(1, 9))
        raise ValueError(f"model.gan.image_size must be a power of two ≥ 8 ({valid}, …); got {image_size}")
    return int(math.log2(image_size)) - 1


def default_generator_multipliers(image_size: int) -> tuple[int, ...]:
    """Width multipliers of the generator from 4×4 up to `image_size`.

    DF-GAN's NetG uses ngf·min(8, S/r) at resolution r (256²: 8,8,8,8,4,2,1). The cap of 8 is lowered to S/16 for
    small images, so 32² (2,2,2,1) stays CPU-sized; from 128² on this is exactly DF-GAN's rule."""
    cap = max(1, min(8, image_size // 16))
    return tuple(min(cap, image_size // 4 // 2**i) for i in range(_levels(image_size)))


def default_discriminator_multipliers(image_size: int) -> tuple[int, ...]:
    """Width multipliers of the discriminator from `image_size` down to 4×4: DF-GAN's NetD, ndf·min(2^i, 8)."""
    return tuple(min(2**i, 8) for i in range(_levels(image_size)))


def _check_multipliers(multipliers: Sequence[int], image_size: int, key: str) -> tuple[int, ...]:
    levels = _levels(image_size)
    if len(multipliers) != levels or any(int(m) < 1 for m in multipliers):
        raise ValueError(
            f"{key} needs {levels} positive multipliers for image_size {image_size} (one per resolution 4…"
            f"{image_size}); got {list(multipliers)}"
        )
    return tuple(int(m) for m in multipliers)


class Affine(nn.Module):
    """DF-GAN's affine transformation: h ↦ γ(c)·h + β(c), with channel-wise γ and β predicted by two small MLPs
    (Linear → ReLU → Linear) from the condition c = cat(z, s)."""

    def __init__(self, cond_dim: int, channels: int) -> None:
        super().__init__()
        self.gamma = nn.Sequential(nn.Linear(cond_dim, channels), nn.ReLU(), nn.Linear(channels, channels))
        self.beta = nn.Sequential(nn.Linear(cond_dim, channels), nn.ReLU(), nn.Linear(channels, channels))
        # As in DF-GAN: γ ≡ 1, β ≡ 0 at start, so the fusion begins as the identity and text is blended in gradually.
        nn.init.zeros_(self.gamma[2].weight)
        nn.init.ones_(self.gamma[2].bias)
        nn.init.zeros_(self.beta[2].weight)
        nn.init.zeros_(self.beta[2].bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """x: B×C×H×W, cond: B×cond_dim → B×C×H×W."""
        return self.gamma(cond)[:, :, None, None] * x + self.beta(cond)[:, :, None, None]


class DFBlock(nn.Module):
    """DF-GAN's deep fusion block: Affine → LeakyReLU(0.2) → Affine → LeakyReLU(0.2). Stacking affines with
    nonlinearities between them gives a deeper, nonlinear text-image fusion than a single conditional norm."""

    def __init__(self, cond_dim: int, channels: int) -> None:
        super().__init__()
        self.affine0 = Affine(cond_dim, channels)
        self.affine1 = Affine(cond_dim, channels)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = F.leaky_relu(self.affine0(x, cond), LEAK)
        return F.leaky_relu(self.affine1(h, cond), LEAK)


class UpBlock(nn.Module):
    """DF-GAN's UPBlock (G_Block): nearest ×2 upsampling, then shortcut + (DFBlock → 3×3 conv → DFBlock → 3×3 conv);
    the shortcut is a 1×1 conv where the width changes."""

    def __init__(self, in_channels: int, out_channels: int, cond_dim: int) -> None:
        super().__init__()
        self.fuse1 = DFBlock(cond_dim, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, 1, 1)
        self.fuse2 = DFBlock(cond_dim, out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1)
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        h = self.conv2(self.fuse2(self.conv1(self.fuse1(x, cond)), cond))
        return self.shortcut(x) + h


class Generator(nn.Module):
    """DF-GAN's one-stage generator (NetG): z → linear → 4×4×(m₀·base) → UpBlocks to `image_size` → LeakyReLU →
    3×3 conv → tanh. Every fusion is conditioned on cond = cat(z, s), as in the official code.

    `channel_multipliers` gives the width per resolution 4, 8, …, image_size (× base_channels);
    default `default_generator_multipliers(image_size)`."""

    def __init__(
        self,
        noise_dim: int = 100,
        sentence_dim: int = 128,
        base_channels: int = 32,
        image_size: int = 32,
        channel_multipliers: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if channel_multipliers is None:
            channel_multipliers = default_generator_multipliers(image_size)
        mult = _check_multipliers(channel_multipliers, image_size, "model.gan.generator_multipliers")
        widths = [m * base_channels for m in mult]
        self.noise_dim, self.sentence_dim, self.image_size = noise_dim, sentence_dim, image_size
        self.channel_multipliers = mult
        cond_dim = noise_dim + sentence_dim
        self.fc = nn.Linear(noise_dim, widths[0] * 4 * 4)
        self.blocks = nn.ModuleList(UpBlock(i, o, cond_dim) for i, o in itertools.pairwise(widths))
        self.to_rgb = nn.Sequential(nn.LeakyReLU(LEAK), nn.Conv2d(widths[-1], 3, 3, 1, 1), nn.Tanh())

    def forward(self, noise: torch.Tensor, sentence: torch.Tensor) -> torch.Tensor:
        """noise: B×noise_dim, sentence: B×sentence_dim → images B×3×image_size×image_size in [-1, 1]."""
        out = self.fc(noise).view(noise.shape[0], -1, 4, 4)
        cond = torch.cat((noise, sentence), dim=1)
        for block in self.blocks:
            out = block(out, cond)
        return self.to_rgb(out)


class DownBlock(nn.Module):
    """DF-GAN's D_Block: residual branch conv 4×4 stride 2 → LeakyReLU → conv 3×3 → LeakyReLU, shortcut 1×1 conv
    (where the width changes) + 2×2 average pooling; out = shortcut + γ·residual with a learned γ initialised at 0,
    so D starts as a shallow network and grows its residual branches as training needs them."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.residual = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 4, 2, 1, bias=False),
            nn.LeakyReLU(LEAK),
            nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False),
            nn.LeakyReLU(LEAK),
        )
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        res = self.residual(x)
        # Cast the fp32 gain so a bf16 residual is not promoted to fp32 (memory); gradients still reach γ.
        return F.avg_pool2d(self.shortcut(x), 2) + self.gamma.to(res.dtype) * res


class Discriminator(nn.Module):
    """DF-GAN's NetD: image → 3×3 conv → DownBlocks → features B×(m_last·base)×4×4 (8·base by default);
    `out_channels` is that width, to build the `PairHead`.

    `channel_multipliers` gives the width per resolution image_size, …, 8, 4 (× base_channels);
    default `default_discriminator_multipliers(image_size)`."""

    def __init__(
        self, base_channels: int = 32, image_size: int = 32, channel_multipliers: Sequence[int] | None = None
    ) -> None:
        super().__init__()
        if channel_multipliers is None:
            channel_multipliers = default_discriminator_multipliers(image_size)
        mult = _check_multipliers(channel_multipliers, image_size, "model.gan.discriminator_multipliers")
        widths = [m * base_channels for m in mult]
        self.image_size, self.channel_multipliers, self.out_channels = image_size, mult, widths[-1]
        self.conv_img = nn.Conv2d(3, widths[0], 3, 1, 1)
        self.blocks = nn.Sequential(*(DownBlock(i, o) for i, o in itertools.pairwise(widths)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: B×3×image_size×image_size → features B×out_channels×4×4."""
        return self.blocks(self.conv_img(images))


class PairHead(nn.Module):
    """DF-GAN's conditional head (NetC): the sentence vector, replicated to 4×4, is concatenated to the image
    features; conv 3×3 → LeakyReLU → conv 4×4 gives one logit per (image, sentence) pair, so D judges both realism
    and text-image consistency."""

    def __init__(self, feature_channels: int, sentence_dim: int) -> None:
        super().__init__()
        self.sentence_dim = sentence_dim
        hidden = max(1, feature_channels // 4)  # DF-GAN: ndf·8 features → ndf·2
        self.joint = nn.Sequential(
            nn.Conv2d(feature_channels + sentence_dim, hidden, 3, 1, 1, bias=False),
            nn.LeakyReLU(LEAK),
            nn.Conv2d(hidden, 1, 4, 1, 0, bias=False),
        )

    def forward(self, features: torch.Tensor, sentence: torch.Tensor) -> torch.Tensor:
        """features: B×C×4×4, sentence: B×sentence_dim → logits (B,)."""
        if features.shape[-2:] != (4, 4):
            raise ValueError(f"PairHead expects 4×4 features; got {tuple(features.shape)}")
        tiled = sentence[:, :, None, None].expand(-1, -1, 4, 4)
        return self.joint(torch.cat((features, tiled), dim=1)).reshape(features.shape[0])
