"""A checkpoint's captioner and contrastive heads over a batch of images: synthetic captions, and the score of
every (image, caption) pair, the original's included."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from capdiff.data.transforms import as_unit
from capdiff.evaluation.generation import can_score, image_text_scores


@dataclass(frozen=True)
class Decoding:
    """How captions are generated: greedy (the default), beam search (`num_beams`) or nucleus sampling
    (`sample`, BLIP's choice for CapFilt's captioner: more diverse captions than beam search); `num_candidates`
    captions per image."""

    num_beams: int = 1
    num_candidates: int = 1
    sample: bool = False
    top_p: float = 0.9
    temperature: float = 1.0
    max_new_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.num_candidates > 1 and not self.sample and self.num_beams < self.num_candidates:
            raise ValueError(
                f"--num-candidates {self.num_candidates}: greedy decoding has one caption per image; pass --sample, "
                f"or --num-beams {self.num_candidates} (or more)"
            )
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p {self.top_p}: not in (0, 1]")
        if self.temperature <= 0:
            raise ValueError(f"--temperature {self.temperature}: not a positive number")

    def generate_kwargs(self) -> dict:
        kwargs = {
            "num_beams": self.num_beams,
            "num_return_sequences": self.num_candidates,
            "max_new_tokens": self.max_new_tokens,
        }
        if self.sample:
            kwargs |= {"do_sample": True, "top_p": self.top_p, "temperature": self.temperature}
        return kwargs

    def describe(self) -> dict:
        return asdict(self)


class Recaptioner:
    """Captions images with `model` (a `capdiff.joint.JointModel`) and scores each caption against its image
    with the model's contrastive heads, as evaluation scores generations (`image_text_scores`)."""

    def __init__(self, model: torch.nn.Module, decoding: Decoding) -> None:
        if not getattr(model, "can_caption", False):
            raise ValueError("this model has no captioner (trained with model.loss.weights.caption=0, or a GAN)")
        if not can_score(model):
            raise ValueError(
                "this model has no contrastive heads to score captions with (trained with "
                "model.loss.weights.contrastive=0)"
            )
        self.model = model
        self.decoding = decoding

    @torch.inference_mode()
    def __call__(self, pixels: torch.Tensor, originals: list[str]) -> list[dict]:
        """uint8 B×3×H×W images and their original captions → one record per image: `caption_orig`,
        `score_orig`, and `caption_syn` / `score_syn` with the best-scored candidate first."""
        unit = as_unit(pixels.to(self.model.device))
        n = self.decoding.num_candidates
        synthetic = self.model.caption(unit, **self.decoding.generate_kwargs())  # image i's candidates: i*n ...
        prompts = [text for i, orig in enumerate(originals) for text in (orig, *synthetic[i * n : (i + 1) * n])]
        scores = image_text_scores(self.model, unit.repeat_interleave(n + 1, dim=0), prompts).view(-1, n + 1)
        records = []
        for i, orig in enumerate(originals):
            ranked = sorted(zip(synthetic[i * n : (i + 1) * n], scores[i, 1:].tolist(), strict=True),
                            key=lambda pair: -pair[1])  # fmt: skip
            records.append(
                {
                    "caption_orig": orig,
                    "caption_syn": [c for c, _ in ranked],
                    "score_orig": scores[i, 0].item(),
                    "score_syn": [s for _, s in ranked],
                }
            )
        return records
