"""Skipped-sample counts are exact: each sample once when the stream reaches it, a resumed run's totals those
of the run it continues (the batches it reads again are not counted twice), and the logged values the sum
over ranks."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from pytorch_lightning.strategies import DDPStrategy

from capdiff.data import ImageTextDataModule
from capdiff.data.skips import log_skipped
from tests.helpers import REPO, good_members, image_bytes, write_tar


def alternating_shard(path: Path, prefix: str, goods: int) -> str:
    """good, caption-less, good, caption-less, ...: read in order, the n-th good sample drawn comes after
    exactly n - 1 bad ones."""
    members = []
    for i in range(goods):
        members += [*good_members(prefix, 1, start=i), (f"{prefix}bad{i:05d}.png", image_bytes())]
    return str(write_tar(path, members))


class Tiny(pl.LightningModule):
    """The least a module does to train on the data and log its skips as the recipes' modules do."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        log_skipped(self, "train")
        return (batch["pixels"].mean() - self.weight) ** 2

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        pass

    def on_validation_epoch_end(self) -> None:
        log_skipped(self, "val")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class SaveAt(pl.Callback):
    def __init__(self, step: int, path: Path) -> None:
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer: pl.Trainer, *args) -> None:
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)


def fit(dm: ImageTextDataModule, root: Path, callbacks=(), ckpt_path: Path | None = None) -> dict[str, float]:
    trainer = pl.Trainer(accelerator="cpu", max_epochs=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=list(callbacks),
                         default_root_dir=root, num_sanity_val_steps=1)  # fmt: skip
    trainer.fit(Tiny(), datamodule=dm, ckpt_path=ckpt_path)
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


def test_a_resumed_run_counts_what_the_whole_run_counts(shard_dir: Path, tmp_path: Path) -> None:
    train = [alternating_shard(shard_dir / f"t{n}.tar", f"t{n}-", goods=10) for n in range(2)]
    val = [alternating_shard(shard_dir / "v0.tar", "v0-", goods=3), str(shard_dir / "garbage.tar")]
    (shard_dir / "garbage.tar").write_bytes(b"\x00garbage" * 500)

    def data() -> ImageTextDataModule:
        return ImageTextDataModule(train, val, batch_size=4, num_workers=2, samples_per_epoch=32, shuffle_buffer=1,
                                   image_size=8, persistent_workers=False)  # fmt: skip

    whole = data()
    logged = fit(whole, tmp_path / "whole", [SaveAt(3, tmp_path / "mid.ckpt")])
    # per epoch, each of the 2 workers draws 16 good samples, and reaches the 15 bad ones between them
    assert whole.skipped == {"missing_caption": 2 * 2 * 15}
    assert logged["data/skipped_missing_caption"] == 60
    # a validation pass: 3 good and 3 bad samples, then a shard that is not a tar (the sanity check's part-pass
    # is not logged)
    assert whole.val_skipped == {"missing_caption": 3, "shard_error": 1}
    assert logged["val/skipped_missing_caption"] == 3 and logged["val/skipped_shard_error"] == 1

    saved = torch.load(tmp_path / "mid.ckpt", weights_only=True)["ImageTextDataModule"]
    # 3 batches of 4 trained: each worker's first batch and worker 0's second, 4 + 4 + 4 good samples drawn;
    # worker 0 drew 15 raw samples (8 good, 7 bad), worker 1 drew 7 (4 good, 3 bad): one list per rank
    assert saved == {
        "train_stream": {"epoch": 0, "trained_batches": 3, "positions": [[15, 7]]},
        "skipped": {"source0": {"missing_caption": 3 + 3 + 4}},
    }
    resumed = data()
    logged_resumed = fit(resumed, tmp_path / "resumed", ckpt_path=tmp_path / "mid.ckpt")
    assert resumed.skipped == whole.skipped
    assert logged_resumed["data/skipped_missing_caption"] == 60


WORLD = 2


def _rank(rank: int, port: int, folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        dm = ranked_data(Path(folder))
        dm.setup_streams(rank, WORLD)
        for index, batch in enumerate(dm.train_dataloader()):
            if rank == 1 and index == 3:  # the ranks' counts differ, so a sum is not twice one rank's count
                break
            dm.on_after_batch_transfer(batch, 0)  # as the trainer hands each batch to the model
        list(dm.val_dataloader())
        module = pl.LightningModule()
        # what a DDP trainer gives the module: its strategy's collectives and the data module
        module._trainer = SimpleNamespace(strategy=DDPStrategy(), datamodule=dm, sanity_checking=False)
        logged: dict[str, tuple[float, dict]] = {}
        module.log = lambda name, value, **kwargs: logged.__setitem__(name, (value, kwargs))
        log_skipped(module, "train")
        log_skipped(module, "val")
        own = {"train": dm.skipped_by_source, "val": dm.val_skipped}
        torch.save({"logged": logged, "own": own}, Path(folder) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def write_ranked_shards(folder: Path) -> None:
    """Two sources: clean, and noisy whose 2 shards (one per rank) hold different numbers of bad samples."""
    for n in range(2):
        write_tar(folder / f"clean{n}.tar", good_members(f"c{n}-", 6))
    alternating_shard(folder / "noisy0.tar", "n0-", goods=5)
    write_tar(folder / "noisy1.tar", [("lone.png", image_bytes()), *good_members("n1-", 5)])
    for n in range(3):
        alternating_shard(folder / f"val{n}.tar", f"v{n}-", goods=3)
    (folder / "garbage.tar").write_bytes(b"\x00garbage" * 500)


def ranked_data(folder: Path, workers: int = 0) -> ImageTextDataModule:
    sources = [{"urls": f"{folder}/clean{{0..1}}.tar", "weight": 1, "name": "clean"},
               {"urls": f"{folder}/noisy{{0..1}}.tar", "weight": 1, "name": "noisy"}]  # fmt: skip
    val = [f"{folder}/val{{0..2}}.tar", f"{folder}/garbage.tar"]
    return ImageTextDataModule(None, val, sources=sources, batch_size=4, num_workers=workers, samples_per_epoch=48,
                               shuffle_buffer=1, image_size=8)  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_log_the_sum_of_their_counts(tmp_path: Path) -> None:
    write_ranked_shards(tmp_path)
    mp.spawn(_rank, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    own = [r["own"]["train"]["noisy"]["missing_caption"] for r in ranks]
    assert own[0] != own[1] and all(r["own"]["train"]["clean"] == {} for r in ranks)
    for r in ranks:  # every rank logs the same totals
        assert r["logged"]["data/skipped_missing_caption"][0] == sum(own)
        assert r["logged"]["data/noisy/skipped_missing_caption"][0] == sum(own)
        assert "data/clean/skipped_missing_caption" not in r["logged"]
    # validation: each rank counts its own samples, and the garbage shard once; Lightning sums what they log
    single = ranked_data(tmp_path)
    single.setup_streams(0, 1)
    list(single.val_dataloader())
    assert single.val_skipped == {"missing_caption": 9, "shard_error": 1}
    assert sum((r["own"]["val"] for r in ranks), Counter()) == single.val_skipped
    for reason, n in single.val_skipped.items():
        values = [r["logged"][f"val/skipped_{reason}"] for r in ranks]
        assert sum(v for v, _ in values) == n
        assert all(kwargs["sync_dist"] and kwargs["reduce_fx"] == "sum" for _, kwargs in values)


def fit_two_ranks(folder: Path, root: Path, save_at: int | None = None, resume: bool = False) -> dict[str, float]:
    """Two DDP ranks on the CPU, each its own process (Lightning starts rank 1 by running this module again, as
    it runs train.py again); the metrics logged at the end (the summed totals), as rank 0 saw them."""
    arguments = [str(folder), str(root), str(save_at or 0), str(int(resume))]
    command = [sys.executable, "-m", "tests.test_skip_counts", *arguments]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads((root / "metrics.json").read_text())


def _fit_two_ranks(folder: Path, root: Path, save_at: int, resume: bool) -> None:
    callbacks = [SaveAt(save_at, folder / "mid.ckpt")] if save_at else []
    trainer = pl.Trainer(accelerator="cpu", devices=WORLD, strategy="ddp", max_epochs=2, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=callbacks, default_root_dir=root, num_sanity_val_steps=0)  # fmt: skip
    trainer.fit(Tiny(), datamodule=ranked_data(folder, workers=1), ckpt_path=folder / "mid.ckpt" if resume else None)
    if trainer.global_rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        (root / "metrics.json").write_text(json.dumps({k: float(v) for k, v in trainer.callback_metrics.items()}))


@pytest.mark.slow
def test_a_two_rank_run_resumed_mid_epoch_logs_what_the_whole_run_logs(tmp_path: Path) -> None:
    """The ranks skip different numbers of samples; saved mid-epoch and resumed on both ranks, the run's totals
    are those of the run it continues, not twice one rank's count or the batches it reads again counted twice."""
    write_ranked_shards(tmp_path)
    whole = fit_two_ranks(tmp_path, tmp_path / "whole", save_at=3)
    total = whole["data/skipped_missing_caption"]
    assert total > 0 and whole["data/noisy/skipped_missing_caption"] == total
    saved = torch.load(tmp_path / "mid.ckpt", weights_only=True)["ImageTextDataModule"]
    assert len(saved["train_stream"]["positions"]) == WORLD  # each rank's place in its stream
    at_save = saved["skipped"]["noisy"]["missing_caption"]
    assert 0 < at_save < total
    resumed = fit_two_ranks(tmp_path, tmp_path / "resumed", resume=True)
    assert resumed["data/skipped_missing_caption"] == total
    assert resumed["data/noisy/skipped_missing_caption"] == total


if __name__ == "__main__":
    _fit_two_ranks(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), bool(int(sys.argv[4])))
