"""Two CPU processes (gloo) train as one process over the global batch would, except where randomness must
differ per rank: noise, timesteps, posterior draws and caption-dropout masks differ across ranks, the data
order does not change, each rank is reproducible; EMA updates once per optimizer step under gradient
accumulation and not for a step skipped for a non-finite loss on one rank; cached latents are encoded by both
ranks; channels_last is applied before DDP wraps the model; W&B logs one run, from rank 0."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from capdiff.train import build_datamodule, train
from tests.helpers import run_entry_point
from tests.recording import RecordSteps

# smoke data: 32 samples an epoch, batch 8 per rank: 2 micro-batches per rank and epoch, one optimizer step
# (accumulate_grad_batches=2); 3 epochs. Rank 1's micro-batch 2 (the first of epoch 1) is non-finite.
SETTINGS = [
    "trainer.accumulate_grad_batches=2",
    "trainer.max_epochs=3",
    "+trainer.limit_val_batches=0",
    "data.num_workers=1",
    "data.latents=true",
    "model.caption_dropout=0.5",
    "model.speed.channels_last=true",
    "callbacks.model_checkpoint.monitor=null",
    "callbacks.sample_grid=null",
    "callbacks.periodic_eval=null",
    "logger=many",  # the CSV logger and W&B (offline), as a cluster run logs
]


@pytest.fixture(scope="module")
def ddp_run(smoke_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict, str, Path]:
    tmp = tmp_path_factory.mktemp("ddp")
    record = [
        "+callbacks.record._target_=tests.recording.RecordSteps",
        f"+callbacks.record.out={tmp / 'record'}",
        "+callbacks.record.poison=[1,2]",
    ]
    overrides = ["experiment=smoke", "trainer=ddp_cpu", "trainer.devices=2", *SETTINGS, *record]
    done = run_entry_point("train.py", smoke_root, tmp / "run", *overrides, f"data.latents_dir={tmp / 'latents'}")
    assert done.returncode == 0, done.stderr[-4000:]
    ranks = [torch.load(tmp / "record" / f"rank{r}.pt", weights_only=False) for r in range(2)]
    return ranks[0], ranks[1], done.stderr + done.stdout, tmp


def test_random_draws_differ_across_ranks_and_each_rank_is_reproducible(ddp_run, smoke_cfg, tmp_path) -> None:
    rank0, rank1, _, tmp = ddp_run
    first0, first1 = rank0["records"][0], rank1["records"][0]
    for draw in ("noise", "timesteps", "posterior_noise", "dropped"):
        assert not torch.equal(first0[draw], first1[draw]), draw
    # one process with the same seed and per-process batch draws what rank 0 drew (the data differs: it reads
    # the whole dataset); after its second micro-batch the epochs' boundaries fall elsewhere
    single = RecordSteps(str(tmp_path / "single"))
    train(smoke_cfg(*SETTINGS[1:], f"data.latents_dir={tmp / 'latents'}"), extra_callbacks=[single])
    for step in range(2):
        for draw in ("noise", "timesteps", "posterior_noise", "dropped"):
            assert torch.equal(single.records[step][draw], rank0["records"][step][draw]), (step, draw)


def test_the_data_order_is_the_streams_own(ddp_run, smoke_cfg) -> None:
    rank0, rank1 = ddp_run[:2]
    for rank, recorded in ((0, rank0), (1, rank1)):
        datamodule = build_datamodule(smoke_cfg("data.num_workers=1"))
        datamodule.setup_streams(rank, 2)
        planned = [batch["keys"] for batch in datamodule.train_dataloader()]
        assert [r["keys"] for r in recorded["records"][:2]] == planned
    keys0 = {k for r in rank0["records"][:2] for k in r["keys"]}
    assert not keys0 & {k for r in rank1["records"][:2] for k in r["keys"]}  # each rank its own samples


def test_ema_updates_once_per_optimizer_step_and_not_for_a_skipped_one(ddp_run) -> None:
    for recorded in ddp_run[:2]:
        steps = [r["global_step"] for r in recorded["records"]]
        assert steps == [0, 1, 1, 2, 2, 3]  # 6 micro-batches, 3 optimizer steps
        assert [r["ema_updates"] for r in recorded["records"]] == [0, 1, 1, 1, 1, 2]  # step 2 skipped
        weights = recorded["weights"]
        for name, value in weights[1].items():  # the skipped step changed no weight, on either rank
            assert torch.equal(weights[2][name], value), name
        expected = {n: t.clone() for n, t in weights[0].items()}
        for update, step in enumerate((1, 3), start=1):
            decay = min(0.999, (1 + update) / (10 + update))
            for name in expected:
                expected[name].lerp_(weights[step][name], 1 - decay)
        for name, value in recorded["ema"].items():
            torch.testing.assert_close(value, expected[name])
    rank0, rank1 = ddp_run[:2]
    for name, value in rank0["ema"].items():
        assert torch.equal(value, rank1["ema"][name])  # the ranks' averages stay identical


def test_latents_are_cached_by_both_ranks_and_channels_last_comes_before_ddp(ddp_run) -> None:
    rank0, rank1, output, tmp = ddp_run
    assert "(rank 0 of 2)" in output and "(rank 1 of 2)" in output
    assert sorted(p.name for p in (tmp / "latents").glob("*.tar")) == sorted(
        [f"train-{i:06d}.tar" for i in range(8)] + [f"val-{i:06d}.tar" for i in range(2)]
    )
    assert rank0["unet_channels_last"] and rank1["unet_channels_last"]
    assert "Grad strides do not match bucket view strides" not in output


def test_two_processes_train_one_run_and_count_only_the_applied_optimizer_steps(ddp_run) -> None:
    output = ddp_run[2]
    assert "distributed_backend=gloo" in output and "MEMBER: 2/2" in output
    checkpoint = torch.load(ddp_run[3] / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 3  # 32 samples an epoch over 2 ranks × 8, 2 micro-batches a step
    assert {float(s["step"]) for s in checkpoint["optimizer_states"][0]["state"].values()} == {2.0}


def test_rank_zero_logs_the_one_wandb_run_with_the_whole_config(ddp_run) -> None:
    from tests.test_wandb import summarize

    runs = list((ddp_run[3] / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1  # rank 1 starts none
    logged = summarize(next(runs[0].glob("run-*.wandb")))
    assert {"trainer", "model", "data"} <= logged["config"], logged["config"]
