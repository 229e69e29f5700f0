"""Faults a long run meets: non-finite losses, SIGKILL at any moment, resuming, starting from other weights."""

from __future__ import annotations

import io
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf

from capdiff.train import resolve_ckpt_path, train
from tests.helpers import REPO


class Poison(pl.Callback):
    """Makes the loss NaN at the given batch indices of the first epoch."""

    def __init__(self, batches: set[int]) -> None:
        self.batches = batches

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        losses = pl_module.model.losses

        def poisoned(batch: dict, stage: str, batch_idx: int = 0, **kwargs) -> dict:
            out = losses(batch, stage, batch_idx, **kwargs)
            if stage == "train" and trainer.current_epoch == 0 and batch_idx in self.batches:
                out["diffusion_loss"] = out["diffusion_loss"] * float("nan")
                out["loss"] = out["loss"] * float("nan")
            return out

        pl_module.model.losses = poisoned


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_a_nonfinite_loss_skips_its_step_and_training_goes_on(smoke_cfg, tmp_path: Path, precision: str) -> None:
    overrides = ["callbacks.nonfinite.max_skips=2", f"trainer.precision={precision}"]
    metrics = train(smoke_cfg(*overrides), extra_callbacks=[Poison({1, 2})])
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    # 4 batches, 2 skipped: the loop's step counter advances, but no weight saw an update for them
    assert checkpoint["global_step"] == 4
    assert {float(s["step"]) for s in checkpoint["optimizer_states"][0]["state"].values()} == {2.0}
    assert all(torch.isfinite(v).all() for v in checkpoint["state_dict"].values() if v.is_floating_point())
    assert torch.isfinite(torch.tensor(metrics["val/loss"]))


def test_a_nonfinite_step_is_skipped_under_a_loss_scaler(smoke_cfg) -> None:
    """16-mixed's GradScaler (on CPU Lightning turns 16-mixed into bf16, so the plugin is given here): a step
    whose gradients were dropped must reach it as 'nothing to step', or it fails on gradients it never saw."""
    from pytorch_lightning.plugins.precision import MixedPrecision

    from capdiff.train import build_datamodule, build_model
    from capdiff.training.nonfinite import NonFiniteGuard

    cfg = smoke_cfg()
    datamodule = build_datamodule(cfg)
    model = build_model(cfg, datamodule)
    scaled = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=1, plugins=[scaled], gradient_clip_val=1.0, logger=False,
        enable_checkpointing=False, callbacks=[Poison({1, 2}), guard := NonFiniteGuard(max_skips=2)],
        limit_val_batches=0, enable_progress_bar=False,
    )  # fmt: skip
    trainer.fit(model, datamodule=datamodule)
    assert trainer.global_step == 4 and guard.skipped == 2


def test_too_many_nonfinite_losses_stop_the_run_with_a_checkpoint(smoke_cfg, tmp_path: Path) -> None:
    with pytest.raises(FloatingPointError, match=r"callbacks.nonfinite.max_skips=1.*nonfinite-step000002.ckpt"):
        train(smoke_cfg("callbacks.nonfinite.max_skips=1"), extra_callbacks=[Poison({1, 2})])
    saved = torch.load(tmp_path / "run" / "checkpoints" / "nonfinite-step000002.ckpt", weights_only=True)
    # batch 0 trained, batch 1 skipped, batch 2 the one too many; saved after it, so a resume goes on with batch 3
    assert saved["global_step"] == 3
    assert {float(s["step"]) for s in saved["optimizer_states"][0]["state"].values()} == {1.0}
    assert all(torch.isfinite(v).all() for v in saved["state_dict"].values() if v.is_floating_point())


def test_ckpt_path_last_and_auto_find_the_newest_checkpoint(tmp_path: Path, monkeypatch) -> None:
    folder = tmp_path / "checkpoints"
    assert resolve_ckpt_path("auto", str(tmp_path)) is None  # nothing yet: a fresh start
    with pytest.raises(FileNotFoundError, match="`auto` starts fresh"):
        resolve_ckpt_path("last", str(tmp_path))
    folder.mkdir()
    older, newer = folder / "last.ckpt", folder / "epoch000-step000900.ckpt"
    older.write_bytes(b"a")
    newer.write_bytes(b"b")
    os.utime(older, ns=(1_000_000_000, 1_000_000_000))
    assert resolve_ckpt_path("last", str(tmp_path)) == str(newer)
    assert resolve_ckpt_path(str(tmp_path), "/elsewhere") == str(newer)  # a run folder
    assert resolve_ckpt_path(None, str(tmp_path)) is None
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # a requeued Slurm job resumes by itself
    assert resolve_ckpt_path(None, str(tmp_path)) == str(newer)


def test_init_from_loads_weights_into_a_fresh_run(smoke_cfg, tmp_path: Path) -> None:
    train(smoke_cfg())
    source = tmp_path / "first.ckpt"
    (tmp_path / "run" / "checkpoints" / "last.ckpt").rename(source)
    weights = torch.load(source, weights_only=True)["state_dict"]

    class Captured(pl.Callback):
        def on_train_start(self, trainer, pl_module) -> None:
            self.step = trainer.global_step
            self.state = {k: v.clone() for k, v in pl_module.state_dict().items()}

    captured = Captured()
    train(smoke_cfg(f"init_from={source}"), extra_callbacks=[captured])
    assert captured.step == 0
    for name, value in weights.items():
        torch.testing.assert_close(captured.state[name], value)
    # the tokenizer the weights were trained with comes along (other data would build another one)
    used = OmegaConf.load(tmp_path / "run" / "config.yaml")
    assert Path(used.model.llm.tokenizer) == tmp_path / "run" / "parts" / "tokenizer"

    with pytest.raises(FileNotFoundError, match=r"init_from='.*missing.ckpt': no such checkpoint file"):
        train(smoke_cfg(f"init_from={tmp_path / 'missing.ckpt'}"))

    with pytest.raises(ValueError, match="init_from and ckpt_path are both set"):
        train(smoke_cfg(f"init_from={source}", f"ckpt_path={source}"))
    with pytest.raises(ValueError, match=r"does not match this model .*config.yaml"):
        train(smoke_cfg(f"init_from={source}", "model.conditioner.width=48"))


def checkpoints_load(folder: Path) -> list[int]:
    """Every checkpoint in the (quiet) folder loads completely; returns their steps."""
    steps = []
    for path in sorted(folder.glob("*.ckpt")):
        steps.append(torch.load(path, weights_only=True, map_location="cpu")["global_step"])
    return steps


def newest_step(folder: Path) -> int:
    """While training runs: the step of `last.ckpt` (-1 before the first), read from a private copy, since the
    trainer replaces and deletes checkpoints meanwhile."""
    try:
        data = (folder / "last.ckpt").read_bytes()
    except FileNotFoundError:
        return -1
    return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")["global_step"]


@pytest.mark.slow  # about 90 s: `make test-slow`, run by CI
def test_sigkill_at_random_moments_never_leaves_a_broken_checkpoint_and_the_run_resumes(
    smoke_root: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    folder = run / "checkpoints"
    command = [
        sys.executable, "train.py", f"hydra.run.dir={run}", "extras.print_config=false", "experiment=smoke",
        "trainer.max_epochs=25", "callbacks.model_checkpoint.every_n_train_steps=1",
        "callbacks.model_checkpoint.monitor=null", "callbacks.periodic_eval.every_n_steps=0",
        "callbacks.sample_grid=null", "logger=csv", "ckpt_path=auto",
    ]  # fmt: skip
    env = os.environ | {"CAPDIFF_ROOT": str(smoke_root)}
    rng = random.Random(0)
    reached = 0
    log = tmp_path / "stderr.log"
    for _ in range(3):
        with log.open("w") as sink:
            process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=sink)
        deadline = time.monotonic() + 180
        while newest_step(folder) <= reached:
            assert process.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "no new checkpoint within 3 minutes"
            time.sleep(0.2)
        time.sleep(rng.uniform(0.0, 1.5))  # somewhere in a step, or in a checkpoint write
        process.send_signal(signal.SIGKILL)
        process.wait()
        steps = checkpoints_load(folder)  # raises if any checkpoint were half-written
        assert max(steps) > reached  # each restart resumed and went further
        reached = max(steps)
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"Restoring states from the checkpoint path at {folder}" in done.stderr + done.stdout
    # A mid-epoch resume trains only the batches that epoch had left, so the run ends at the planned step.
    final = torch.load(folder / "last.ckpt", weights_only=True)
    assert final["epoch"] == 24 and final["global_step"] == 25 * 4
