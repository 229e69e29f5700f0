"""Text conditioner: the text-only LLM pass → connector → UNet cross-attention tokens, and the text embedding."""

from __future__ import annotations

import torch
from torch import nn


class TextConditioner(nn.Module):
    """LLM hidden states (B×L×d_llm) → `{"cond": B×L×d_cross, "cond_mask", "text_embed": B×d_embed}`.

    The text embedding is the projected hidden state at the last real token (`pool="last"`), which is the
    only position of a causal LM that has seen the whole caption, or the masked mean (`pool="mean"`).

    With `diffusion_grad=False` the diffusion loss trains the connector but not the LLM under it: the UNet
    reads the LLM's states as they are, as Stable Diffusion reads a frozen text encoder.
    """

    def __init__(
        self,
        llm_dim: int,
        cross_dim: int,
        embed_dim: int,
        hidden: int = 512,
        pool: str = "last",
        diffusion_grad: bool = True,
    ):
        super().__init__()
        self.diffusion_grad = diffusion_grad
        if pool not in ("last", "mean"):
            raise ValueError(f"model.conditioner.pool={pool!r}: use 'last' or 'mean'.")
        self.pool = pool
        self.connector = nn.Sequential(
            nn.LayerNorm(llm_dim), nn.Linear(llm_dim, hidden), nn.GELU(), nn.Linear(hidden, cross_dim)
        )
        self.to_embed = nn.Linear(llm_dim, embed_dim, bias=False)

    def pooled(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.pool == "mean":
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1)
        last = mask.sum(dim=1) - 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor, embed: bool = True) -> dict[str, torch.Tensor]:
        out = {"cond": self.connector(hidden if self.diffusion_grad else hidden.detach()), "cond_mask": mask}
        if embed:
            out["text_embed"] = self.to_embed(self.pooled(hidden, mask))
        return out
