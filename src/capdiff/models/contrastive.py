"""The learnable temperature of the contrastive loss (CLIP, Radford et al., 2021)."""

from __future__ import annotations

import math

import torch
from torch import nn


class LogitScale(nn.Module):
    """`exp(s)` with `s` initialised at ln(1/τ₀) and clamped at ln(max_scale), as CLIP does."""

    def __init__(self, init_temperature: float = 0.07, max_scale: float = 100.0) -> None:
        super().__init__()
        self.log_scale = nn.Parameter(torch.tensor(math.log(1 / init_temperature)))
        self.max_log = math.log(max_scale)

    def forward(self) -> torch.Tensor:
        return self.log_scale.clamp(max=self.max_log).exp()
