"""The training and validation streams over WebDataset shards.

webdataset supplies the tar reading (`tarfile_samples`, which opens local paths, `pipe:` and URL schemes)
and the shuffle buffer. The orchestration around them is ours because four things the stock pipeline does
not do together are needed here: each source's shards resampled from its whole list by every (rank, worker)
with an RNG seeded by (seed, rank, worker, epoch), so a resumed run replays its order; sources mixed by weight with that
RNG (`capdiff.data.mixture`); skipped samples counted once each (`capdiff.data.skips`); and a validation
split that gives every sample to exactly one rank whatever the shard sizes.
"""

from __future__ import annotations

import multiprocessing as mp
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from functools import cached_property

import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from capdiff.data.decode import IMAGE_EXTENSIONS, BadSample, CaptionKey, decode_captions, image_member
from capdiff.data.decode import load_rgb as _load_rgb
from capdiff.data.latent_format import LATENTS, decode_latents
from capdiff.data.mixture import CaptionMix, Source, mix
from capdiff.data.skips import SkipCounter, SkipLog
from capdiff.data.transforms import resize_crop, to_uint8_hwc


@dataclass(frozen=True)
class DecodeSpec:
    image_size: int
    caption_key: CaptionKey
    max_pixels: int = 64_000_000
    random_crop: bool = False
    latents: bool = False  # also read the cached VAE posterior (capdiff.data.cache_latents)
    caption_mix: CaptionMix | None = None  # in training, the caption's key drawn per sample instead
    target_key: CaptionKey | None = None  # the captioner's caption, `caption_targets` (none: the caption)

    @cached_property
    def _members(self) -> set[str]:
        members = {self.caption_key.member, *(self.caption_mix.members if self.caption_mix else ())}
        return members | ({self.target_key.member} if self.target_key else set())

    def wants(self, fname: str) -> bool:
        """Which tar members are read at all: the image extensions, the caption members and (with `latents`)
        the cached latents, nothing else."""
        base = fname.rsplit("/", 1)[-1]
        _, dot, ext = base.partition(".")
        ext = ext.lower()
        wanted = ext in IMAGE_EXTENSIONS or ext in self._members or (self.latents and ext == LATENTS)
        return bool(dot) and wanted


def decode_sample(sample: dict, spec: DecodeSpec, rng: random.Random | None) -> dict:
    """Raw tar sample → `{"key", "pixels" (uint8 3×H×W), "caption"}` (and `"caption_target"` with a target key);
    `rng` picks crop, caption key and caption in training."""
    key = spec.caption_mix.pick(rng) if spec.caption_mix is not None and rng is not None else spec.caption_key
    captions = decode_captions(sample, key)
    targets = decode_captions(sample, spec.target_key) if spec.target_key is not None else None
    image = _load_rgb(sample[image_member(sample)], spec.max_pixels, draft_size=spec.image_size)
    image = resize_crop(image, spec.image_size, random_crop=spec.random_crop and rng is not None, rng=rng)
    caption = rng.choice(captions) if rng is not None else captions[0]
    decoded = {"key": sample["__key__"], "pixels": to_uint8_hwc(image), "caption": caption}
    if targets is not None:
        decoded["caption_target"] = rng.choice(targets) if rng is not None else targets[0]
    if "__order__" in sample:
        decoded["order"] = sample["__order__"]
    if spec.latents:
        if LATENTS not in sample:
            raise BadSample("missing_latents", f"no {LATENTS} member: cache the shards with capdiff.data.cache_latents")
        decoded["latent_mean"], decoded["latent_std"] = decode_latents(sample[LATENTS])
    return decoded


def collate(samples: list[dict]) -> dict:
    batch = {
        # uint8 until the model's device (ImageTextDataModule.on_after_batch_transfer): float32 here cost the
        # 1-worker stream 12% and the 2-worker one 28% of its throughput (bench/data_pipeline.py).
        # Stacked as decoded (H×W×C, one contiguous copy) and seen as B×C×H×W: a strided C×H×W copy per image
        # cost 3 ms of a 32-image batch's 114 ms; as_unit makes the float batch contiguous.
        "pixels": _stack([s["pixels"] for s in samples]).permute(0, 3, 1, 2),
        "captions": [s["caption"] for s in samples],
        "keys": [s["key"] for s in samples],
    }
    if "caption_target" in samples[0]:
        batch["caption_targets"] = [s["caption_target"] for s in samples]
    if "order" in samples[0]:  # validation: (shard, position) of each sample
        batch["order"] = [s["order"] for s in samples]
    if "latent_mean" in samples[0]:
        batch["latent_mean"] = torch.stack([s["latent_mean"] for s in samples])
        batch["latent_std"] = torch.stack([s["latent_std"] for s in samples])
    return batch


def _stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """torch.stack, straight into shared memory in a dataloader worker (as torch's default_collate does), so
    the batch is not copied again on its way to the main process."""
    if get_worker_info() is None:
        return torch.stack(tensors)
    first = tensors[0]
    storage = first.untyped_storage()._new_shared(len(tensors) * first.numel() * first.element_size())
    out = first.new(storage).view(len(tensors), *first.shape)
    return torch.stack(tensors, out=out)


class SharedInt:
    """A number the main process sets and dataloader workers read, persistent workers included."""

    def __init__(self, value: int = 0) -> None:
        self._value = mp.Value("i", value)

    def set(self, value: int) -> None:
        self._value.value = value

    def get(self) -> int:
        return self._value.value


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


class _Stream(IterableDataset):
    def __init__(self, spec: DecodeSpec, batch_size: int, rank: int, world_size: int, log_every_s: float) -> None:
        super().__init__()
        self.spec = spec
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.log_every_s = log_every_s

    @staticmethod
    def _read_shard(url: str, wants: Callable[[str], bool], skips: SkipLog | None, source: int = 0) -> Iterator[dict]:
        """The samples of one shard; a shard that fails counts once in `skips` (when given), however many
        errors the reader met in it: `truncated_shard` after some samples, `shard_error` before any."""
        errors: list[Exception] = []

        def keep_going(err: Exception) -> bool:
            errors.append(err)
            return True

        read = 0
        for sample in wds.tarfile_samples([{"url": url}], handler=keep_going, select_files=wants):
            read += 1
            yield sample
        if errors and skips is not None:
            skips.skip("truncated_shard" if read else "shard_error", url, repr(errors[0])[:300], source)

    @staticmethod
    def _decode(
        raw: Iterable[dict], spec: DecodeSpec, skips: SkipLog, rng: random.Random | None, source: int = 0
    ) -> Iterator[dict]:
        for sample in raw:
            try:
                decoded = decode_sample(sample, spec, rng)
            except BadSample as bad:
                skips.skip(bad.reason, f"{sample.get('__url__')}:{sample.get('__key__')}", bad.detail, source)
                continue
            skips.good[source] += 1
            yield decoded


class TrainStream(_Stream):
    """Endless resampled shards, cut into `batches_per_worker` full batches per worker per epoch.

    Every (rank, worker) draws each source's shards from the source's whole list with replacement (as
    open_clip's resampled shards do): any number of shards feeds any number of ranks and workers, and a batch's
    contrastive negatives come from shards drawn across the whole set, not from a fixed share that one worker
    replays. With several sources, each sample's source is drawn by weight. Every rank yields exactly
    `len(self)` equal batches per epoch, whatever the shard sizes (an unequal count would hang the contrastive
    all-gather under DDP).

    An epoch's order depends only on (seed, rank, worker, epoch). `resume_at` > 0 (batches of this epoch
    already trained, set on a mid-epoch resume) goes on after the epoch's first batches: each worker skips the
    raw samples they drew (`resume_positions`) without decoding them. Each batch's `"position"` is
    `(epoch, worker, raw samples the worker has drawn this epoch)`, what a checkpoint saves for that.
    The loader takes batches from its workers in turn, so batch `b` came from worker `b % num_workers`.
    Each batch's `"skipped"`, `{(source index, reason): n}`, is what drawing it skipped (`capdiff.data.skips`).
    """

    def __init__(
        self,
        sources: Sequence[Source],
        spec: DecodeSpec,
        batch_size: int,
        batches_per_worker: int,
        num_workers: int,
        rank: int,
        world_size: int,
        seed: int,
        shuffle_buffer: int,
        epoch: SharedInt,
        log_every_s: float = 30.0,
        resume_at: SharedInt | None = None,
    ) -> None:
        super().__init__(spec, batch_size, rank, world_size, log_every_s)
        self.sources = list(sources)
        self.specs = [replace(spec, caption_key=s.caption_key, caption_mix=s.caption_mix) for s in self.sources]
        self.batches_per_worker = batches_per_worker
        self.num_workers = max(1, num_workers)
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.epoch = epoch
        self.resume_at = resume_at if resume_at is not None else SharedInt(0)
        # On a mid-epoch resume, the raw samples each worker's trained batches drew (-1: not known)
        self.resume_positions = mp.Array("q", self.num_workers, lock=False)

    def __len__(self) -> int:
        return self.batches_per_worker * self.num_workers

    def __iter__(self) -> Iterator[dict]:
        worker, num_workers = _worker()
        if num_workers != self.num_workers:
            raise RuntimeError(f"TrainStream built for {self.num_workers} workers but runs in {num_workers}")
        epoch = self.epoch.get()
        name = f"capdiff/train/{self.seed}/{self.rank}/{worker}/{epoch}"
        # Two kinds of randomness: `order` draws the shards, the shuffle and the mixture (which raw sample comes
        # next), and the n-th raw sample decodes (crop, caption) with a generator of its own, seeded by n. The raw
        # order then does not depend on decoding, so a resumed epoch skips what its trained batches drew without
        # decoding it and goes on exactly where the interrupted run was.
        order = random.Random(name)
        skips = SkipLog(self.log_every_s)
        raw = mix([self._raw(i, order, skips) for i in range(len(self.sources))], [s.weight for s in self.sources],
                  order)  # fmt: skip
        trained = len(range(worker, self.resume_at.get(), num_workers))
        position = self.resume_positions[worker] if trained else 0  # raw samples drawn so far this epoch
        if position > 0:
            for _ in range(position):
                source, _ = next(raw)
                skips.good[source] += 1  # (progress, for the no-usable-sample guard; what they skipped was counted)
        # Without a saved position (a checkpoint from before positions were saved) the trained batches are
        # decoded again and dropped: slower, the same result.
        first = trained if position > 0 else 0
        position = max(position, 0)
        for index in range(first, self.batches_per_worker):
            drawn = []
            while len(drawn) < self.batch_size:
                source, sample = next(raw)
                sample_rng = random.Random(f"{name}/{position}")
                position += 1
                try:
                    drawn.append(decode_sample(sample, self.specs[source], sample_rng))
                except BadSample as bad:
                    skips.skip(bad.reason, f"{sample.get('__url__')}:{sample.get('__key__')}", bad.detail, source)
                    continue
                skips.good[source] += 1
            skipped = skips.take()
            if index >= trained:
                yield collate(drawn) | {"skipped": skipped, "position": (epoch, worker, position)}

    def _raw(self, source: int, order: random.Random, skips: SkipLog) -> Iterator[tuple[int, dict]]:
        shuffle = wds.shuffle(self.shuffle_buffer, min(self.shuffle_buffer, 100), rng=order)
        for sample in shuffle(self._resample(source, self.sources[source].urls, order, skips)):
            yield source, sample

    def _resample(self, source: int, shards: list[str], rng: random.Random, skips: SkipLog) -> Iterator[dict]:
        # An endless stream of shards that never yields a usable sample would spin forever: stop instead.
        # The shuffle buffer reads ahead of decoding, so allow for it before giving up.
        limit = 10 * len(shards) + self.shuffle_buffer + 10
        last_good, reads = -1, 0
        while True:
            if skips.good[source] != last_good:
                last_good, reads = skips.good[source], 0
            if reads >= limit:
                where = self.sources[source]
                raise RuntimeError(
                    f"no usable sample in {reads} shard reads from {shards[:3]}; skipped so far: "
                    f"{dict(skips.counts)}. Check {where.caption_key_name} and the shards of {where.urls_key} "
                    "with `python -m capdiff.data.shards inspect <shard>`."
                )
            reads += 1
            yield from self._read_shard(rng.choice(shards), self.specs[source].wants, skips, source)


class ValStream(_Stream):
    """Every sample exactly once across ranks, in shard order.

    Within a rank, workers take whole shards in turn; across ranks, samples are dealt round-robin by their
    position in the shard list, so ranks get (nearly) equal shares even when shard sizes differ. Every rank
    reads every shard, so a failing shard is counted by one rank only (shard index mod world size).
    """

    def __init__(
        self,
        urls: list[str],
        spec: DecodeSpec,
        batch_size: int,
        rank: int,
        world_size: int,
        skip_counter: SkipCounter,
        log_every_s: float = 30.0,
    ) -> None:
        super().__init__(spec, batch_size, rank, world_size, log_every_s)
        self.urls = urls
        self.skip_counter = skip_counter

    def __iter__(self) -> Iterator[dict]:
        worker, num_workers = _worker()
        skips = SkipLog(self.log_every_s, self.skip_counter)
        batch: list[dict] = []
        for sample in self._decode(self._mine(worker, num_workers, skips), self.spec, skips, rng=None):
            batch.append(sample)
            if len(batch) == self.batch_size:
                yield collate(batch)
                batch = []
        if batch:
            yield collate(batch)

    def _mine(self, worker: int, num_workers: int, skips: SkipLog) -> Iterator[dict]:
        for shard_index in range(worker, len(self.urls), num_workers):
            counted = skips if shard_index % self.world_size == self.rank else None
            samples = self._read_shard(self.urls[shard_index], self.spec.wants, counted)
            for position, sample in enumerate(samples):
                if (shard_index + position) % self.world_size == self.rank:
                    sample["__order__"] = (shard_index, position)  # its place in the split, whatever the rank
                    yield sample
