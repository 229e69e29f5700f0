"""The DataLoaders over the streams: the training one tells its stream the epoch and where a resumed epoch
goes on; the validation one starts each pass's skip counts from zero."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator

import torch
from torch.utils.data import DataLoader

from capdiff.data.streams import TrainStream, ValStream

log = logging.getLogger(__name__)


class EpochLoader(DataLoader):
    """A DataLoader that tells its stream which epoch starts each time it is iterated, and resumes mid-epoch.

    `epoch_fn` gives the trainer's epoch (so a resumed run replays the same order); without it the
    loader counts its own iterations. `resume` (`{"epoch", "trained_batches", "positions"}`, from a checkpoint)
    makes the first iteration of that epoch yield only the batches the interrupted run had left, each worker
    skipping the raw samples its trained batches drew (`positions`, one per worker) without decoding them.
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
        resume_at, positions = 0, None
        if self._resume is not None and self._resume["epoch"] == epoch:
            trained = self._resume["trained_batches"]
            if trained >= len(self.dataset):
                # saved after the epoch's last batch, before the trainer moved on: Lightning goes on with the
                # next epoch on this iterator
                epoch += 1
            elif trained > 0:
                resume_at, positions = trained, self._resume.get("positions")
                how = "skipped undecoded" if positions else "read again, not trained"
                log.info("Resuming epoch %d after its %d trained batches (%s).", epoch, trained, how)
        self._resume = None
        self.dataset.epoch.set(epoch)
        self.dataset.resume_at.set(resume_at)
        saved = positions if positions and len(positions) == self.dataset.num_workers else None
        for worker in range(self.dataset.num_workers):
            self.dataset.resume_positions[worker] = saved[worker] if saved else -1
        return super().__iter__()


class ValLoader(DataLoader):
    """A DataLoader over the validation split whose skip counts are those of the pass in progress (or the last)."""

    def __init__(self, dataset: ValStream, **kwargs) -> None:
        super().__init__(dataset, batch_size=None, **kwargs)

    def __iter__(self):
        self.dataset.skip_counter.reset()
        return super().__iter__()


class EvenBatches:
    """A validation loader that gives every rank the same number of batches, for strategies under which every
    forward is a collective (FSDP gathers each unit's weights from all ranks): a rank that has run out of its
    own batches while others have not gets its last batch again, marked `padding: True` (run through the model,
    not logged), until every rank has run out.

    The ranks' counts can differ: samples are dealt round-robin, and corrupt ones are skipped where they are
    found. One all-reduce of a flag per batch tells them apart."""

    def __init__(self, loader: Iterable[dict], strategy) -> None:
        self.loader, self.strategy = loader, strategy

    def __iter__(self) -> Iterator[dict]:
        own, last = iter(self.loader), None
        while True:
            batch = next(own, None) if own is not None else None
            if batch is None:
                own = None
            left = torch.tensor([0.0 if batch is None else 1.0], device=self.strategy.root_device)
            if float(self.strategy.reduce(left, reduce_op="sum")) == 0:
                return
            if batch is not None:
                last = batch
                yield batch
            elif last is None:
                raise RuntimeError(
                    "this rank's share of the validation split is empty while other ranks have batches: give "
                    "data.val_urls more samples than there are ranks (or fewer ranks)."
                )
            else:
                yield last | {"padding": True}
