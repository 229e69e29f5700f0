"""The LightningDataModule over image–text WebDataset shards (the `data=` config group)."""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import pytorch_lightning as pl
import webdataset as wds
from torch.utils.data import DataLoader

from capdiff.data.cache_latents import cached_urls
from capdiff.data.decode import CaptionKey, SkipCounter
from capdiff.data.streams import DecodeSpec, SharedInt, TrainStream, ValStream
from capdiff.data.transforms import as_unit
from capdiff.data.urls import check_local_shards, count_samples, expand_urls, local_path

log = logging.getLogger(__name__)


def batch_size(batch: dict) -> int:
    """Samples in a batch, for Lightning's `ThroughputMonitor` (`batch_size_fn`, see conf/callbacks/default.yaml)."""
    return len(batch["keys"])


class EpochLoader(DataLoader):
    """A DataLoader that tells its stream which epoch starts each time it is iterated, and resumes mid-epoch.

    `epoch_fn` gives the trainer's epoch (so a resumed run replays the same order); without it the
    loader counts its own iterations. `resume` (`{"epoch", "trained_batches"}`, from a checkpoint) makes the
    first iteration of that epoch yield only the batches the interrupted run had left.
    """

    def __init__(
        self,
        dataset: TrainStream,
        epoch_fn: Callable[[], int | None] | None = None,
        resume: dict[str, int] | None = None,
        **kwargs,
    ):
        super().__init__(dataset, batch_size=None, **kwargs)
        self._epoch_fn = epoch_fn
        self._iterations = 0
        self._resume = resume

    def __iter__(self):
        epoch = self._epoch_fn() if self._epoch_fn is not None else None
        epoch = self._iterations if epoch is None else epoch
        self._iterations += 1
        resume_at = 0
        if self._resume is not None and self._resume["epoch"] == epoch:
            trained = self._resume["trained_batches"]
            if trained >= len(self.dataset):
                # saved after the epoch's last batch, before the trainer moved on: Lightning goes on with the
                # next epoch on this iterator
                epoch += 1
            elif trained > 0:
                resume_at = trained
                log.info("Resuming epoch %d after its %d trained batches (they are read again, not trained).",
                         epoch, trained)  # fmt: skip
        self._resume = None
        self.dataset.epoch.set(epoch)
        self.dataset.resume_at.set(resume_at)
        return super().__iter__()


class ImageTextDataModule(pl.LightningDataModule):
    """Batches `{"pixels": B×3×H×W in [-1, 1], "captions": [str], "keys": [str]}` from WebDataset shards.

    `self.skipped` counts the samples skipped so far, per reason, across this rank's workers.
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
    ) -> None:
        super().__init__()
        for key, value in (("data.image_size", image_size), ("data.batch_size", batch_size)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{key}={value!r} must be a positive integer.")
        if num_workers < 0:
            raise ValueError(f"data.num_workers={num_workers} must be 0 (load in the main process) or more.")
        if samples_per_epoch is not None and samples_per_epoch <= 0:
            raise ValueError(f"data.samples_per_epoch={samples_per_epoch} must be positive (or null to count).")
        # Evaluation reads only the validation split, so it may leave the training shards out.
        self.train_urls = expand_urls(train_urls, "data.train_urls") if train_urls is not None else []
        self.val_urls = expand_urls(val_urls, "data.val_urls") if val_urls is not None else []
        self.caption_key = CaptionKey.parse(caption_key)
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
        self.latents = latents
        self.latents_dir = latents_dir  # read by capdiff.artifacts.prepare_latents
        self.reading_latents = False  # set once the shards with latents are in place (use_cached_shards)
        self.skip_counter = SkipCounter()
        self.epoch = SharedInt()
        self.resume_at = SharedInt()
        self._resume: dict[str, int] | None = None  # the train stream's position, from a checkpoint
        self._shards_checked = False
        self.train_stream: TrainStream | None = None
        self.val_stream: ValStream | None = None

    # ------------------------------------------------------------------ set-up
    def setup(self, stage: str | None = None) -> None:
        self.setup_streams(*self._rank_and_world())

    def setup_streams(self, rank: int, world_size: int) -> None:
        """Check the shards and build the streams of one rank (tests call it to play several ranks)."""
        self._check_shards()
        val_spec = DecodeSpec(self.image_size, self.caption_key, self.max_pixels, False, self.reading_latents)
        self.val_stream = ValStream(
            self.val_urls,
            val_spec,
            self.val_batch_size,
            rank,
            world_size,
            self.skip_counter,
            self.skip_log_every_s,
        )
        if not self.train_urls:
            self.train_stream = None
            return
        slots = world_size * max(1, self.num_workers)
        if len(self.train_urls) < slots:
            raise ValueError(
                f"data.train_urls has {len(self.train_urls)} shards but {world_size} ranks × "
                f"{max(1, self.num_workers)} workers need at least {slots} (each reads its own share). Lower "
                f"data.num_workers to {max(1, len(self.train_urls) // world_size)} or split the data into more "
                "shards (`python -m capdiff.data.shards write --shard-size ...`)."
            )
        per_rank = math.ceil(self._samples_per_epoch() / (self.batch_size * world_size))
        workers = max(1, self.num_workers)
        train_spec = DecodeSpec(
            self.image_size, self.caption_key, self.max_pixels, self.random_crop, self.reading_latents
        )
        self.train_stream = TrainStream(
            self.train_urls,
            train_spec,
            batch_size=self.batch_size,
            batches_per_worker=math.ceil(per_rank / workers),
            num_workers=self.num_workers,
            rank=rank,
            world_size=world_size,
            seed=self.seed,
            shuffle_buffer=self.shuffle_buffer,
            epoch=self.epoch,
            skip_counter=self.skip_counter,
            log_every_s=self.skip_log_every_s,
            resume_at=self.resume_at,
        )

    def use_cached_shards(self, folder: str | Path | None) -> None:
        """Read `latents.npy` with every sample from now on, from the copies of the shards in `folder`
        (None: the shards themselves are the cached ones)."""
        if folder is not None:
            self.train_urls = cached_urls(self.train_urls, Path(folder))
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
        if self.train_urls:
            check_local_shards(self.train_urls, "data.train_urls")
        if self.val_urls:
            check_local_shards(self.val_urls, "data.val_urls")
        self._check_caption_key()
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

    def _check_caption_key(self, max_samples: int = 16) -> None:
        """Fail at start-up when the first samples of the first training shard lack the caption key."""
        errors: list[Exception] = []

        def keep_going(err: Exception) -> bool:
            errors.append(err)
            return True

        first = (self.train_urls or self.val_urls or [None])[0]
        if first is None:
            return
        seen = []
        for sample in wds.tarfile_samples([{"url": first}], handler=keep_going):
            seen.append(sample)
            if self.caption_key.present_in(sample) or len(seen) >= max_samples:
                break
        if not seen or any(self.caption_key.present_in(s) for s in seen):
            return
        members = sorted({k for s in seen for k in s if not k.startswith("__")})
        raise ValueError(
            f"data.caption_key={self.caption_key.spec!r} is in none of the first {len(seen)} samples of "
            f"{first}; they have members {members}. Set data.caption_key to one of them "
            "(e.g. 'txt') or to a field of the json member (e.g. 'json.caption')."
        )

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
                "data.train_urls is not set: training needs shards, e.g. data.train_urls='/data/{000..099}.tar'."
            )
        resume, self._resume = self._resume, None
        return EpochLoader(self.train_stream, epoch_fn=self._trainer_epoch, resume=resume, **self._loader_kwargs())

    def val_dataloader(self) -> DataLoader | list:
        if self.val_stream is None:
            self.setup("validate")
        if not self.val_urls:
            return []
        workers = min(self.num_workers, len(self.val_urls))
        kwargs = self._loader_kwargs() | {"num_workers": workers}
        if workers == 0:
            kwargs = {"pin_memory": self.pin_memory}
        return DataLoader(self.val_stream, batch_size=None, **kwargs)

    def test_dataloader(self) -> DataLoader | list:
        """Evaluation (`evaluate.py`) reads the validation split."""
        return self.val_dataloader()

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        """uint8 pixels → float `[-1, 1]` on the model's device."""
        return batch | {"pixels": as_unit(batch["pixels"])}

    def _trainer_epoch(self) -> int | None:
        """The epoch the trainer is about to train. Not `trainer.current_epoch`: on a resume from an epoch-end
        checkpoint that still names the finished epoch when Lightning builds the loader's iterator."""
        return None if self.trainer is None else self.trainer.fit_loop.epoch_progress.current.processed

    # The train stream's position lives in the datamodule's state, which Lightning saves in every checkpoint
    # and restores on every resume. (A loader's own `state_dict` is restored only when Lightning's progress
    # counters say the run is restarting, and after a resume from an epoch's last batch they say it is not:
    # the next mid-epoch checkpoint then resumed by replaying its whole epoch.)
    def state_dict(self) -> dict:
        if self.trainer is None or self.train_stream is None:
            return {}
        trained = self.trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return {"train_stream": {"epoch": self.epoch.get(), "trained_batches": trained}}

    def load_state_dict(self, state_dict: dict) -> None:
        self._resume = state_dict.get("train_stream")

    @property
    def skipped(self) -> Counter:
        """Samples skipped so far on this rank, per reason (see `capdiff.data.decode.SKIP_REASONS`)."""
        return self.skip_counter.totals()
