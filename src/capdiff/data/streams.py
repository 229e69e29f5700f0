"""The training and validation streams over WebDataset shards.

webdataset supplies the tar reading (`tarfile_samples`, which opens local paths, `pipe:` and URL schemes)
and the shuffle buffer. The orchestration around them is ours because three things the stock pipeline
does not do together are needed here: shards resampled from a per-(rank, worker) subset with an RNG seeded
by (seed, rank, worker, epoch) so a resumed run replays its order; skipped-sample counts shared with the
main process; and a validation
split that gives every sample to exactly one rank whatever the shard sizes.
"""

from __future__ import annotations

import multiprocessing as mp
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from capdiff.data.decode import (
    IMAGE_EXTENSIONS,
    BadSample,
    CaptionKey,
    SkipCounter,
    SkipLog,
    decode_captions,
    image_member,
)
from capdiff.data.decode import load_rgb as _load_rgb
from capdiff.data.latent_format import LATENTS, decode_latents
from capdiff.data.transforms import resize_crop, to_uint8_hwc


@dataclass(frozen=True)
class DecodeSpec:
    image_size: int
    caption_key: CaptionKey
    max_pixels: int = 64_000_000
    random_crop: bool = False
    latents: bool = False  # also read the cached VAE posterior (capdiff.data.cache_latents)

    def wants(self, fname: str) -> bool:
        """Which tar members are read at all: the image extensions, the caption member and (with `latents`)
        the cached latents, nothing else."""
        base = fname.rsplit("/", 1)[-1]
        _, dot, ext = base.partition(".")
        ext = ext.lower()
        wanted = ext in IMAGE_EXTENSIONS or ext == self.caption_key.member or (self.latents and ext == LATENTS)
        return bool(dot) and wanted


def decode_sample(sample: dict, spec: DecodeSpec, rng: random.Random | None) -> dict:
    """Raw tar sample → `{"key", "pixels" (uint8 3×H×W), "caption"}`; `rng` picks crop and caption in training."""
    captions = decode_captions(sample, spec.caption_key)
    image = _load_rgb(sample[image_member(sample)], spec.max_pixels, draft_size=spec.image_size)
    image = resize_crop(image, spec.image_size, random_crop=spec.random_crop and rng is not None, rng=rng)
    caption = rng.choice(captions) if rng is not None else captions[0]
    decoded = {"key": sample["__key__"], "pixels": to_uint8_hwc(image), "caption": caption}
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
        super().__init__()
        self.skip_counter = skip_counter
        self.urls = urls
        self.spec = spec
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.log_every_s = log_every_s

    def _read(self, shards: Iterable[dict], skips: SkipLog) -> Iterator[dict]:
        def on_shard_error(err: Exception) -> bool:
            skips.skip("shard_error", str(err.args[-1]) if err.args else "?", repr(err)[:300])
            return True

        return wds.tarfile_samples(shards, handler=on_shard_error, select_files=self.spec.wants)

    def _decode(self, raw: Iterable[dict], skips: SkipLog, rng: random.Random | None) -> Iterator[dict]:
        for sample in raw:
            try:
                decoded = decode_sample(sample, self.spec, rng)
            except BadSample as bad:
                skips.skip(bad.reason, f"{sample.get('__url__')}:{sample.get('__key__')}", bad.detail)
                continue
            skips.good += 1
            yield decoded

    def _batch(self, decoded: Iterable[dict], partial: bool) -> Iterator[dict]:
        buffer: list[dict] = []
        for sample in decoded:
            buffer.append(sample)
            if len(buffer) == self.batch_size:
                yield collate(buffer)
                buffer = []
        if buffer and partial:
            yield collate(buffer)


class TrainStream(_Stream):
    """Endless resampled shards, cut into `batches_per_worker` full batches per worker per epoch.

    Shards are dealt to the `world_size × num_workers` (rank, worker) slots in turn, and each slot draws from
    its own share with replacement. Every rank therefore yields exactly `len(self)` equal batches per
    epoch, whatever the shard sizes (an unequal count would hang the contrastive all-gather under DDP).

    An epoch's order depends only on (seed, rank, worker, epoch). `resume_at` > 0 (batches of this epoch
    already trained, set on a mid-epoch resume) replays the epoch's first batches without yielding them.
    The loader takes batches from its workers in turn, so batch `b` came from worker `b % num_workers`.
    """

    def __init__(
        self,
        urls: list[str],
        spec: DecodeSpec,
        batch_size: int,
        batches_per_worker: int,
        num_workers: int,
        rank: int,
        world_size: int,
        seed: int,
        shuffle_buffer: int,
        epoch: SharedInt,
        skip_counter: SkipCounter,
        log_every_s: float = 30.0,
        resume_at: SharedInt | None = None,
    ) -> None:
        super().__init__(urls, spec, batch_size, rank, world_size, skip_counter, log_every_s)
        self.batches_per_worker = batches_per_worker
        self.num_workers = max(1, num_workers)
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.epoch = epoch
        self.resume_at = resume_at if resume_at is not None else SharedInt(0)

    def __len__(self) -> int:
        return self.batches_per_worker * self.num_workers

    def shards_for(self, worker: int) -> list[str]:
        slots = self.world_size * self.num_workers
        return self.urls[self.rank * self.num_workers + worker :: slots]

    def __iter__(self) -> Iterator[dict]:
        worker, num_workers = _worker()
        if num_workers != self.num_workers:
            raise RuntimeError(f"TrainStream built for {self.num_workers} workers but runs in {num_workers}")
        epoch = self.epoch.get()
        rng = random.Random(f"capdiff/train/{self.seed}/{self.rank}/{worker}/{epoch}")
        skips = SkipLog(self.skip_counter, self.log_every_s)
        shards = self.shards_for(worker)
        raw = wds.shuffle(self.shuffle_buffer, min(self.shuffle_buffer, 100), rng=rng)(
            self._read(self._resample(shards, rng, skips), skips)
        )
        batches = self._batch(self._decode(raw, skips, rng), partial=False)
        # Batches already trained are still read and decoded (the same random draws keep the rest in step).
        trained = len(range(worker, self.resume_at.get(), num_workers))
        for index in range(self.batches_per_worker):
            batch = next(batches)
            if index >= trained:
                yield batch

    def _resample(self, shards: list[str], rng: random.Random, skips: SkipLog) -> Iterator[dict]:
        # An endless stream of shards that never yields a usable sample would spin forever: stop instead.
        # The shuffle buffer reads ahead of decoding, so allow for it before giving up.
        limit = 10 * len(shards) + self.shuffle_buffer + 10
        last_good, draws = -1, 0
        while True:
            if skips.good != last_good:
                last_good, draws = skips.good, 0
            if draws >= limit:
                raise RuntimeError(
                    f"no usable sample in {draws} shard reads from {shards[:3]}; skipped so far: "
                    f"{dict(skips.counts)}. Check data.caption_key and the shards with "
                    "`python -m capdiff.data.shards inspect <shard>`."
                )
            draws += 1
            yield {"url": rng.choice(shards)}


class ValStream(_Stream):
    """Every sample exactly once across ranks, in shard order.

    Within a rank, workers take whole shards in turn; across ranks, samples are dealt round-robin by their
    position in the shard list, so ranks get (nearly) equal shares even when shard sizes differ.
    """

    def __iter__(self) -> Iterator[dict]:
        worker, num_workers = _worker()
        skips = SkipLog(self.skip_counter, self.log_every_s)
        decoded = self._decode(self._mine(worker, num_workers, skips), skips, rng=None)
        yield from self._batch(decoded, partial=True)

    def _mine(self, worker: int, num_workers: int, skips: SkipLog) -> Iterator[dict]:
        for shard_index in range(worker, len(self.urls), num_workers):
            samples = self._read([{"url": self.urls[shard_index]}], skips)
            for position, sample in enumerate(samples):
                if (shard_index + position) % self.world_size == self.rank:
                    sample["__order__"] = (shard_index, position)  # its place in the split, whatever the rank
                    yield sample
