"""Training as users run it: fit, checkpoints, resume, load_from_checkpoint, DDP, user shards."""

from __future__ import annotations

import copy
import csv
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from diffusers import AutoencoderKL
from omegaconf import OmegaConf

from capdiff.joint import JointModule
from capdiff.train import train
from tests.helpers import good_members, run_entry_point, write_tar


class Snapshot(pl.Callback):
    """What the trainer holds when training starts: the step and the optimizer state."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.step = trainer.global_step
        self.optimizer = copy.deepcopy(trainer.optimizers[0].state_dict())  # steps update it in place


def test_fit_writes_checkpoints_samples_and_metrics(smoke_cfg, tmp_path: Path) -> None:
    metrics = train(smoke_cfg())
    run = tmp_path / "run"
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert (run / "samples" / "generated_final.png").is_file()
    assert (run / "samples" / "captions_final.jsonl").is_file()
    assert (run / "config.yaml").is_file() and (run / "metrics.json").is_file()
    for term in ("diffusion", "caption", "contrastive"):
        assert f"val/{term}_loss" in metrics
    # the periodic evaluation at the end of training says when it ran, in minutes of training
    rows = list(csv.DictReader((run / "csv" / "version_0" / "metrics.csv").open()))
    minutes = [float(r["peval/train_minutes"]) for r in rows if r.get("peval/train_minutes")]
    assert len(minutes) == 1 and 0 < minutes[0] < 5


def test_resume_continues_at_the_same_step_with_the_same_optimizer_state(smoke_cfg, tmp_path: Path) -> None:
    train(smoke_cfg())
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    saved = torch.load(last, weights_only=True)
    assert saved["global_step"] == 4  # 32 samples / batch 8

    snapshot = Snapshot()
    train(smoke_cfg("trainer.max_epochs=2", f"ckpt_path={last}"), extra_callbacks=[snapshot])
    assert snapshot.step == 4
    restored = snapshot.optimizer["state"]
    for index, state in saved["optimizer_states"][0]["state"].items():
        torch.testing.assert_close(restored[index]["exp_avg"], state["exp_avg"])
        assert restored[index]["step"] == state["step"]
    assert torch.load(last, weights_only=True)["global_step"] == 8


class Keys(pl.Callback):
    """The sample keys of every trained batch, by global step; saves a checkpoint after the steps in `save`."""

    def __init__(self, save: dict[int, Path] | None = None) -> None:
        self.by_step: dict[int, list[str]] = {}
        self.save = save or {}

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch: dict, batch_idx: int) -> None:
        self.by_step[trainer.global_step] = sorted(batch["keys"])
        if trainer.global_step in self.save:
            trainer.save_checkpoint(self.save[trainer.global_step])


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resumed_run_trains_exactly_the_batches_the_whole_run_had_left(smoke_cfg, tmp_path: Path, workers) -> None:
    common = ["trainer.max_epochs=3", f"data.num_workers={workers}", "callbacks.sample_grid=null"]
    # 4 batches an epoch. Checkpoints: after the 1st batch of epoch 1 (step 5), after the last of epoch 0
    # (step 4, at the batch's end), and the epoch-end one that ModelCheckpoint writes
    whole = Keys(save={5: tmp_path / "mid.ckpt", 4: tmp_path / "batch_end.ckpt"})
    train(smoke_cfg(*common, "callbacks.model_checkpoint.save_top_k=-1"), extra_callbacks=[whole])
    assert sorted(whole.by_step) == list(range(1, 13))
    epoch_end = Path(shutil.copy(tmp_path / "run" / "checkpoints" / "epoch000-step000004.ckpt", tmp_path / "e.ckpt"))

    # and two written by the run resumed from batch_end.ckpt (Lightning leaves that run's epoch counters one
    # behind): in the middle of epoch 1 (step 6) and after its last batch (step 8)
    again, again_end = tmp_path / "again.ckpt", tmp_path / "again_end.ckpt"
    cases = [(tmp_path / "mid.ckpt", 6), (tmp_path / "batch_end.ckpt", 5), (epoch_end, 5), (again, 7), (again_end, 9)]
    for checkpoint, first in cases:
        resumed = Keys(save={6: again, 8: again_end} if checkpoint.name == "batch_end.ckpt" else None)
        train(smoke_cfg(*common, f"ckpt_path={checkpoint}"), extra_callbacks=[resumed])
        steps = list(range(first, 13))
        assert sorted(resumed.by_step) == steps, checkpoint.name
        got, left = [resumed.by_step[s] for s in steps], [whole.by_step[s] for s in steps]
        if workers == 0 or (first - 1) % 4 % workers == 0:  # resumed after a whole round of workers
            assert got == left, checkpoint.name  # the same batches in the same order
        else:  # the same batches; the loader starts a resumed epoch at worker 0, so they come in another order
            assert sorted(got) == sorted(left), checkpoint.name


def test_load_from_checkpoint_under_weights_only(smoke_cfg, tmp_path: Path) -> None:
    train(smoke_cfg())
    path = tmp_path / "run" / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(path, weights_only=True)  # plain types only: no DictConfig, no pickled objects
    assert isinstance(checkpoint["hyper_parameters"]["llm"], dict)
    model = JointModule.load_from_checkpoint(path, map_location="cpu")
    assert model.model.weights == {"diffusion": 1.0, "caption": 1.0, "contrastive": 0.1}
    state = checkpoint["state_dict"]
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, state[name])
    images = model.model.generate(["a red circle"], steps=2, guidance_scale=2.0)
    assert images.shape == (1, 3, 32, 32)
    assert "EMA" in checkpoint["callbacks"]


def run_script(tmp_path: Path, root: Path, *overrides: str) -> subprocess.CompletedProcess:
    return run_entry_point("train.py", root, tmp_path / "run", "experiment=smoke", *overrides)


def test_train_script_on_user_shards(smoke_root: Path, tmp_path: Path) -> None:
    for n in range(2):
        write_tar(tmp_path / "mine" / f"{n}.tar", good_members(f"s{n}-", 12))
    urls = str(tmp_path / "mine" / "{0..1}.tar")
    done = run_script(
        tmp_path,
        smoke_root,
        "data=webdataset",
        "~data.shapes",  # the smoke experiment sizes the shapes set; these shards are ours
        f"data.train_urls='{urls}'",
        f"data.val_urls={tmp_path / 'mine' / '0.tar'}",
        "data.num_workers=0",
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()


def test_evaluate_reports_a_checkpoints_validation_losses(smoke_cfg, smoke_root: Path, tmp_path: Path) -> None:
    train(smoke_cfg())
    checkpoint = tmp_path / "run" / "checkpoints" / "last.ckpt"
    done = run_entry_point(
        "evaluate.py",
        smoke_root,
        tmp_path / "eval",
        f"ckpt_path={checkpoint}",
        "data.shapes.num_train=256",
        "data.shapes.num_val=16",
        "data.num_workers=0",
        "eval.num_samples=4",
        "eval.steps=2",
        "eval.fid.feature=null",
        "eval.probe=false",
    )
    assert done.returncode == 0, done.stderr[-4000:]
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())["metrics"]
    assert {"val/loss", "val/diffusion_loss", "val/caption_loss", "val/contrastive_loss"} <= set(metrics)
    assert not {"fd_probe", "probe_attr/mean"} & set(metrics)  # switched off: not computed


def test_the_autoencoder_stage_alone_retrains_and_saves_a_diffusers_vae(smoke_cfg) -> None:
    cfg = smoke_cfg("stage=autoencoder")
    metrics = train(cfg)
    assert metrics["autoencoder/val_rec_loss"] > 0
    recorded = OmegaConf.load(Path(cfg.paths.output_dir) / "config.yaml")  # where the run put it
    vae = AutoencoderKL.from_pretrained(recorded.model.vae.name_or_path)
    assert vae.config.scaling_factor != 0.18215  # measured on the data, not the SD default
    assert vae.config.block_out_channels == [16, 32]
