"""Skipped samples: the reasons, how a worker counts them, and their logging summed over ranks.

A sample is counted once, when the stream reaches it (after the shuffle buffer, as it is decoded). A training
batch carries what was skipped while it was drawn (`"skipped"`), and the data module adds that when the batch
reaches the model, so the counts follow the batches trained, whatever the loader read ahead, and a checkpoint
saves exactly them. The validation stream adds to a counter shared with its workers instead: its last
batch may come before the last bad samples, and every sample of the split is read once per pass.
"""

from __future__ import annotations

import logging
import math
import multiprocessing as mp
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    import pytorch_lightning as pl

log = logging.getLogger(__name__)

SKIP_REASONS = (
    "shard_error",  # a shard that gave no sample: it cannot be opened or read as tar
    "truncated_shard",  # a shard that failed part-way, after some samples (a cut download); those are kept
    "missing_image",
    "empty_image",
    "truncated_image",
    "undecodable_image",
    "too_large",  # over data.max_pixels
    "missing_caption",
    "empty_caption",
    "bad_caption",  # not UTF-8, or json that does not parse
    "missing_latents",  # data.latents=true and no latents.npy member
    "bad_latents",  # latents.npy that does not parse as 2×C×h×w
)


class SkipCounter:
    """Skipped samples per reason, in shared memory: dataloader workers add, the main process reads."""

    def __init__(self) -> None:
        self._counts = mp.Array("q", len(SKIP_REASONS))

    def add(self, reason: str) -> None:
        with self._counts.get_lock():
            self._counts[SKIP_REASONS.index(reason)] += 1

    def reset(self) -> None:
        with self._counts.get_lock():
            self._counts[:] = [0] * len(SKIP_REASONS)

    def totals(self) -> Counter:
        with self._counts.get_lock():
            return Counter({r: n for r, n in zip(SKIP_REASONS, self._counts[:], strict=True) if n})


@dataclass
class SkipLog:
    """A worker's view of skips, by (source, reason): added to the shared `counter` when there is one, kept
    in `pending` for the next training batch otherwise; each reason logged at most once per `every_s`."""

    every_s: float = 30.0
    counter: SkipCounter | None = None
    good: Counter = field(default_factory=Counter)  # usable samples per source
    counts: Counter = field(default_factory=Counter)  # per reason, for the log line
    pending: Counter = field(default_factory=Counter)
    _last_log: dict = field(default_factory=dict)

    def skip(self, reason: str, where: str, detail: str, source: int = 0) -> None:
        if self.counter is not None:
            self.counter.add(reason)
        else:
            self.pending[source, reason] += 1
        self.counts[reason] += 1
        now = time.monotonic()
        if now - self._last_log.get(reason, -math.inf) >= self.every_s:
            self._last_log[reason] = now
            log.warning(
                "skipped sample %s (%s: %s); %d skipped for this reason so far in this worker",
                where,
                reason,
                detail,
                self.counts[reason],
            )

    def take(self) -> dict[tuple[int, str], int]:
        """What was skipped since the last call, as a plain dict (it travels with a batch)."""
        taken, self.pending = dict(self.pending), Counter()
        return taken


def table(counts: dict[tuple[int, str], int], rows: int) -> torch.Tensor:
    """`{(row, reason): n}` as a rows × SKIP_REASONS table."""
    out = torch.zeros(rows, len(SKIP_REASONS), dtype=torch.int64)
    for (row, reason), n in counts.items():
        out[row, SKIP_REASONS.index(reason)] += n
    return out


def log_skipped(module: pl.LightningModule, split: str) -> None:
    """Log the data module's skipped samples, summed over ranks, by reason (those not all zero):

    - `split="train"`, at each training step: `data/skipped_<reason>` over all sources, and, with several
      sources, `data/<source name>/skipped_<reason>`: the run's batches so far (a resumed run's included);
    - `split="val"`, at the end of a validation pass: `val/skipped_<reason>`, that pass's.

    Every rank calls it at the same point: one all-reduce of the whole table gives every rank the same totals,
    and with them the same metric names (a name logged with sync_dist on one rank alone would hang the rest).
    """
    trainer = module.trainer
    datamodule = getattr(trainer, "datamodule", None)
    if not hasattr(datamodule, "skip_table") or trainer.sanity_checking:
        return
    names, local = datamodule.skip_table(split)
    # a copy: the all-reduce writes into its tensor, and `local` is still wanted for the validation metrics
    total = trainer.strategy.reduce(local.to(module.device, copy=True), reduce_op="sum").cpu()
    if split == "train":
        rows = [("data/", total.sum(0))]
        if len(names) > 1:
            rows += [(f"data/{name}/", row) for name, row in zip(names, total, strict=True)]
        for prefix, row in rows:
            for reason, n in zip(SKIP_REASONS, row.tolist(), strict=True):
                if n:
                    module.log(f"{prefix}skipped_{reason}", float(n), on_step=True, on_epoch=False, batch_size=1)
        return
    # at an epoch's end Lightning reduces what it logs itself: each rank gives its own count, summed there
    for reason, mine, n in zip(SKIP_REASONS, local.sum(0).tolist(), total.sum(0).tolist(), strict=True):
        if n:
            module.log(f"val/skipped_{reason}", float(mine), sync_dist=True, reduce_fx="sum", batch_size=1)
