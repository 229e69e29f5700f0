"""FSDP through train.py on 2 CPU processes over gloo (tests/fsdp_cpu.py stands in for the GPU strategy): fit
with sample grids, periodic evaluation and validation on, the ranks' validation shares of different sizes;
the weight-decay groups those of a run without FSDP.

On the CPU, Lightning's FSDP precision plugin turns autocast off, so these runs are fp32 (`bf16-mixed`, the
GPU default, needs a GPU: bench/gpu_check.sh)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.helpers import run_entry_point
from tests.recording import OptimizerGroups

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
