"""The joint recipe: one LLM captions images and conditions a latent DDIM UNet that generates them.

- `spec`: the typed config (`model.*`).
- `model`: `JointModel`, the plain `nn.Module` (parts, text encoding, losses, captioning, generation).
- `module`: `JointModule`, the LightningModule that trains it.
"""

from capdiff.joint.model import JointModel
from capdiff.joint.module import JointModule
from capdiff.joint.spec import JointSpec

__all__ = ["JointModel", "JointModule", "JointSpec"]
