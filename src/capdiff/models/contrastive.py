"""The learnable temperature of the contrastive loss (CLIP, Radford et al., 2021)."""

from __future__ import annotations

import math

import torch
from torch import nn


class LogitScale(nn.Module):
    """`exp(s)` with `s` initialised at ln(1/τ₀), kept in [0, ln(max_scale)] as CLIP and open_clip do: the
    parameter is clamped after each optimizer step (`clamp_`), not inside `forward`, where a clamp would pass
    no gradient once `s` reached the bound, and the scale could never come back down."""

    def __init__(self, init_temperature: float = 0.07, max_scale: float = 100.0) -> None:
        super().__init__()
        self.log_scale = nn.Parameter(torch.tensor(math.log(1 / init_temperature)))
        self.max_log = math.log(max_scale)

    def forward(self) -> torch.Tensor:
        return self.log_scale.exp()

    @torch.no_grad()
    def clamp_(self) -> None:
        self.log_scale.clamp_(0.0, self.max_log)
