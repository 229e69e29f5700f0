"""Image metrics: Fréchet and kernel distances in a chosen feature space (torchmetrics), and CLIP score.

Features are extracted once per image and handed to torchmetrics' `FrechetInceptionDistance` and
`KernelInceptionDistance` through a pass-through module, so one extraction feeds both metrics and the real
images' features can be cached on disk. Every extractor takes uint8 images (clamped and rounded by
`capdiff.data.transforms.unit_to_uint8`). The metric names say which feature space made them:
`fid_inception`/`kid_inception` for torchmetrics' Inception, `fd_<space>`/`kd_<space>` for the others.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance  # the package only re-exports it with torch-fidelity
from torchmetrics.image.kid import KernelInceptionDistance

from capdiff.checkpoints.io import atomic_save
from capdiff.models.hub import load_pretrained
from capdiff.models.vision import CLIP_MEAN, CLIP_STD

log = logging.getLogger(__name__)

FEATURES = ("inception", "clip", "dinov2", "probe")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def metric_names(feature: str) -> tuple[str, str]:
    return ("fid_inception", "kid_inception") if feature == "inception" else (f"fd_{feature}", f"kd_{feature}")


class HFImageFeatures(nn.Module):
    """A Hugging Face vision model as a feature extractor: CLIP's projected image embedding, or DINOv2's class
    token. uint8 images are resized (bicubic, antialiased) to the model's input size and normalized."""

    def __init__(self, kind: str, name_or_path: str, key: str) -> None:
        super().__init__()
        from transformers import AutoModel, CLIPVisionModelWithProjection

        self.kind = kind
        if kind == "clip":
            self.model = load_pretrained(CLIPVisionModelWithProjection.from_pretrained, name_or_path, key)
            mean, std = CLIP_MEAN, CLIP_STD
            self.num_features = self.model.config.projection_dim
        elif kind == "dinov2":
            self.model = load_pretrained(AutoModel.from_pretrained, name_or_path, key)
            mean, std = IMAGENET_MEAN, IMAGENET_STD
            self.num_features = self.model.config.hidden_size
        else:
            raise ValueError(f"{key}: unknown feature space {kind!r}; use one of {FEATURES}.")
        self.size = int(self.model.config.image_size)
        self.model.eval().requires_grad_(False)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.mean.device).float() / 255
        x = F.interpolate(x, size=(self.size, self.size), mode="bicubic", antialias=True, align_corners=False)
        x = ((x.clamp(0, 1) - self.mean) / self.std).to(self.model.dtype)
        if self.kind == "clip":
            return self.model(pixel_values=x).image_embeds.float()
        return self.model(pixel_values=x).last_hidden_state[:, 0].float()


class ProbeFeatures(nn.Module):
    """The shapes probe's penultimate layer."""

    def __init__(self, probe: nn.Module) -> None:
        super().__init__()
        self.probe = probe.eval()
        self.num_features = 128

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.probe.features(images.to(next(self.probe.parameters()).device))


def inception_features(weights_path: str | None) -> nn.Module:
    """torchmetrics' FID Inception (2048-d pool features); needs torch-fidelity and its weights."""
    try:
        from torchmetrics.image.fid import NoTrainInceptionV3

        return NoTrainInceptionV3(
            name="inception-v3-compat", features_list=["2048"], feature_extractor_weights_path=weights_path
        )
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            "eval.fid.feature=inception needs torch-fidelity: `make install EXTRAS=dev,slurm,sweep,demo,inception` "
            "(it downloads the Inception weights on first use; pass eval.fid.weights_path=<file> where there is no "
            "network), or use eval.fid.feature=probe|clip|dinov2."
        ) from err


class FullPrecision(nn.Module):
    """A feature network run in float32 with autocast off: real images are read inside the evaluation loop's
    step (under the trainer's bf16 autocast) and generated ones after it, and FID compares the two sets."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.num_features = net.num_features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.autocast(images.device.type, enabled=False):
            return self.net(images).float()


def build_extractor(feature: str, name_or_path: str | None, weights_path: str | None, probe: Callable) -> nn.Module:
    """The feature network for `eval.fid.feature` (float32 whatever the trainer's precision); `probe()` makes
    the shapes probe when it is asked for."""
    return FullPrecision(_feature_network(feature, name_or_path, weights_path, probe))


def _feature_network(feature: str, name_or_path: str | None, weights_path: str | None, probe: Callable) -> nn.Module:
    if feature == "inception":
        return inception_features(weights_path)
    if feature == "probe":
        return ProbeFeatures(probe())
    if feature in ("clip", "dinov2"):
        if not name_or_path:
            example = "openai/clip-vit-base-patch16" if feature == "clip" else "facebook/dinov2-base"
            raise ValueError(
                f"eval.fid.feature={feature} needs eval.fid.name_or_path: a hub name or folder, e.g. {example}."
            )
        return HFImageFeatures(feature, name_or_path, "eval.fid.name_or_path")
    raise ValueError(f"eval.fid.feature={feature!r} is not a feature space; use one of {', '.join(FEATURES)}.")


class _Given(nn.Module):
    """Hands features computed elsewhere to torchmetrics unchanged."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


class ImageDistances(nn.Module):
    """FID and KID over features; `update(features, real)` on every rank, `compute()` syncs the states."""

    def __init__(self, feature: str, num_features: int, kid_subset_size: int = 1000) -> None:
        super().__init__()
        self.names = metric_names(feature)
        self.fid = FrechetInceptionDistance(feature=_Given(num_features), reset_real_features=False)
        self.kid = KernelInceptionDistance(
            feature=_Given(num_features), subset_size=kid_subset_size, reset_real_features=False
        )

    def update(self, features: torch.Tensor, real: bool) -> None:
        features = features.double()
        self.fid.update(features, real=real)
        self.kid.update(features, real=real)

    def compute(self) -> dict[str, float]:
        fd_name, kd_name = self.names
        real = int(self.fid.real_features_num_samples)
        fake = int(self.fid.fake_features_num_samples)
        subset = min(self.kid.subset_size, real, fake)
        self.kid.subset_size = subset  # the KID subsets cannot be larger than the sample
        kid_mean, kid_std = self.kid.compute()
        return {fd_name: float(self.fid.compute()), kd_name: float(kid_mean), f"{kd_name}_std": float(kid_std)}


def real_stats_key(
    urls: list[str], split: str, feature: str, extractor_id: str, resolution: int, count: int, data: dict | None = None
) -> str:
    """What the cached real features depend on; any change gives another file. `data`: what the shards were
    written from, for data a run writes itself (the shapes). The features are float32 (`FullPrecision`) and the
    images the first `count` of the split in shard order, so neither the trainer's precision nor the number of
    ranks is part of it."""
    identity = {
        "selection": "first-n-in-shard-order",
        "written_as": data,
        "urls": list(urls),
        "split": split,
        "feature": feature,
        "extractor": extractor_id,
        "resolution": resolution,
        "num_samples": count,
        "torchmetrics": importlib.metadata.version("torchmetrics"),
    }
    return hashlib.sha1(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def load_real_features(folder: Path, key: str) -> dict[str, torch.Tensor] | None:
    path = folder / f"{key}.pt"
    return torch.load(path, weights_only=True) if path.is_file() else None


def save_real_features(folder: Path, key: str, features: dict[str, torch.Tensor]) -> Path:
    """Written to a temp name and renamed: a reader never sees half a file."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{key}.pt"
    atomic_save(features, path)
    return path


class _ClipFeatures(nn.Module):
    """A CLIPModel whose `get_image_features`/`get_text_features` return tensors, as torchmetrics' CLIPScore
    expects; since transformers 5 they return a model output whose `pooler_output` is the projected embedding."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.config = model.config

    @staticmethod
    def _tensor(out):
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def get_image_features(self, *args, **kwargs) -> torch.Tensor:
        return self._tensor(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs) -> torch.Tensor:
        return self._tensor(self.model.get_text_features(*args, **kwargs))


def clip_score_metric(name_or_path: str, key: str = "eval.clip.name_or_path"):
    """torchmetrics `CLIPScore` with a CLIP model by hub name or local folder (any, not only its own list)."""
    from torchmetrics.multimodal import CLIPScore
    from transformers import CLIPModel, CLIPProcessor

    def load():
        model = load_pretrained(CLIPModel.from_pretrained, name_or_path, key).eval()
        return _ClipFeatures(model), load_pretrained(CLIPProcessor.from_pretrained, name_or_path, key)

    return CLIPScore(model_name_or_path=load)


def truncate_for_clip(metric, prompts: list[str]) -> list[str]:
    """Prompts cut to the CLIP text encoder's token limit here, so nothing is truncated silently later."""
    tokenizer = metric.processor.tokenizer
    limit = int(metric.model.config.text_config.max_position_embeddings)  # with the start and end tokens
    out = []
    for prompt in prompts:
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        out.append(prompt if len(ids) <= limit - 2 else tokenizer.decode(ids[: limit - 2]))
    return out
