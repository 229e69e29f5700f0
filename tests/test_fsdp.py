"""FSDP through train.py on 2 CPU processes over gloo (tests/fsdp_cpu.py stands in for the GPU strategy): fit
with sample grids, periodic evaluation and validation on, the ranks' validation shares of different sizes;
the weight-decay groups those of a run without FSDP.

On the CPU, Lightning's FSDP precision plugin turns autocast off, so these runs are fp32 (`bf16-mixed`, the
GPU default, needs a GPU: bench/gpu_check.sh)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from tests.helpers import REPO, run_entry_point
from tests.recording import OptimizerGroups
from tests.test_cli import capdiff

FSDP = [
    "trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true",
    "trainer.strategy._target_=tests.fsdp_cpu.fsdp",
]  # fmt: skip


@pytest.fixture(scope="module")
def fsdp_run(smoke_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("fsdp")
    # 5 validation samples in 2 shards, dealt to the ranks 2 and 3: rank 1 has one batch more
    done = run_entry_point(
        "train.py", smoke_root, tmp / "run", "experiment=smoke", *FSDP, "trainer.max_epochs=2",
        f"paths.data_dir={tmp / 'data'}", "data.shapes.num_val=5", "data.val_batch_size=1",
        "callbacks.periodic_eval.every_n_steps=2",
        "+callbacks.groups._target_=tests.recording.OptimizerGroups", f"+callbacks.groups.out={tmp / 'groups'}",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-5000:]
    return tmp


@pytest.mark.slow
def test_fsdp_trains_with_sample_grids_periodic_evaluation_and_uneven_validation(fsdp_run: Path) -> None:
    run = fsdp_run / "run"
    samples = {p.name for p in (run / "samples").iterdir()}
    assert {"generated_epoch000.png", "captions_epoch001.png", "generated_final.png"} <= samples
    assert "val/loss" in json.loads((run / "metrics.json").read_text())
    (logged,) = (run / "csv").glob("version_*/metrics.csv")
    columns = logged.read_text().splitlines()[0].split(",")
    assert {"val/loss", "peval/caption_attr/mean", "peval/probe_attr/mean"} <= set(columns)
    assert (run / "checkpoints" / "last.ckpt").is_dir()  # sharded: a folder of each rank's shards


@pytest.mark.slow
def test_fsdp_weight_decay_groups_are_those_of_a_run_without_it(fsdp_run: Path, smoke_cfg, tmp_path: Path) -> None:
    from capdiff.train import train

    train(smoke_cfg("trainer.max_steps=1", "callbacks.periodic_eval=null", "callbacks.sample_grid=null"),
          extra_callbacks=[OptimizerGroups(str(tmp_path / "plain"))])  # fmt: skip
    plain = torch.load(tmp_path / "plain" / "rank0.pt")
    assert plain["unet"][0] > 0 and plain["unet_no_decay"][0] == 0  # matrices decay, biases and norms do not
    for rank in (0, 1):
        assert torch.load(fsdp_run / "groups" / f"rank{rank}.pt") == plain


class _EMAAtStart(pl.Callback):
    """Rank 0 saves the whole EMA average as the resumed run has it at its start (gathered from the ranks)."""

    def __init__(self, out: str) -> None:
        self.out = Path(out)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from capdiff.training.ema import find_ema

        state = find_ema(trainer).state_dict()  # every rank: gathering is a collective
        if trainer.is_global_zero:
            torch.save(state, self.out)


@pytest.mark.slow
def test_a_sharded_checkpoint_resumes_with_each_rank_its_ema_shard_and_serves_evaluation_pipeline_and_export(
    fsdp_run: Path, smoke_root: Path, tmp_path: Path
) -> None:
    from capdiff.checkpoints.portable import ema_shadow, ema_state, read_checkpoint
    from capdiff.pipeline import Pipeline

    last = fsdp_run / "run" / "checkpoints" / "last.ckpt"
    saved = read_checkpoint(last)  # consolidated in memory
    shadow = ema_shadow(saved)
    assert saved["global_step"] == 4 and shadow
    assert not any("_fsdp_wrapped_module" in name for name in shadow)  # named as without FSDP
    assert shadow.keys() <= {k.removeprefix("model.") for k in saved["state_dict"]}
    assert {v.shape for k, v in shadow.items() if k.endswith("to_q.weight")} == {torch.Size([32, 32])}  # whole

    # resumed on 2 ranks: each rank gets its shard of the saved average back, and goes on training
    run = fsdp_run / "resumed"
    shutil.copytree(fsdp_run / "run", run)
    done = run_entry_point(
        "train.py", smoke_root, run, "experiment=smoke", *FSDP, "trainer.max_epochs=3", "ckpt_path=last",
        f"paths.data_dir={fsdp_run / 'data'}", "data.shapes.num_val=5", "data.val_batch_size=1",
        "callbacks.periodic_eval.every_n_steps=2",
        "+callbacks.ema_at_start._target_=tests.test_fsdp._EMAAtStart",
        f"+callbacks.ema_at_start.out={tmp_path / 'ema.pt'}",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-5000:]
    at_start = torch.load(tmp_path / "ema.pt")
    assert at_start["updates"] == ema_state(saved)["updates"]
    assert at_start["shadow"].keys() == shadow.keys()
    assert all(torch.equal(at_start["shadow"][k], shadow[k]) for k in shadow)
    resumed = read_checkpoint(run / "checkpoints" / "last.ckpt")
    assert resumed["global_step"] == 6 and ema_state(resumed)["updates"] == ema_state(saved)["updates"] + 2

    # evaluate.py, the Pipeline and export read the sharded checkpoint as they read a file
    out = tmp_path / "eval"
    done = run_entry_point("evaluate.py", smoke_root, out, f"ckpt_path={last}", "eval.num_samples=4", "eval.steps=2")
    assert done.returncode == 0, done.stderr[-5000:]
    assert "val/loss" in json.loads((out / "metrics.json").read_text())["metrics"]
    pipe = Pipeline.from_checkpoint(last)
    assert len(pipe.generate(["a red circle"], steps=2)) == 1
    command = capdiff("generate", "--ckpt", last, "a red circle", "--steps", "2", "--out", tmp_path / "gen")
    made = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert made.returncode == 0 and Path(made.stdout.split()[-1]).is_file(), made.stderr[-3000:]
    exported = tmp_path / "export"
    done = subprocess.run([sys.executable, "-m", "capdiff.export", str(last), str(exported)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert Pipeline.from_pretrained(exported).caption(pipe.generate(["a red circle"], steps=2))
