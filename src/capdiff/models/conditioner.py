"""Text conditioner: the text-only LLM pass → connector → UNet cross-attention tokens, and the text embedding."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from capdiff.models.connectors import build_connector

log = logging.getLogger(__name__)


class TextConditioner(nn.Module):
    """LLM hidden states → `{"cond": B×L×d_cross, "cond_mask", "text_embed": B×d_embed}`.

    The connector (`capdiff.models.connectors`, `model.conditioner.connector`) makes the UNet's tokens; it also
    says which LLM layers it reads and which learned tokens the LLM reads after the caption
    (`JointModel.encode_text` runs the pass it asks for).

    The text embedding is the projected last-layer state at the last position the LLM read (`pool="last"`: the
    last word, or the last appended query), the only position of a causal LM that has seen the whole caption,
    or the masked mean (`pool="mean"`).

    With `diffusion_grad=False` the diffusion loss trains the connector but not the LLM under it: the UNet
    reads the LLM's states as they are, as Stable Diffusion reads a frozen text encoder.

    With `lexical=True` (and a connector whose tokens are the caption's words) a learned table of the
    tokenizer's ids (`vocab_size` rows, N(0, 1) like a fresh embedding) is added to each condition token: the
    UNet gets every word's identity as a distinct vector from the first step, while the connector's states add
    what the LLM read around it. A language model's states keep words that fill the same slot close together
    ("circle" and "square", "left" and "right" share their contexts), and the UNet then learns to tell them
    apart far more slowly than from distinct vectors (docs/conditioning.md measures both).
    """

    def __init__(
        self,
        llm_dim: int,
        cross_dim: int,
        embed_dim: int,
        connector: dict[str, Any],
        num_layers: int,
        pool: str = "last",
        diffusion_grad: bool = True,
        lexical: bool = False,
        vocab_size: int = 0,
    ):
        super().__init__()
        self.diffusion_grad = diffusion_grad
        if pool not in ("last", "mean"):
            raise ValueError(f"model.conditioner.pool={pool!r}: use 'last' or 'mean'.")
        self.pool = pool
        self.connector = build_connector(connector, llm_dim, cross_dim, num_layers)
        if not diffusion_grad and self.connector.query_tokens() is not None:
            raise ValueError(
                "model.conditioner.diffusion_grad=false with a connector of learned query tokens: the queries learn "
                "through the LLM's pass, which diffusion_grad=false cuts. Set model.conditioner.diffusion_grad=true "
                "(freeze the LLM itself with model.llm.freeze) or choose another connector."
            )
        self.to_embed = nn.Linear(llm_dim, embed_dim, bias=False)
        self.lexical = None
        if lexical and not self.connector.per_token:
            log.warning(
                "model.conditioner.lexical: %s makes tokens of its own, not one per caption word; the lexical table "
                "is left out (it applies to mlp, refiner and layer_mix).",
                type(self.connector).__name__,
            )
        elif lexical:
            if vocab_size < 1:
                raise ValueError("model.conditioner.lexical=true needs the tokenizer's vocabulary size.")
            self.lexical = nn.Embedding(vocab_size, cross_dim)

    def pooled(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.pool == "mean":
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1)
        positions = torch.arange(mask.shape[1], device=mask.device)
        last = (mask.bool() * (positions + 1)).argmax(dim=1)  # the last position read, wherever the padding is
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]

    def forward(
        self,
        layers: list[torch.Tensor],
        last: torch.Tensor,
        mask: torch.Tensor,
        embed: bool = True,
        ids: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """`layers`: the LLM's hidden states at the connector's `hidden_layers`; `last`: its last layer; `ids`:
        the caption's token ids (what the `lexical` table reads)."""
        read = layers if self.diffusion_grad else [s.detach() for s in layers]
        cond, cond_mask = self.connector(read, mask)
        if self.lexical is not None:
            if ids is None:
                raise ValueError("the lexical table needs the caption's token ids (LanguageModel.text_hidden's ids).")
            cond = cond + self.lexical(ids).to(cond.dtype)
        out = {"cond": cond, "cond_mask": cond_mask}
        if embed:
            out["text_embed"] = self.to_embed(self.pooled(last, mask))
        return out
