"""The GAN baseline recipe (`experiment=text_gan`): DF-GAN (Tao et al., 2022) on the joint recipe's text encoder.

- `spec`: the typed config (`model.*`).
- `networks`, `losses`: the generator, discriminator and pair head; hinge losses and MA-GP.
- `model`: `TextGAN`, the plain `nn.Module`.
- `module`: `GANModule`, the LightningModule that trains it (manual optimization, two optimizers).
"""

from capdiff.gan.model import TextGAN
from capdiff.gan.module import GANModule

__all__ = ["GANModule", "TextGAN"]
