"""The scores of generated images, for each variant of them: as generated, and after the post-processing chain
of `eval.postprocess` (`capdiff.postprocess`), whose metrics carry its name (`median/fd_probe`). Every variant
is scored by the same feature network, probe and image–text scorer, so the two rows compare."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from capdiff.data.transforms import unit_to_uint8
from capdiff.distributed import gather_lists
from capdiff.evaluation.images import ImageDistances, truncate_for_clip
from capdiff.evaluation.shapes import ATTRIBUTES, parse_caption


def attributes_named(text: str) -> dict[str, str]:
    return {k: v for k, v in parse_caption(text).items() if v is not None}


def image_text_scores(scorer: nn.Module, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """100 × the cosine between a model's contrastive image and text embeddings (clamped at 0, as CLIPScore)."""
    image = nn.functional.normalize(scorer.vision(pixels)["image_embed"].float(), dim=-1)
    text = nn.functional.normalize(scorer.encode_text(prompts, embed=True)["text_embed"].float(), dim=-1)
    return (100 * (image * text).sum(-1)).clamp(min=0)


def can_score(model: nn.Module | None) -> bool:
    """Whether `model` has contrastive heads to score image–text pairs with (a joint model trained with them)."""
    return getattr(model, "vision", None) is not None and getattr(model, "logit_scale", None) is not None


class VariantScores(nn.Module):
    """FID/KID (or FD/KD), probe attribute accuracy and the image–text score of one variant at one guidance
    scale; `update` per batch on every rank, `compute` gathers."""

    def __init__(
        self,
        name: str | None,
        transform: Callable[[torch.Tensor], torch.Tensor] | None,
        distances: ImageDistances | None,
        clip_score=None,
    ) -> None:
        super().__init__()
        self.prefix = f"{name}/" if name else ""
        self.transform = transform
        self.distances = distances
        self.clip_score = copy.deepcopy(clip_score) if (clip_score is not None and name) else clip_score
        self.predictions: list[dict] = []
        self.truths: list[dict] = []
        self.own_scores: list[float] = []

    def variant(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels if self.transform is None else self.transform(pixels)

    def update(self, pixels: torch.Tensor, prompts: list[str], extractor, probe, scorer) -> torch.Tensor:
        """Score one batch of generated `pixels` ([-1, 1]) for `prompts`; returns this variant's pixels."""
        pixels = self.variant(pixels)
        images = unit_to_uint8(pixels)
        if self.distances is not None:
            self.distances.update(extractor(images).double(), real=False)
        if probe is not None:
            self.predictions += probe.predict(images)
            self.truths += [attributes_named(p) for p in prompts]
        if self.clip_score is not None:
            self.clip_score.update(images, truncate_for_clip(self.clip_score, prompts))
        elif can_score(scorer):
            self.own_scores += image_text_scores(scorer, pixels, prompts).tolist()
        return pixels

    def compute(self, scorer) -> dict[str, float]:
        results: dict[str, float] = {}
        if self.distances is not None:
            results |= self.distances.compute()
        if self.clip_score is not None:
            results["clip_score"] = float(self.clip_score.compute())
            self.clip_score.reset()
        elif can_score(scorer):
            scores = gather_lists(self.own_scores)
            results["capdiff_image_text_score"] = sum(scores) / max(1, len(scores))
        predictions, truths = gather_lists(self.predictions), gather_lists(self.truths)
        named = [(p, t) for p, t in zip(predictions, truths, strict=True) if t]
        if named:
            hits = {a: [p[a] == t[a] for p, t in named if a in t] for a in ATTRIBUTES}
            results |= {f"probe_attr/{a}": sum(h) / len(h) for a, h in hits.items() if h}
            per_attr = [v for k, v in results.items() if k.startswith("probe_attr/")]
            results["probe_attr/mean"] = sum(per_attr) / len(per_attr)
            results["probe_attr/all"] = sum(all(p[a] == t[a] for a in t) for p, t in named) / len(named)
        return {self.prefix + k: v for k, v in results.items()}
