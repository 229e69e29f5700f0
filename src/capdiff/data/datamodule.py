"""The LightningDataModule over image–text WebDataset shards (the `data=` config group)."""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.strategies import FSDPStrategy
from torch.utils.data import DataLoader

from capdiff.data.cache_latents import cached_urls
from capdiff.data.decode import CaptionKey
from capdiff.data.loaders import EpochLoader, EvenBatches, ValLoader
from capdiff.data.mixture import CaptionMix, parse_sources
from capdiff.data.skips import SKIP_REASONS, SkipCounter, table
from capdiff.data.streams import DecodeSpec, SharedInt, TrainStream, ValStream
from capdiff.data.transforms import as_unit
from capdiff.data.urls import (
    check_caption_key,
    check_local_shards,
    count_samples,
    expand_urls,
    local_path,
    unlisted_shards,
)

log = logging.getLogger(__name__)


def batch_size(batch: dict) -> int:
    """Samples in a batch, for Lightning's `ThroughputMonitor` (`batch_size_fn`, see conf/callbacks/default.yaml)."""
    return len(batch["keys"])


class ImageTextDataModule(pl.LightningDataModule):
    """Batches `{"pixels": B×3×H×W in [-1, 1], "captions": [str], "keys": [str]}` from WebDataset shards, with
    `"caption_targets"` (the captioner's) when `captioner_caption_key` is set.

    The training shards are `train_urls` (one source) or `sources`, a weighted mixture (`capdiff.data.mixture`).
    `skipped` counts the training samples skipped in the batches handed to the model so far (a resumed run's
    earlier ones included), `val_skipped` those of the validation pass; `capdiff.data.skips` says how.
    """

    def __init__(
        self,
        train_urls: str | Sequence[str] | None,
        val_urls: str | Sequence[str] | None,
        image_size: int = 32,
        caption_key: str = "txt",
        batch_size: int = 32,
        val_batch_size: int | None = None,
        num_workers: int = 2,
        samples_per_epoch: int | None = None,
        shuffle_buffer: int = 1000,
        random_crop: bool = False,
        max_pixels: int = 64_000_000,
        pin_memory: bool = False,
        persistent_workers: bool = True,
        prefetch_factor: int | None = 2,
        seed: int = 0,
        skip_log_every_s: float = 30.0,
        latents: bool = False,
        latents_dir: str | None = None,
        sources: Sequence[Mapping] | None = None,
        caption_mix: Mapping[str, float] | None = None,
        captioner_caption_key: str | None = None,
    ) -> None:
        super().__init__()
        for key, value in (("data.image_size", image_size), ("data.batch_size", batch_size)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{key}={value!r} must be a positive integer.")
        if num_workers < 0:
            raise ValueError(f"data.num_workers={num_workers} must be 0 (load in the main process) or more.")
        if samples_per_epoch is not None and samples_per_epoch <= 0:
            raise ValueError(f"data.samples_per_epoch={samples_per_epoch} must be positive (or null to count).")
        self.caption_key = CaptionKey.parse(caption_key)
        self.caption_mix = CaptionMix.parse(caption_mix) if caption_mix is not None else None
        self.captioner_caption_key = (
            CaptionKey.parse(captioner_caption_key, "data.captioner_caption_key") if captioner_caption_key else None
        )
        # Evaluation reads only the validation split, so it may leave the training shards out.
        self.sources = parse_sources(sources, train_urls, self.caption_key, self.caption_mix)
        self.val_urls = expand_urls(val_urls, "data.val_urls") if val_urls is not None else []
        self.image_size = image_size
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.samples_per_epoch = samples_per_epoch
        self.shuffle_buffer = shuffle_buffer
        self.random_crop = random_crop
        self.max_pixels = max_pixels
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers
        self.prefetch_factor = prefetch_factor
        self.seed = seed
        self.skip_log_every_s = skip_log_every_s
        if latents and random_crop:
            raise ValueError(
                "data.latents=true reads latents cached from the centre crop, so data.random_crop=true would pair "
                "them with other pixels: set data.random_crop=false (or train without cached latents)."
            )
        other_key = next((s for s in self.sources if s.caption_key != self.caption_key), None)
        if latents and other_key is not None:
            raise ValueError(
                f"data.latents=true caches the samples that have data.caption_key={self.caption_key.spec!r}, but "
                f"{other_key.caption_key_name}={other_key.caption_key.spec!r}: drop it (every source reads "
                "data.caption_key) or train without cached latents."
            )
        self.latents = latents
        self.latents_dir = latents_dir  # read by capdiff.artifacts.prepare_latents
        self.reading_latents = False  # set once the shards with latents are in place (use_cached_shards)
        self.val_skip_counter = SkipCounter()
        self.train_skips: Counter = Counter()  # (source index, reason) → samples, of the batches trained
        self.epoch = SharedInt()
        self.resume_at = SharedInt()
        self.positions: dict[int, int] = {}  # worker → raw samples its trained batches drew, this epoch
        self._positions_epoch = -1
        self._resume: dict[str, int] | None = None  # the train stream's position, from a checkpoint
        self._shards_checked = False
        self.train_stream: TrainStream | None = None
        self.val_stream: ValStream | None = None

    @property
    def train_urls(self) -> list[str]:
        """Every training shard, source after source."""
        return [url for source in self.sources for url in source.urls]

    # ------------------------------------------------------------------ set-up
    def setup(self, stage: str | None = None) -> None:
        self.setup_streams(*self._rank_and_world())

    def _spec(self, train: bool) -> DecodeSpec:
        """How samples decode. The captioner's own targets (data.captioner_caption_key) are a training choice:
        validation scores both directions against data.caption_key's captions, the shards' references."""
        return DecodeSpec(self.image_size, self.caption_key, self.max_pixels, train and self.random_crop,
                          self.reading_latents, target_key=self.captioner_caption_key if train else None)  # fmt: skip

    def setup_streams(self, rank: int, world_size: int) -> None:
        """Check the shards and build the streams of one rank (tests call it to play several ranks)."""
        self._check_shards()
        self.val_stream = ValStream(self.val_urls, self._spec(train=False), self.val_batch_size, rank, world_size,
                                    self.val_skip_counter, self.skip_log_every_s)  # fmt: skip
        if not self.sources:
            self.train_stream = None
            return
        workers = max(1, self.num_workers)
        per_rank = math.ceil(self._samples_per_epoch() / (self.batch_size * world_size))
        self.train_stream = TrainStream(
            self.sources,
            self._spec(train=True),
            batch_size=self.batch_size,
            batches_per_worker=math.ceil(per_rank / workers),
            num_workers=self.num_workers,
            rank=rank,
            world_size=world_size,
            seed=self.seed,
            shuffle_buffer=self.shuffle_buffer,
            epoch=self.epoch,
            log_every_s=self.skip_log_every_s,
            resume_at=self.resume_at,
        )

    def use_cached_shards(self, folder: str | Path | None) -> None:
        """Read `latents.npy` with every sample from now on, from the copies of the shards in `folder`
        (None: the shards themselves are the cached ones)."""
        if folder is not None:
            self.sources = [replace(s, urls=cached_urls(s.urls, Path(folder))) for s in self.sources]
            self.val_urls = cached_urls(self.val_urls, Path(folder)) if self.val_urls else []
            self._shards_checked = False
        self.reading_latents = True
        self.setup_streams(*self._rank_and_world())

    def _rank_and_world(self) -> tuple[int, int]:
        return (0, 1) if self.trainer is None else (self.trainer.global_rank, self.trainer.world_size)

    def _check_shards(self) -> None:
        """The checks that do not depend on the rank, done once however often the streams are rebuilt
        (train.py builds them before the Trainer does again under its own rank)."""
        if self._shards_checked:
            return
        for source in self.sources:
            check_local_shards(source.urls, source.urls_key)
            for pattern, missing in unlisted_shards(source.urls).items():
                log.warning(
                    "%s lists %d shards but %d more like them are beside them (%s): this run does not read them. "
                    "Widen the brace range to every shard `shards write` printed.",
                    source.urls_key, len(source.urls), missing, pattern,
                )  # fmt: skip
        if self.val_urls:
            check_local_shards(self.val_urls, "data.val_urls")
        for source in self.sources:
            keys = source.caption_mix.keys if source.caption_mix is not None else (source.caption_key,)
            for key in keys:
                check_caption_key(source.urls[0], key, source.caption_key_name)
        if not self.sources and self.val_urls:
            check_caption_key(self.val_urls[0], self.caption_key, "data.caption_key")
        if self.captioner_caption_key is not None and self.sources:  # training reads it; validation does not
            for source in self.sources:
                check_caption_key(source.urls[0], self.captioner_caption_key, "data.captioner_caption_key")
        self._shards_checked = True

    def _samples_per_epoch(self) -> int:
        if self.samples_per_epoch is not None:
            return self.samples_per_epoch
        paths = [local_path(u) for u in self.train_urls]
        if any(p is None for p in paths):
            raise ValueError(
                "data.samples_per_epoch is null and the training shards are not local files, so they cannot be "
                "counted: set data.samples_per_epoch to the number of samples one epoch should see."
            )
        total = sum(count_samples(p) for p in paths)
        log.info("counted %d training samples in %d shards", total, len(paths))
        self.samples_per_epoch = total
        return total

    # --------------------------------------------------------------- loaders
    def _loader_kwargs(self) -> dict:
        kwargs: dict = {"num_workers": self.num_workers, "pin_memory": self.pin_memory}
        if self.num_workers > 0:
            kwargs["persistent_workers"] = self.persistent_workers
            kwargs["prefetch_factor"] = self.prefetch_factor
        return kwargs

    def train_dataloader(self) -> EpochLoader:
        if self.train_stream is None:
            self.setup("fit")
        if self.train_stream is None:
            raise ValueError(
                "data.train_urls is not set: training needs shards, e.g. "
                "\"data.train_urls='/data/{000..099}.tar'\" (or a mixture in data.sources)."
            )
        resume, self._resume = self._resume, None
        return EpochLoader(self.train_stream, epoch_fn=self._trainer_epoch, resume=resume, **self._loader_kwargs())

    def val_dataloader(self) -> DataLoader | EvenBatches | list:
        """The validation loader Lightning's loop reads; under FSDP on several ranks, padded to the same number
        of batches on every rank (`EvenBatches`)."""
        loader = self.val_loader()
        strategy = self.trainer.strategy if self.trainer is not None else None
        if isinstance(loader, DataLoader) and isinstance(strategy, FSDPStrategy) and strategy.world_size > 1:
            return EvenBatches(loader, strategy)
        return loader

    def val_loader(self) -> DataLoader | list:
        """This rank's share of the validation split, batch by batch (for readers other than the validation loop)."""
        if self.val_stream is None:
            self.setup("validate")
        if not self.val_urls:
            return []
        workers = min(self.num_workers, len(self.val_urls))
        kwargs = self._loader_kwargs() | {"num_workers": workers}
        if workers == 0:
            kwargs = {"pin_memory": self.pin_memory}
        return ValLoader(self.val_stream, **kwargs)

    def test_dataloader(self) -> DataLoader | list:
        """Evaluation (`evaluate.py`) reads the validation split."""
        return self.val_dataloader()

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        """uint8 pixels → float `[-1, 1]` on the model's device; a training batch's skips are counted here, as
        it reaches the model."""
        self.train_skips.update(batch.get("skipped", {}))
        if "position" in batch:
            epoch, worker, position = batch["position"]
            if epoch != self._positions_epoch:
                self.positions, self._positions_epoch = {}, epoch
            self.positions[worker] = position
        dropped = ("skipped", "position")
        return {k: v for k, v in batch.items() if k not in dropped} | {"pixels": as_unit(batch["pixels"])}

    def _trainer_epoch(self) -> int | None:
        """The epoch the trainer is about to train. Not `trainer.current_epoch`: on a resume from an epoch-end
        checkpoint that still names the finished epoch when Lightning builds the loader's iterator."""
        return None if self.trainer is None else self.trainer.fit_loop.epoch_progress.current.processed

    # The train stream's position lives in the datamodule's state, which Lightning saves in every checkpoint
    # and restores on every resume. (A loader's own `state_dict` is restored only when Lightning's progress
    # counters say the run is restarting, and after a resume from an epoch's last batch they say it is not:
    # the next mid-epoch checkpoint then resumed by replaying its whole epoch.) The skip counts are those of
    # the batches trained, so a resumed run's totals go on from where the checkpoint's stopped.
    #
    # Every rank builds the checkpoint (Lightning's save_checkpoint runs on all of them) and rank 0's is the one
    # written, so what ranks differ in is gathered first: the skip counts are saved summed over ranks (and rank 0
    # alone takes them back on load, so the ranks' sum goes on from the saved total), and each rank's stream
    # position is saved under its rank.
    def state_dict(self) -> dict:
        if self.trainer is None or self.train_stream is None:
            return {}
        trained = self.trainer.fit_loop.epoch_loop.batch_progress.current.processed
        strategy = self.trainer.strategy
        workers = max(1, self.num_workers)
        # 0 for a worker none of whose batches was trained yet (or none at all this epoch): it replays by decoding
        current = self.positions if self._positions_epoch == self.epoch.get() else {}
        mine = [current.get(w, 0) for w in range(workers)]
        names, local = self.skip_table("train")
        device = strategy.root_device  # (one process: the reduce and the gather hand their tensor back)
        totals = strategy.reduce(local.to(device), reduce_op="sum").cpu()
        positions = strategy.all_gather(torch.tensor(mine, device=device)).reshape(-1, workers).cpu().tolist()
        skipped = {name: {r: int(n) for r, n in zip(SKIP_REASONS, row.tolist(), strict=True) if n}
                   for name, row in zip(names, totals, strict=True)}  # fmt: skip
        return {
            "train_stream": {"epoch": self.epoch.get(), "trained_batches": trained, "positions": positions},
            "skipped": skipped,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        resume = state_dict.get("train_stream")
        rank = self.trainer.global_rank if self.trainer is not None else 0
        if resume is not None:
            saved = resume.get("positions")  # one list per rank; absent in older checkpoints
            mine = saved[rank] if saved is not None and rank < len(saved) else None
            resume = resume | {"positions": mine}
            if resume["positions"] is not None:
                self.positions, self._positions_epoch = dict(enumerate(resume["positions"])), resume["epoch"]
        self._resume = resume
        self.train_skips = Counter()
        if rank != 0:  # the saved counts are every rank's total
            return
        for index, source in enumerate(self.sources):
            for reason, n in state_dict.get("skipped", {}).get(source.name, {}).items():
                self.train_skips[index, reason] = n

    @property
    def skipped_by_source(self) -> dict[str, Counter]:
        """Training samples skipped so far on this rank, per source name and reason."""
        out = {source.name: Counter() for source in self.sources}
        for (index, reason), n in self.train_skips.items():
            out[self.sources[index].name][reason] += n
        return out

    @property
    def skipped(self) -> Counter:
        """Training samples skipped so far on this rank, per reason (see `capdiff.data.skips.SKIP_REASONS`)."""
        return sum(self.skipped_by_source.values(), Counter())

    @property
    def val_skipped(self) -> Counter:
        """Validation samples skipped on this rank in the pass in progress (or the last one), per reason."""
        return self.val_skip_counter.totals()

    def skip_table(self, split: str) -> tuple[list[str], torch.Tensor]:
        """This rank's skips as (row names, rows × `SKIP_REASONS` counts): one row per training source for
        `"train"`, one for `"val"` (what `capdiff.data.skips.log_skipped` reduces over ranks and logs)."""
        if split == "train":
            return [s.name for s in self.sources], table(self.train_skips, len(self.sources))
        counts = self.val_skipped
        return ["val"], torch.tensor([[counts[r] for r in SKIP_REASONS]], dtype=torch.int64)
