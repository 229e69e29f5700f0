"""Slurm: one owner for the pre-timeout / preemption signal.

Slurm sends the signal some time before a job's limit (`hydra.launcher.signal_delay_s`, submitit's USR2 unless
SUBMITIT_PREEMPT_SIGNAL names another). submitit and Lightning would both like to handle it; capdiff's
`Requeue` callback replaces both (Lightning's auto-requeue is switched off, submitit's handler is replaced
during fit): every rank notes the signal, all ranks agree at the next optimizer step's end (never mid-accumulation),
save one checkpoint together (`checkpoints/requeue.ckpt`, replaced by the next requeue),
rank 0 runs `scontrol requeue`, and the job waits for Slurm to stop it. The requeued job runs the same Hydra job
in the same run folder; `ckpt_path` then resolves to `auto` (SLURM_RESTART_COUNT > 0), so it resumes from that
checkpoint at the same step, with the same W&B run (its id is kept in the run folder).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytorch_lightning as pl

log = logging.getLogger(__name__)

REQUEUE_CHECKPOINT = "requeue.ckpt"


@contextlib.contextmanager
def failing_the_step() -> Iterator[None]:
    """In a Slurm step of several tasks (the ranks of one job), an error ends this task with exit status 1.

    Hydra's multirun turns a job's exception into a failed result and the task then exits 0, so srun would
    go on waiting for the other ranks, which wait for this one in DDP's rendezvous or their next collective: a
    job of 8 GPUs idles to its time limit. An exit status of 1 makes srun stop the step
    (`capdiff.config.KILL_BAD_EXIT`), and the job and its sweep fail with this task's traceback in its log."""
    try:
        yield
    except Exception:
        if int(os.environ.get("SLURM_NTASKS", "1")) <= 1:
            raise
        log.exception("rank %s of this Slurm job failed; the job stops", os.environ.get("SLURM_PROCID", "?"))
        raise SystemExit(1) from None


def requeue_signal() -> signal.Signals:
    name = os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
    return signal.Signals[name if name.startswith("SIG") else f"SIG{name}"]


class Requeue(pl.Callback):
    def __init__(self, max_requeues: int = 100, wait_s: float = 600) -> None:
        self.max_requeues = max_requeues  # then checkpoint and stop instead of requeueing again
        self.wait_s = wait_s  # how long to wait for Slurm to stop the job after the requeue
        self.signalled = False
        self._previous = None

    def _note(self, signum: int, frame) -> None:
        self.signalled = True  # a signal handler does as little as possible: the work happens at a batch end

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        sig = requeue_signal()
        self._previous = signal.signal(sig, self._note)
        log.info("Slurm job %s: %s saves a checkpoint and requeues", os.environ.get("SLURM_JOB_ID"), sig.name)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._previous is not None:
            signal.signal(requeue_signal(), self._previous)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx) -> None:
        # Only after an optimizer step: a checkpoint mid-accumulation would resume without the gradients of the
        # micro-batches already accumulated (every rank is at the same batch, so they all agree on this).
        epoch_loop = trainer.fit_loop.epoch_loop
        if (batch_idx + 1) % trainer.accumulate_grad_batches and not epoch_loop.batch_progress.is_last_batch:
            return
        if not trainer.strategy.reduce_boolean_decision(self.signalled, all=False):
            return
        # One file, replaced by each requeue (written atomically): a requeue-per-step file at SD size is ~15 GB.
        path = Path(trainer.default_root_dir) / "checkpoints" / REQUEUE_CHECKPOINT
        started = time.monotonic()
        trainer.save_checkpoint(path)
        log.info("requeue checkpoint written in %.0f s (step %d)", time.monotonic() - started, trainer.global_step)
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
        if restarts >= self.max_requeues:
            log.warning("signal received; requeued %d times already: stopping after saving %s", restarts, path)
            trainer.should_stop = True
            return
        requeued = True
        if trainer.is_global_zero:
            job = os.environ.get("SLURM_ARRAY_JOB_ID")
            job = f"{job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if job else os.environ["SLURM_JOB_ID"]
            log.info("saved %s; requeueing Slurm job %s", path, job)
            done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
            requeued = done.returncode == 0
            if not requeued:
                log.error(
                    "`scontrol requeue %s` failed (%s): stopping here. Resume with ckpt_path=%s (the cluster may "
                    "not allow requeueing: JobRequeue=0, or --no-requeue)",
                    job, done.stderr.strip(), path,
                )  # fmt: skip
        if not trainer.strategy.broadcast(requeued, src=0):
            trainer.should_stop = True
            return
        # Slurm now stops this job and starts it again; finishing normally here would report it as done.
        time.sleep(self.wait_s)  # resumed after the signal handler runs (PEP 475), so one call waits it out
        raise RuntimeError(f"the job was requeued but Slurm did not stop it within {self.wait_s} s")
