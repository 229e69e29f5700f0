"""Vision encoder: a CLIP vision tower, a learned query resampler and a coarse grid of spatial tokens.

The resampler is the Perceiver-resampler idea used by Flamingo (Alayrac et al., 2022): `num_queries` learned
vectors cross-attend to the patch features, giving a fixed number of tokens whatever the image size.
Attention pooling starts out close to an average, which discards *where* things are: on the shapes data a
captioner fed only resampler tokens named colours after 1,500 steps but never positions or sizes (its prefix
moved 40× more for a colour change than for a position change). So the patch grid is also average-pooled
to `grid × grid` tokens, which carry position by construction. Both become the caption prefix (projected into
the LLM's embedding space) and, mean-pooled and projected, the image embedding of the contrastive loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel

from capdiff.models.hub import load_pretrained

# CLIP's input normalization (OpenAI CLIP preprocessing).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ResamplerLayer(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.norm_q = nn.LayerNorm(width)
        self.norm_kv = nn.LayerNorm(width)
        self.cross = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm_mlp = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, queries: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        q = self.norm_q(queries)
        kv = self.norm_kv(features)
        queries = queries + self.cross(q, kv, kv, need_weights=False)[0]
        return queries + self.mlp(self.norm_mlp(queries))


class Resampler(nn.Module):
    """Learned queries cross-attending to the tower's tokens, which get a learned position embedding of
    their own so a query can learn to look somewhere in particular."""

    def __init__(self, in_dim: int, width: int, num_queries: int, layers: int, heads: int, num_tokens: int) -> None:
        super().__init__()
        self.proj_in = nn.Linear(in_dim, width)
        self.positions = nn.Parameter(torch.randn(num_tokens, width) * width**-0.5)
        self.queries = nn.Parameter(torch.randn(num_queries, width) * width**-0.5)
        self.layers = nn.ModuleList(ResamplerLayer(width, heads) for _ in range(layers))
        self.norm_out = nn.LayerNorm(width)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        features = self.proj_in(features) + self.positions
        queries = self.queries.expand(features.shape[0], -1, -1)
        for layer in self.layers:
            queries = layer(queries, features)
        return self.norm_out(queries)


class VisionEncoder(nn.Module):
    """Pixels in `[-1, 1]` → `{"prefix": B×Q×d_llm, "image_embed": B×d_embed}`."""

    def __init__(
        self,
        tower: CLIPVisionModel,
        llm_dim: int,
        embed_dim: int,
        num_queries: int = 8,
        width: int = 256,
        layers: int = 2,
        heads: int = 4,
        grid: int = 4,
        layout_tokens: int = 1,
    ) -> None:
        super().__init__()
        if num_queries == 0 and not grid:
            raise ValueError("model.vision.resampler: num_queries=0 and grid=0 leave no prefix tokens; set either.")
        self.grid = grid
        self.layout_tokens = layout_tokens if grid else 0
        self.tower = tower
        # CLIP's post-layernorm only feeds its pooled output, which capdiff does not use: a trainable but
        # unused weight would make DDP's gradient sync fail.
        tower.post_layernorm.requires_grad_(False)
        tokens = (tower.config.image_size // tower.config.patch_size) ** 2 + 1  # patches and the class token
        self.resampler = (
            Resampler(tower.config.hidden_size, width, num_queries, layers, heads, tokens) if num_queries else None
        )
        self.spatial = nn.Sequential(nn.Linear(tower.config.hidden_size, width), nn.LayerNorm(width)) if grid else None
        # Tokens that each see the whole grid at once, so "where" is as easy to read as "what colour".
        self.layout = nn.Linear(grid * grid * width, self.layout_tokens * width) if self.layout_tokens else None
        self.layout_norm = nn.LayerNorm(width) if self.layout_tokens else None
        self.to_prefix = nn.Linear(width, llm_dim)
        self.to_embed = nn.Linear(width, embed_dim, bias=False)
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def build(cls, name_or_path: str | None, config: dict | None, **kwargs) -> VisionEncoder:
        if name_or_path:
            tower = load_pretrained(CLIPVisionModel.from_pretrained, name_or_path, "model.vision.name_or_path")
        else:
            tower = CLIPVisionModel(CLIPVisionConfig(**(config or {})))
        return cls(tower, **kwargs)

    def preprocess(self, pixels: torch.Tensor) -> torch.Tensor:
        size = self.tower.config.image_size
        images = (pixels + 1) / 2
        if images.shape[-1] != size or images.shape[-2] != size:
            images = F.interpolate(images, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
        return (images - self.mean) / self.std

    @property
    def num_tokens(self) -> int:
        queries = self.resampler.queries.shape[0] if self.resampler is not None else 0
        return queries + (self.grid**2 + self.layout_tokens if self.grid else 0)

    def spatial_tokens(self, features: torch.Tensor) -> torch.Tensor:
        patches = features[:, 1:]  # without the class token
        side = int(patches.shape[1] ** 0.5)
        patches = patches.transpose(1, 2).reshape(patches.shape[0], -1, side, side)
        pooled = F.adaptive_avg_pool2d(patches, self.grid).flatten(2).transpose(1, 2)
        return self.spatial(pooled)

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.tower(pixel_values=self.preprocess(pixels)).last_hidden_state
        parts = [self.resampler(features)] if self.resampler is not None else []
        if self.spatial is not None:
            spatial = self.spatial_tokens(features)
            parts.append(spatial)
            if self.layout is not None:
                layout = self.layout(spatial.flatten(1)).view(spatial.shape[0], self.layout_tokens, -1)
                parts.append(self.layout_norm(layout))
        tokens = torch.cat(parts, dim=1)
        return {"prefix": self.to_prefix(tokens), "image_embed": self.to_embed(tokens.mean(dim=1))}
