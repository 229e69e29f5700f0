"""Checkpoints are written whole or not at all, beside their final path (never through `$TMPDIR`), streamed
rather than buffered, and read back memory-mapped."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from capdiff.checkpoints.io import StreamingCheckpointIO, remove_orphans
from capdiff.distributed import host_tag
from capdiff.train import train
from tests.helpers import REPO

# Saves a small checkpoint, says so, then saves a large one over it (about 400 MB in 4,000 tensors, so the
# write takes long enough to be interrupted), the way a trainer's checkpoint IO is called.
WRITER = """
import sys, torch
from capdiff.checkpoints.io import StreamingCheckpointIO
io = StreamingCheckpointIO()
io.save_checkpoint({"step": 1, "weights": torch.arange(10.0)}, sys.argv[1])
print("first", flush=True)
big = {"step": 2, "weights": [torch.full((25_000,), float(i)) for i in range(4_000)]}
print("second", flush=True)
io.save_checkpoint(big, sys.argv[1])
print("saved", flush=True)
"""


def other_filesystem(path: Path) -> bool:
    return Path("/dev/shm").is_dir() and os.stat("/dev/shm").st_dev != os.stat(path).st_dev


def test_sigkill_during_a_save_leaves_the_previous_checkpoint_and_nothing_in_tmpdir(tmp_path: Path) -> None:
    if not other_filesystem(tmp_path):
        pytest.skip("needs /dev/shm on another filesystem than the test's folder")
    tmpdir = Path("/dev/shm") / f"capdiff-tmp-{os.getpid()}"
    tmpdir.mkdir()
    path = tmp_path / "checkpoints" / "last.ckpt"
    try:
        env = os.environ | {"TMPDIR": str(tmpdir)}
        writer = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(path)], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True
        )
        assert writer.stdout.readline().strip() == "first"
        assert writer.stdout.readline().strip() == "second"
        deadline = time.monotonic() + 60
        while not any(p.stat().st_size > 4_000_000 for p in path.parent.glob(".last.ckpt.*.partial")):
            assert writer.poll() is None and time.monotonic() < deadline, "the second save finished too soon"
            time.sleep(0.005)
        writer.send_signal(signal.SIGKILL)  # in the middle of the second save
        writer.wait()
        assert torch.load(path, weights_only=True)["step"] == 1  # the previous checkpoint, whole
        assert list(tmpdir.iterdir()) == []  # nothing was ever written to $TMPDIR
        orphans = list(path.parent.glob(".last.ckpt.*.partial"))
        assert len(orphans) == 1
        StreamingCheckpointIO().save_checkpoint({"step": 3}, path)  # the next save clears what the kill left
        assert torch.load(path, weights_only=True)["step"] == 3
        assert not orphans[0].exists()
    finally:
        for leftover in tmpdir.iterdir():
            leftover.unlink()
        tmpdir.rmdir()


def test_orphans_of_live_writers_and_other_files_are_kept(tmp_path: Path) -> None:
    host = host_tag()
    live = tmp_path / f".last.ckpt.{host}.{os.getpid()}.partial"
    other_host = tmp_path / ".last.ckpt.elsewhere.1.partial"
    unrelated = tmp_path / ".notes.partial"
    for path in (live, other_host, unrelated):
        path.write_bytes(b"x")
    assert remove_orphans(tmp_path) == []
    assert live.exists() and other_host.exists() and unrelated.exists()


def test_training_writes_and_resumes_through_capdiffs_checkpoint_io(smoke_cfg, tmp_path: Path) -> None:
    class Seen(pl.Callback):
        def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            self.io = trainer.strategy.checkpoint_io

    seen = Seen()
    train(smoke_cfg("callbacks.sample_grid=null", "callbacks.periodic_eval=null"), extra_callbacks=[seen])
    assert isinstance(seen.io, StreamingCheckpointIO)
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    loaded = StreamingCheckpointIO().load_checkpoint(last)
    assert loaded["global_step"] == 4
    assert str(last) in Path("/proc/self/maps").read_text()  # memory-mapped, not read into memory


def test_last_ckpt_follows_the_newest_epoch_when_the_monitored_loss_stops_improving(tmp_path) -> None:
    """Lightning 2.6 writes last.ckpt only with a new top-k checkpoint; capdiff's ModelCheckpoint writes it at every
    save point, so `ckpt_path=last`, a requeue's resume, evaluation and export read the newest step."""
    import pytorch_lightning as pl

    from capdiff.checkpoints.last import ModelCheckpoint
    from tests.helpers import ScalarModule

    class Worsening(ScalarModule):
        def validation_step(self, batch, batch_idx) -> None:
            self.log("val/loss", float(self.current_epoch))  # best at epoch 0, worse ever after

    data = torch.utils.data.DataLoader(torch.randn(8, 2), batch_size=2)
    for every_n_train_steps, limit_val_batches in ((None, 1.0), (3, 0)):
        folder = tmp_path / f"every{every_n_train_steps}"
        checkpoint = ModelCheckpoint(dirpath=folder, filename="epoch{epoch:03d}", auto_insert_metric_name=False,
                                     save_last=True, save_top_k=1, monitor="val/loss", mode="min",
                                     enable_version_counter=False, every_n_train_steps=every_n_train_steps)  # fmt: skip
        trainer = pl.Trainer(max_epochs=3, callbacks=[checkpoint], logger=False, enable_progress_bar=False,
                             enable_model_summary=False, limit_val_batches=limit_val_batches)  # fmt: skip
        trainer.fit(Worsening(), data, data)
        last = torch.load(folder / "last.ckpt", weights_only=True)
        assert (last["epoch"], last["global_step"]) == (2, 12)
    assert torch.load(tmp_path / "everyNone" / "epoch000.ckpt", weights_only=True)["global_step"] == 4  # the best
