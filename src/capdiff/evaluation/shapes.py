"""Attribute checks on the built-in shapes data: what a caption says, and what an image shows.

- `parse_caption` reads the five attributes (shape, colour, size, position, background) out of a caption in any
  of the dataset's templates, or out of free text that uses the same words.
- `ShapesProbe` is a small CNN trained once on real shapes images to predict their true attributes. It scores
  generated images against their prompts (prompt faithfulness, per attribute), and its penultimate layer is the
  `probe` feature space for Fréchet distances on shapes.
"""

from __future__ import annotations

import io
import json
import logging
import math
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from rich import get_console
from rich.progress import MofNCompleteColumn, Progress
from torch import nn

from capdiff.data.shapes import BACKGROUNDS, COLORS, POSITIONS, SHAPES, SIZES
from capdiff.distributed import is_global_leader, wait_until

log = logging.getLogger(__name__)

ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "color": tuple(COLORS),
    "size": tuple(SIZES),
    "position": tuple(POSITIONS),
    "background": tuple(BACKGROUNDS),
}
PROBE_VERSION = 2

_COLOR = "|".join(BACKGROUNDS)
_SHAPE_WITH_COLOR = re.compile(rf"\b({_COLOR})\s+({'|'.join(SHAPES)})\b")
# Every template names the background in one of these four ways.
_BACKGROUND = re.compile(
    rf"\b({_COLOR})\s+background\b|\bbackground\s+is\s+({_COLOR})\b|\bover\s+({_COLOR})\b|\bof\s+an?\s+({_COLOR})\s+image\b"
)
_POSITION = re.compile(r"\b(top left|top right|bottom left|bottom right|center)\b")
_SIZE = re.compile(rf"\b({'|'.join(SIZES)})\b")


def parse_caption(text: str) -> dict[str, str | None]:
    """The attributes a caption names (None where it names none)."""
    text = " ".join(text.lower().split())
    found: dict[str, str | None] = dict.fromkeys(ATTRIBUTES)
    if match := _SHAPE_WITH_COLOR.search(text):
        found["color"], found["shape"] = match.group(1), match.group(2)
    else:
        shape = re.search(rf"\b({'|'.join(SHAPES)})\b", text)
        found["shape"] = shape.group(1) if shape else None
    if match := _BACKGROUND.search(text):
        found["background"] = next(g for g in match.groups() if g)
    if match := _POSITION.search(text):
        found["position"] = match.group(1)
    if match := _SIZE.search(text):
        found["size"] = match.group(1)
    return found


def attribute_accuracy(predicted: Sequence[dict], truth: Sequence[dict]) -> dict[str, float]:
    """Per-attribute accuracy, their mean (`mean`) and the share with every attribute right (`all`)."""
    if len(predicted) != len(truth) or not truth:
        raise ValueError(
            f"attribute_accuracy needs equally many predictions and truths, got {len(predicted)}, {len(truth)}"
        )
    hits = {name: [p.get(name) == t[name] for p, t in zip(predicted, truth, strict=True)] for name in ATTRIBUTES}
    scores = {name: float(np.mean(h)) for name, h in hits.items()}
    scores["mean"] = float(np.mean(list(scores.values())))
    scores["all"] = float(np.mean([all(h[i] for h in hits.values()) for i in range(len(truth))]))
    return scores


def read_split(urls: Sequence[str], limit: int | None = None) -> tuple[list[str], torch.Tensor, list[dict]]:
    """Keys, uint8 images (N×3×H×W) and true attributes of a shapes split, in shard order."""
    keys, images, attributes = [], [], []
    for sample in wds.tarfile_samples([{"url": u} for u in urls]):
        if "json" not in sample or "png" not in sample:
            raise ValueError(
                f"{sample.get('__url__')}: sample {sample.get('__key__')} has no png/json pair; the probe and the "
                "attribute metrics need the built-in shapes data (data=synthetic)."
            )
        keys.append(sample["__key__"])
        image = Image.open(io.BytesIO(sample["png"])).convert("RGB")
        images.append(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1))
        attributes.append({k: v for k, v in json.loads(sample["json"]).items() if k in ATTRIBUTES})
        if limit is not None and len(keys) >= limit:
            break
    return keys, torch.stack(images), attributes


def labels_of(attributes: Sequence[dict]) -> dict[str, torch.Tensor]:
    return {name: torch.tensor([values.index(a[name]) for a in attributes]) for name, values in ATTRIBUTES.items()}


class ShapesProbe(nn.Module):
    """uint8 images → one logit vector per attribute; `features` is the 128-d penultimate layer."""

    def __init__(self, image_size: int = 32, width: int = 32) -> None:
        super().__init__()
        self.image_size = image_size

        def block(cin: int, cout: int, stride: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]

        self.body = nn.Sequential(
            *block(3, width, 1), *block(width, width, 1), *block(width, 2 * width, 2), *block(2 * width, 2 * width, 1)
        )
        # Shape, colour and size read the same anywhere (pooled); position needs where (a coarse 4×4 map).
        self.where = nn.AdaptiveAvgPool2d(4)
        self.project = nn.Sequential(nn.Linear(2 * width * (2 + 16), 128), nn.ReLU())
        self.heads = nn.ModuleDict({name: nn.Linear(128, len(values)) for name, values in ATTRIBUTES.items()})

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images (or float images already in [-1, 1]) → 128-d features."""
        x = images.float() / 127.5 - 1 if images.dtype == torch.uint8 else images.float()
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = nn.functional.interpolate(x, size=(self.image_size, self.image_size), mode="area")
        x = self.body(x)
        pooled = torch.cat([x.mean((2, 3)), x.amax((2, 3)), self.where(x).flatten(1)], dim=1)
        return self.project(pooled)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.features(images)
        return {name: head(feats) for name, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 256) -> list[dict[str, str]]:
        self.eval()
        out: list[dict[str, str]] = []
        device = next(self.parameters()).device
        for chunk in images.split(batch_size):
            logits = self(chunk.to(device))
            picks = {name: logits[name].argmax(-1).tolist() for name in ATTRIBUTES}
            out.extend({name: ATTRIBUTES[name][picks[name][i]] for name in ATTRIBUTES} for i in range(len(chunk)))
        return out


def degrade(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """uint8 → float in [-1, 1], blurred by a random Gaussian (σ up to 1.2 px) and lightly noised: generated
    images are decoder outputs, never pixel-exact, and the probe must judge them by their content. (No flips
    or shifts: they would change positions.)"""
    x = images.float() / 127.5 - 1
    sigma = float(torch.rand((), generator=generator)) * 1.2
    if sigma > 0.2:
        taps = torch.arange(-2, 3, dtype=torch.float32)
        kernel = torch.exp(-(taps**2) / (2 * sigma**2))
        kernel = (kernel / kernel.sum()).view(1, 1, 1, 5).repeat(3, 1, 1, 1)
        x = nn.functional.conv2d(nn.functional.pad(x, (2, 2, 0, 0), mode="replicate"), kernel, groups=3)
        x = nn.functional.conv2d(nn.functional.pad(x, (0, 0, 2, 2), mode="replicate"), kernel.transpose(2, 3), groups=3)
    noise = torch.randn(x.shape, generator=generator) * 0.03
    return (x + noise).clamp(-1, 1)


def fit_probe(
    images: torch.Tensor, attributes: Sequence[dict], epochs: int = 5, batch_size: int = 64, seed: int = 0
) -> ShapesProbe:
    """Train on real images (degraded at random, see `degrade`) with their true attributes. Works when called
    from inside a no-grad or inference-mode context (e.g. an evaluation callback)."""
    with torch.inference_mode(False), torch.enable_grad():
        return _fit_probe(images, attributes, epochs, batch_size, seed)


def _fit_probe(images: torch.Tensor, attributes: Sequence[dict], epochs: int, batch_size: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    probe = ShapesProbe(image_size=images.shape[-1])
    labels = labels_of(attributes)
    optimizer = torch.optim.AdamW(probe.parameters(), lr=2e-3, weight_decay=1e-4)
    probe.train()
    steps = epochs * math.ceil(len(images) / batch_size)
    # On rich's global console, so that during training it nests under Lightning's progress bar. Transient, and
    # nothing at all where the console is not an interactive terminal (logs, captured output).
    console = get_console()
    columns = (*Progress.get_default_columns(), MofNCompleteColumn())
    with Progress(*columns, console=console, transient=True, disable=not console.is_interactive) as progress:
        task = progress.add_task("training the shapes probe", total=steps)
        for _ in range(epochs):
            order = torch.randperm(len(images), generator=generator)
            for idx in order.split(batch_size):
                logits = probe(degrade(images[idx], generator))
                loss = sum(nn.functional.cross_entropy(logits[n], labels[n][idx]) for n in ATTRIBUTES)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                progress.advance(task)
    return probe.eval()


def probe_folder(data_dir: str | Path, datamodule) -> Path:
    """Where the probe for this datamodule's shapes is cached (shared by evaluate.py and the periodic eval)."""
    from capdiff.artifacts import cache_folder

    return cache_folder(data_dir, "probes", datamodule, {"version": PROBE_VERSION}, urls=datamodule.shapes_train_urls)


def load_probe(train_urls: Sequence[str], val_urls: Sequence[str], cache_dir: str | Path) -> tuple[ShapesProbe, dict]:
    """The probe for this shapes data, trained on its training split once and cached in `cache_dir`;
    returns it with its report (validation accuracy per attribute)."""
    folder = Path(cache_dir)
    weights, report_file = folder / "probe.pt", folder / "probe.json"
    stale = report_file.is_file() and json.loads(report_file.read_text()).get("version") != PROBE_VERSION
    if not report_file.is_file() or stale:
        if is_global_leader():
            log.info("training the shapes probe on %s (once; cached in %s)", train_urls[0], folder)
            _, images, attributes = read_split(train_urls)
            probe = fit_probe(images, attributes)
            _, val_images, val_attributes = read_split(val_urls)
            report = {
                "version": PROBE_VERSION,
                "image_size": images.shape[-1],
                "val_accuracy": attribute_accuracy(probe.predict(val_images), val_attributes),
            }
            folder.mkdir(parents=True, exist_ok=True)
            torch.save(probe.state_dict(), weights)
            report_file.write_text(json.dumps(report, indent=1))  # written last: its presence means complete
        else:
            wait_until(report_file.is_file, 3600, f"the shapes probe in {folder}")
    report = json.loads(report_file.read_text())
    probe = ShapesProbe(image_size=report["image_size"])
    probe.load_state_dict(torch.load(weights, weights_only=True))
    return probe.eval(), report
