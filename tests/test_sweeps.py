"""Sweeps as users run them: a grid with `-m`, an Optuna search, and the DDP-under-local-multirun refusal."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import yaml

from tests.helpers import REPO
from tests.test_wandb import summarize


def multirun(root: Path, sweep_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = os.environ | {"CAPDIFF_ROOT": str(root)}
    command = [
        sys.executable, "train.py", "-m", f"hydra.sweep.dir={sweep_dir}", "extras.print_config=false",
        "experiment=smoke", "callbacks.periodic_eval.every_n_steps=0", *overrides,
    ]  # fmt: skip
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow  # `make test-slow`, run by CI
def test_a_grid_sweep_gives_each_point_its_own_run_folder_and_wandb_run_in_one_group(
    smoke_root: Path, tmp_path: Path
) -> None:
    sweep = tmp_path / "sweep"
    done = multirun(smoke_root, sweep, "model.caption_dropout=0.0,0.2", "logger=wandb")
    assert done.returncode == 0, done.stderr[-3000:]
    groups, ids, names = set(), set(), set()
    for job, dropout in (("0", 0.0), ("1", 0.2)):
        folder = sweep / job
        assert torch.load(folder / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4
        assert yaml.safe_load((folder / "config.yaml").read_text())["model"]["caption_dropout"] == dropout
        (record,) = (folder / "wandb").glob("offline-run-*/run-*.wandb")
        run = summarize(record)["run"]
        groups.add(run.run_group)
        ids.add(run.run_id)
        names.add(run.display_name)
    assert groups == {f"smoke-{sweep.name}"} and len(ids) == 2
    assert names == {"model.caption_dropout=0.0", "model.caption_dropout=0.2"}  # the swept override, by job


@pytest.mark.slow
def test_an_optuna_search_runs_its_trials_and_reports_the_best(smoke_root: Path, tmp_path: Path) -> None:
    sweep = tmp_path / "optuna"
    done = multirun(
        smoke_root, sweep, "hparams_search=joint_optuna", "hydra.sweeper.n_trials=2",
        "hydra.sweeper.sampler.n_startup_trials=1",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert set(results["best_params"]) == {
        "model.optim.lr", "model.optim.groups.unet.lr_scale", "model.loss.weights.contrastive", "model.caption_dropout",
    }  # fmt: skip
    values = []
    for job in ("0", "1"):
        metrics = yaml.safe_load((sweep / job / "metrics.json").read_text())
        values.append(metrics["val/loss"])
    assert results["best_value"] == min(values)


def test_ddp_under_a_local_multirun_is_refused_with_what_to_use_instead(smoke_root: Path, tmp_path: Path) -> None:
    done = multirun(smoke_root, tmp_path / "sweep", "trainer=ddp_cpu", "model.caption_dropout=0.0,0.2")
    assert done.returncode != 0
    assert "would each re-run the whole sweep" in done.stderr and "hydra/launcher=slurm" in done.stderr
    assert not list((tmp_path / "sweep").glob("*/checkpoints"))


class _Validations(pl.Callback):
    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.steps.append(trainer.global_step)


def test_a_trial_that_stops_mid_epoch_returns_the_metric_of_its_final_weights(smoke_cfg) -> None:
    """4 steps an epoch, stopped at step 6 by trainer.max_steps: validated at the epoch's end (4) and, for the
    sweeper, once more at 6, whose val/loss is the one returned."""
    from capdiff.train import sweep_value, train

    seen = _Validations()
    cfg = smoke_cfg("optimized_metric=val/loss", "trainer.max_steps=6", "trainer.max_epochs=5",
                    "callbacks.periodic_eval=null", "callbacks.sample_grid=null")  # fmt: skip
    metrics = train(cfg, extra_callbacks=[seen])
    assert seen.steps == [4, 6]
    assert sweep_value(cfg, metrics) == metrics["val/loss"]
    assert "train/loss" in metrics  # the run's own metrics are kept beside the final validation's
    # without a metric to return, a run is not validated again
    again = _Validations()
    train(smoke_cfg("trainer.max_steps=6", "trainer.max_epochs=5", "callbacks.periodic_eval=null",
                    "callbacks.sample_grid=null"), extra_callbacks=[again])  # fmt: skip
    assert again.steps == [4]
