"""One evaluation pass over validation data, as a Lightning test loop so it runs the same on one process or
under DDP: every rank captions and generates for its share of the validation samples, FID/KID states sync
through torchmetrics, and lists (captions, embeddings, probe predictions) are gathered to every rank before
the corpus-level scores are computed. The metric modules live here, never in the model's state dict.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import RichProgressBar
from rich.progress import MofNCompleteColumn, Progress

from capdiff.data.transforms import as_unit, unit_to_uint8
from capdiff.data.urls import first_n_cutoff, local_path
from capdiff.distributed import gather_lists
from capdiff.evaluation.generation import VariantScores, attributes_named, can_score
from capdiff.evaluation.images import ImageDistances, load_real_features, save_real_features
from capdiff.evaluation.retrieval import retrieval_recall
from capdiff.evaluation.shapes import ATTRIBUTES, attribute_accuracy, parse_caption
from capdiff.evaluation.text import caption_scores
from capdiff.samplers import DEFAULT_SAMPLER, DEFAULT_STEPS
from capdiff.training.samples import caption_grid

log = logging.getLogger(__name__)


@dataclass
class EvalSettings:
    num_samples: int | None = 512
    sampler: str = DEFAULT_SAMPLER
    steps: int = DEFAULT_STEPS
    eta: float = 0.0
    guidance_scales: list[float] = field(default_factory=lambda: [4.0])
    seed: int = 0
    batch_size: int = 64
    caption: dict = field(default_factory=dict)  # generate() options: max_new_tokens, num_beams, do_sample, ...
    prompts: list[str] | None = None  # None: the validation captions
    samples_per_prompt: int = 1
    postprocess: Callable[[torch.Tensor], torch.Tensor] | None = None  # a capdiff.postprocess chain: scored too

    def variants(self) -> list[tuple[str | None, Callable | None]]:
        """The generated images as they are, and post-processed when a chain is given (its name labels them)."""
        chain = self.postprocess
        return [(None, None)] + ([(getattr(chain, "name", "postprocess"), chain)] if chain is not None else [])


def seed_for(index: int, base: int) -> int:
    """The seed of the `index`-th image to generate (prompt position × samples per prompt + copy): the same
    image whatever the batch or rank, and a different one for each copy of a prompt that repeats."""
    return (base + index) % 2**31


@contextmanager
def progress(trainer: pl.Trainer, description: str, total: int) -> Iterator[Callable[[int], None]]:
    """A progress bar on global rank 0: a task in the trainer's rich progress display when it has one (rich
    allows one live display at a time), else a rich bar of its own. Yields `advance(n)`."""
    if trainer.global_rank != 0:
        yield lambda n: None
        return
    bar = trainer.progress_bar_callback
    live = bar.progress if isinstance(bar, RichProgressBar) else None
    if live is not None:
        task = live.add_task(description, total=total)
        try:
            yield lambda n: live.update(task, advance=n)
        finally:
            live.remove_task(task)
        return
    with Progress(*Progress.get_default_columns(), MofNCompleteColumn(), transient=True) as own:
        task = own.add_task(description, total=total)
        yield lambda n: own.update(task, advance=n)


class Evaluator(pl.LightningModule):
    def __init__(
        self,
        model: torch.nn.Module,
        settings: EvalSettings,
        out_dir: str | Path,
        extractor: torch.nn.Module | None = None,
        feature: str | None = None,
        real_cache: tuple[Path, str] | None = None,
        probe: torch.nn.Module | None = None,
        clip_score=None,
        kid_subset_size: int = 1000,
        judge: torch.nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.judge = judge  # a joint model whose contrastive heads score image–text pairs of any recipe
        self.settings = settings
        self.out_dir = Path(out_dir)
        self.extractor = extractor
        self.probe = probe
        self.clip_score = clip_score  # a torchmetrics CLIPScore, or None
        self.real_cache = real_cache
        # A ModuleDict, so the metric states live on the module's device (NCCL syncs device tensors only).
        self.distances = torch.nn.ModuleDict(
            {
                _scale_key(g, name): ImageDistances(feature, extractor.num_features, kid_subset_size)
                for g in settings.guidance_scales
                for name, _ in settings.variants()
            }
            if extractor is not None
            else {}
        )
        self._cached_real = load_real_features(*real_cache) if (real_cache and extractor is not None) else None
        self._real: list[torch.Tensor] = []
        self._cutoff: tuple[int, int] | None = None  # set at test start (eval.num_samples)
        self._all = settings.num_samples is None
        self._records: list[dict] = []  # one per validation sample seen by this rank
        self._seen = 0
        self.metrics: dict[str, Any] = {}
        self.not_applicable: list[str] = []  # what this model cannot be scored on (a GAN: captions, retrieval)

    # ---------------------------------------------------------------- test loop: validation images
    def on_test_start(self) -> None:
        # `eval.num_samples`: the split's first N samples in shard order, the same set on any number of ranks
        # (each keeps those of its samples that come before the N-th); where the shards cannot be counted, each
        # rank keeps its first N / ranks instead.
        n, datamodule = self.settings.num_samples, self.trainer.datamodule
        urls = getattr(datamodule, "val_urls", None)
        self._cutoff = first_n_cutoff(urls, n) if (n is not None and urls) else None
        self._all = n is None or (urls and self._cutoff is None and all(local_path(u) for u in urls))

    def test_step(self, batch: dict, batch_idx: int) -> None:
        pixels, captions, keys = as_unit(batch["pixels"]), batch["captions"], batch["keys"]
        # each sample's place in the split (the generation order); in arrival order where the data has none
        placed = "order" in batch
        orders = batch["order"] if placed else [(self.global_rank, self._seen + i) for i in range(len(keys))]
        if self._cutoff is not None and placed:
            keep = [i for i, o in enumerate(orders) if tuple(o) < self._cutoff]
        elif not self._all:
            share = -(-self.settings.num_samples // self.trainer.world_size)
            keep = list(range(max(0, min(len(keys), share - self._seen))))
        else:
            keep = list(range(len(keys)))
        if len(keep) < len(keys):
            pixels, captions = pixels[keep], [captions[i] for i in keep]
            keys, orders = [keys[i] for i in keep], [orders[i] for i in keep]
        if not keys:
            return
        self._seen += len(keys)
        model = self.model
        records = [
            {"key": k, "reference": c, "order": tuple(o)} for k, c, o in zip(keys, captions, orders, strict=True)
        ]
        if model.can_caption:
            generated = model.caption(pixels, **self.settings.caption)
            for record, text in zip(records, generated, strict=True):
                record["generated"] = text
        if can_score(model):
            image = model.vision(pixels)["image_embed"]
            text = model.encode_text(list(captions), embed=True)["text_embed"]
            for i, record in enumerate(records):
                record["image_embed"], record["text_embed"] = image[i].float().cpu(), text[i].float().cpu()
        if self.extractor is not None and self._cached_real is None:
            self._real.append(self.extractor(unit_to_uint8(pixels)).double())
        self._records.extend(records)

    # ------------------------------------------------------------------- then generation and scores
    def on_test_epoch_end(self) -> None:
        self._finish_real()
        records = gather_lists(self._records)
        self.metrics["num_validation"] = len(records)
        able = {"captions": self.model.can_caption, "retrieval": can_score(self.model),
                "generation": self.model.can_generate}  # fmt: skip
        self.not_applicable = [what for what, yes in able.items() if not yes]
        if records and "generated" in records[0]:
            self._caption_metrics(records)
        if records and "image_embed" in records[0]:
            images = torch.stack([r["image_embed"] for r in records])
            texts = torch.stack([r["text_embed"] for r in records])
            self.metrics |= retrieval_recall(images, texts)
        if self.model.can_generate:
            with self.trainer.precision_plugin.forward_context():  # as test_step runs: bf16 under bf16-mixed
                self._generate()

    def _finish_real(self) -> None:
        if self.extractor is None:
            return
        if self._cached_real is not None:
            features = self._cached_real["features"]
            mine = features[self.global_rank :: self.trainer.world_size].to(self.device)  # synced: the whole set
            log.info("real-image features from the cache (%d images)", len(features))
        else:
            mine = (
                torch.cat(self._real) if self._real else torch.zeros(0, self.extractor.num_features, device=self.device)
            )
            everything = torch.cat([part.cpu() for part in gather_lists([mine.cpu()])])
            if self.global_rank == 0 and self.real_cache is not None:
                save_real_features(*self.real_cache, {"features": everything.float()})
        for distances in self.distances.values():
            if len(mine):
                distances.update(mine, real=True)

    def _caption_metrics(self, records: list[dict]) -> None:
        generated = [r["generated"] for r in records]
        self.metrics |= caption_scores(generated, [[r["reference"]] for r in records])
        truth = [attributes_named(r["reference"]) for r in records]
        if all(set(t) == set(ATTRIBUTES) for t in truth):  # the shapes data: every caption names all five
            scores = attribute_accuracy([parse_caption(g) for g in generated], truth)
            self.metrics |= {f"caption_attr/{k}": v for k, v in scores.items()}
        if self.global_rank == 0:
            with (self.out_dir / "captions.jsonl").open("w") as out:
                for r in records:
                    out.write(
                        json.dumps({"key": r["key"], "reference": r["reference"], "generated": r["generated"]}) + "\n"
                    )

    def _prompts(self) -> list[tuple[int, str]]:
        """This rank's share of the images to generate, as (index, prompt): the prompts in order (the
        prompts file's, or the validation captions in the split's order, gathered from every rank), each
        `samples_per_prompt` times, dealt round-robin to the ranks by index."""
        if self.settings.prompts is not None:
            prompts = list(self.settings.prompts)[: self.settings.num_samples]
        else:
            prompts = [text for _, text in sorted(gather_lists([(r["order"], r["reference"]) for r in self._records]))]
        copies = max(1, int(self.settings.samples_per_prompt))
        jobs = [(i * copies + c, p) for i, p in enumerate(prompts) for c in range(copies)]
        return jobs[self.global_rank :: self.trainer.world_size]

    def _generate(self) -> None:
        prompts = self._prompts()
        samples = self.out_dir / "samples"
        samples.mkdir(parents=True, exist_ok=True)
        index: list[dict] = []
        sweep = []
        batches = -(-len(prompts) // self.settings.batch_size) * len(self.settings.guidance_scales)
        with progress(self.trainer, "generating", batches) as advance:
            for scale in self.settings.guidance_scales:
                results = self._generate_at(prompts, scale, samples, index, advance)
                sweep.append({"guidance_scale": scale} | results)
        index = gather_lists(index)
        if self.global_rank == 0:
            with (samples / "index.jsonl").open("w") as out:
                for line in index:
                    out.write(json.dumps(line) + "\n")
        self.metrics |= {k: v for k, v in sweep[0].items() if k != "guidance_scale"}
        if len(sweep) > 1:
            self.metrics["guidance_sweep"] = sweep

    def _generate_at(
        self, jobs: list[tuple[int, str]], scale: float, samples: Path, index: list[dict], advance
    ) -> dict[str, float]:
        s = self.settings
        scorer = self.judge if self.judge is not None else self.model
        variants = []
        for name, transform in s.variants():
            distances = self.distances[_scale_key(scale, name)] if self.distances else None
            variants.append(VariantScores(name, transform, distances, self.clip_score))
        grids: dict[str | None, list] = {name: [] for name, _ in s.variants()}
        grid_prompts: list[str] = []
        for start in range(0, len(jobs), s.batch_size):
            numbers = [n for n, _ in jobs[start : start + s.batch_size]]
            chunk = [p for _, p in jobs[start : start + s.batch_size]]
            seeds = [seed_for(n, s.seed) for n in numbers]
            pixels = self.model.generate(
                chunk, steps=s.steps, guidance_scale=scale, eta=s.eta, seeds=seeds, sampler=s.sampler
            )
            images = unit_to_uint8(pixels)
            for i, (prompt, seed) in enumerate(zip(chunk, seeds, strict=True)):
                name = f"g{scale:g}/{numbers[i]:06d}.png"
                (samples / name).parent.mkdir(parents=True, exist_ok=True)
                _save_png(images[i], samples / name)
                index.append({"prompt": prompt, "seed": seed, "guidance_scale": scale, "file": name})
            advance(1)
            room = 16 - len(grid_prompts)
            grid_prompts += chunk[:room]
            for scores in variants:
                shown = scores.update(pixels, chunk, self.extractor, self.probe, scorer)
                if room > 0:
                    grids[scores.prefix.rstrip("/") or None].append(shown[:room])
        results: dict[str, float] = {}
        for scores in variants:
            results |= scores.compute(scorer)
        if self.global_rank == 0 and grid_prompts:
            for name, parts in grids.items():
                suffix = f"_{name}" if name else ""
                caption_grid(torch.cat(parts), grid_prompts).save(self.out_dir / f"grid_g{scale:g}{suffix}.png")
        return results


def _scale_key(scale: float, variant: str | None = None) -> str:
    key = f"g{scale:g}" + (f"__{variant}" if variant else "")
    return key.replace(".", "_").replace("+", "_")  # ModuleDict keys cannot hold dots


def _save_png(image: torch.Tensor, path: Path) -> None:
    from PIL import Image

    Image.fromarray(image.permute(1, 2, 0).cpu().numpy()).save(path)
