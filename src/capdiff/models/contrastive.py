"""The cross-modal contrastive alignment (CLIP, Radford et al., 2021): its learnable temperature and its loss."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


class LogitScale(nn.Module):
    """`exp(s)` with `s` initialised at ln(1/τ₀), kept in [0, ln(max_scale)] as CLIP and open_clip do: the
    parameter is clamped after each optimizer step (`clamp_`), not inside `forward`, where a clamp would pass
    no gradient once `s` reached the bound, and the scale could never come back down.

    `s` is a one-element vector, not a scalar: FSDP shards only parameters with a dimension. Checkpoints that
    saved it as a scalar load as they are."""

    def __init__(self, init_temperature: float = 0.07, max_scale: float = 100.0) -> None:
        super().__init__()
        self.log_scale = nn.Parameter(torch.tensor([math.log(1 / init_temperature)]))
        self.max_log = math.log(max_scale)

    def forward(self) -> torch.Tensor:
        return self.log_scale.exp()[0]

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args, **kwargs) -> None:
        saved = state_dict.get(prefix + "log_scale")
        if saved is not None and saved.ndim == 0:
            state_dict[prefix + "log_scale"] = saved.reshape(1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def clamp_(self) -> None:
        self.log_scale.clamp_(0.0, self.max_log)


def contrastive_loss(
    image_embed: torch.Tensor,
    text_embed: torch.Tensor,
    logit_scale: torch.Tensor,
    gather: Callable[[torch.Tensor], tuple[torch.Tensor, int]] | None = None,
) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP) with open_clip's local loss: this rank's rows against every rank's columns.

    `gather` gives every rank's rows with gradient and the offset of this rank's own in them
    (`capdiff.distributed.gather_rows`); None: this batch alone. Averaged over ranks (as DDP averages
    gradients) the loss equals the loss over the concatenated batch.
    """
    image = F.normalize(image_embed.float(), dim=-1)
    text = F.normalize(text_embed.float(), dim=-1)
    all_image, offset = gather(image) if gather else (image, 0)
    all_text, _ = gather(text) if gather else (text, 0)
    labels = torch.arange(image.shape[0], device=image.device) + offset
    logits_per_image = logit_scale * image @ all_text.T
    logits_per_text = logit_scale * text @ all_image.T
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
