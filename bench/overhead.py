"""Framework overhead: the JointModule's training step under Lightning vs a bare PyTorch loop.

Both run the default (tiny) preset's models, losses, optimizer, LR schedule and gradient clipping on the same
in-memory batches. The Lightning side is the real training set-up — the module's per-step logging, the CSV
logger, the learning-rate monitor and the rich progress bar — minus the features that cost the same in any
loop (EMA, checkpoints, sample grids, periodic evaluation). Steady-state step times (the first steps of each
run dropped), alternating rounds; goal ≤ 1.03×.

    python bench/overhead.py [--rounds 5] [--steps 30]
"""

from __future__ import annotations

import copy
import itertools
import logging
import tempfile
import time

import pytorch_lightning as pl
import torch
from common import batches, build_tiny, interleaved, median, parser, ratio_line, show, spread
from torch.utils.data import DataLoader

SKIP = 3  # steps per run left out of the median (warm-up, first logging)


class StepTimes(pl.Callback):
    def __init__(self) -> None:
        self.starts: list[float] = []

    def on_train_batch_start(self, *args) -> None:
        self.starts.append(time.perf_counter())


def lightning_run(model, data: list[dict], folder: str) -> float:
    times = StepTimes()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=len(data),
        max_epochs=1,
        gradient_clip_val=1.0,
        logger=pl.loggers.CSVLogger(folder),
        log_every_n_steps=10,
        callbacks=[times, pl.callbacks.LearningRateMonitor("step"), pl.callbacks.RichProgressBar()],
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(model, train_dataloaders=DataLoader(data, batch_size=None))
    steps = [b - a for a, b in itertools.pairwise(times.starts)][SKIP:]
    return median(steps)


def bare_run(model, data: list[dict]) -> float:
    """The same step without a framework: the optimizer and schedule from the module's own configure_optimizers."""
    model.train()
    setup = model.configure_optimizers()
    optimizer, scheduler = setup["optimizer"], setup["lr_scheduler"]["scheduler"]
    starts = []
    for batch in data:
        starts.append(time.perf_counter())
        loss = model.model.losses(batch, "train")["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
    starts.append(time.perf_counter())
    return median([b - a for a, b in itertools.pairwise(starts)][SKIP:])


def main() -> None:
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)  # one fit per round: keep its start-up lines out
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=30, help="training steps per run")
    args = p.parse_args()
    steps, rounds = (SKIP + 3, 1) if args.quick else (args.steps, args.rounds)
    torch.manual_seed(0)
    _, datamodule, model = build_tiny(args)
    data = (batches(datamodule, 8) * steps)[:steps]
    # Two copies from the same weights, so neither loop trains the other's model further.
    under_lightning, bare = model, copy.deepcopy(model)
    with tempfile.TemporaryDirectory() as folder:
        results = interleaved(
            {"lightning": lambda: lightning_run(under_lightning, data, folder), "bare": lambda: bare_run(bare, data)},
            rounds=rounds,
            warmup=0 if args.quick else 1,
        )
    ratio = median(results["lightning"]) / median(results["bare"])
    show(
        f"Training step, tiny preset, batch {data[0]['pixels'].shape[0]}, {steps} steps × {rounds} rounds",
        ["loop", "ms per step: median (range over rounds)"],
        [[name, spread(values)] for name, values in results.items()],
    )
    ratio_line("lightning/bare step time", ratio, 1.03, higher_is_better=False)


if __name__ == "__main__":
    main()
