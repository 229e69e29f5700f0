"""Cross-modal retrieval on validation pairs: recall@K image→text and text→image (torchmetrics)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics.retrieval import RetrievalRecall


def retrieval_recall(image_embeds: torch.Tensor, text_embeds: torch.Tensor, ks=(1, 5, 10)) -> dict[str, float]:
    """Row i of each is one pair. `i2t_r@K`: for each image, is its own caption among the K most similar texts."""
    if image_embeds.shape[0] != text_embeds.shape[0]:
        raise ValueError(f"retrieval needs pairs: {image_embeds.shape[0]} images vs {text_embeds.shape[0]} texts")
    sim = F.normalize(image_embeds.float(), dim=-1) @ F.normalize(text_embeds.float(), dim=-1).T
    n = sim.shape[0]
    target = torch.eye(n, dtype=torch.bool)
    queries = torch.arange(n).repeat_interleave(n)
    out = {}
    for direction, scores in (("i2t", sim), ("t2i", sim.T)):
        for k in ks:
            recall = RetrievalRecall(top_k=k)
            out[f"{direction}_r@{k}"] = float(recall(scores.flatten(), target.flatten(), indexes=queries))
    return out
