"""Slurm through the Hydra submitit launcher, on a real one-node cluster started on localhost (tests marked
`slurm`; `make test-slurm`), and the launcher config's agreement with the trainer (always)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from capdiff.config import KILL_BAD_EXIT
from capdiff.slurm import Requeue, failing_the_step, requeue_signal
from tests.helpers import REPO, ScalarModule
from tests.slurm_cluster import LocalSlurm


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["trainer=ddp", "trainer.devices=8", "trainer.num_nodes=2"], (8, 2, 8)),
        (["trainer=ddp_cpu", "trainer.devices=2"], (2, 1, None)),
        (["trainer=gpu"], (1, 1, 1)),
    ],
)
def test_the_slurm_launcher_asks_for_what_the_trainer_uses(tmp_path: Path, overrides, expected) -> None:
    from hydra import compose, initialize_config_dir

    from capdiff.config import register_resolvers

    register_resolvers()  # as train.py does before Hydra composes
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=slurm", *overrides], return_hydra_config=True)
    launcher = cfg.hydra.launcher  # its keys resolve against the whole config, as when Hydra submits
    assert (launcher.tasks_per_node, launcher.nodes, launcher.gpus_per_node) == expected
    assert launcher.tasks_per_node == cfg.trainer.devices and launcher.nodes == cfg.trainer.num_nodes
    assert launcher._target_.endswith("SlurmLauncher")


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [([], 600), (["+slurm.timeout_min=10"], 60), (["+slurm.timeout_min=240", "+slurm.signal_delay_s=900"], 900)],
)
def test_the_pre_timeout_signal_comes_early_enough_and_never_at_the_start(overrides, expected) -> None:
    """600 s before a long job's limit (a step and an SD-size checkpoint write must fit), a tenth of a short one's;
    a delay as long as the limit would signal the job as it starts, and requeue it for ever: refused."""
    from hydra import compose, initialize_config_dir
    from omegaconf.errors import InterpolationResolutionError

    from capdiff.config import register_resolvers

    register_resolvers()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=slurm", *overrides], return_hydra_config=True)
        assert cfg.hydra.launcher.signal_delay_s == expected
        bad = compose("train", overrides=["hydra/launcher=slurm", "+slurm.timeout_min=10", "+slurm.signal_delay_s=600"],
                      return_hydra_config=True)  # fmt: skip
    with pytest.raises(InterpolationResolutionError, match=r"slurm.signal_delay_s=600 is not shorter than the job"):
        _ = bad.hydra.launcher.signal_delay_s


def test_a_job_script_makes_srun_stop_the_other_ranks_when_one_fails_then_runs_the_users_lines() -> None:
    from hydra import compose, initialize_config_dir

    from capdiff.config import register_resolvers

    register_resolvers()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        plain = compose("train", overrides=["hydra/launcher=slurm"], return_hydra_config=True)
        setup = "+slurm.setup=[module load cuda,source .venv/bin/activate]"
        given = compose("train", overrides=["hydra/launcher=slurm", setup], return_hydra_config=True)
    assert list(plain.hydra.launcher.setup) == [KILL_BAD_EXIT]
    assert list(given.hydra.launcher.setup) == [KILL_BAD_EXIT, "module load cuda", "source .venv/bin/activate"]


def test_an_error_in_one_task_of_a_several_task_job_ends_that_task_with_status_1(monkeypatch) -> None:
    monkeypatch.setenv("SLURM_NTASKS", "2")
    with pytest.raises(SystemExit) as stopped, failing_the_step():
        raise RuntimeError("rank 1 breaks")
    assert stopped.value.code == 1
    monkeypatch.setenv("SLURM_NTASKS", "1")  # one task: the error reaches Hydra as it is
    with pytest.raises(RuntimeError, match="rank 1 breaks"), failing_the_step():
        raise RuntimeError("rank 1 breaks")
    monkeypatch.delenv("SLURM_NTASKS")
    with pytest.raises(RuntimeError, match="rank 1 breaks"), failing_the_step():
        raise RuntimeError("rank 1 breaks")


def launch(slurm: LocalSlurm, root: Path, sweep: Path, *overrides: str) -> subprocess.Popen:
    env = os.environ | slurm.env | {"CAPDIFF_ROOT": str(root)}
    command = [
        sys.executable, "train.py", "-m", "hydra/launcher=slurm", f"hydra.sweep.dir={sweep}",
        "hydra.launcher.cpus_per_task=1", "hydra.launcher.timeout_min=10", "extras.print_config=false",
        "experiment=smoke", "callbacks.periodic_eval.every_n_steps=0", "data.num_workers=0", *overrides,
    ]  # fmt: skip
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def job_folders(sweep: Path) -> list[Path]:
    """submitit's per-job folders (named by the job id). Before they exist, `.submitit/` already holds the
    pickled job and the submission script under temporary names, so a non-empty folder is not yet a job."""
    submitit = sweep / ".submitit"
    return [p for p in submitit.iterdir() if p.is_dir()] if submitit.is_dir() else []


def job_log(sweep: Path) -> Path:
    (folder,) = job_folders(sweep)
    return folder / f"{folder.name}_0_log.out"


@pytest.mark.slurm
def test_a_two_task_ddp_job_submitted_through_the_hydra_launcher_trains_on_both_ranks(
    slurm: LocalSlurm, smoke_root: Path, tmp_path: Path
) -> None:
    sweep = tmp_path / "sweep"
    process = launch(slurm, smoke_root, sweep, "trainer=ddp_cpu", "trainer.devices=2")
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output[-3000:]
    # 32 samples per epoch over 2 ranks × batch 8: 2 steps (one process would take 4)
    assert torch.load(sweep / "0" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2
    logs = job_log(sweep).parent
    for rank in (0, 1):
        text = (logs / f"{logs.name}_{rank}_log.out").read_text()
        assert f"GLOBAL_RANK: {rank}, MEMBER: {rank + 1}/2" in text
        assert "Job completed successfully" in text


@pytest.mark.slurm
def test_the_pre_timeout_signal_checkpoints_requeues_and_the_job_resumes_from_that_step(
    slurm: LocalSlurm, smoke_root: Path, tmp_path: Path
) -> None:
    sweep = tmp_path / "sweep"
    process = launch(slurm, smoke_root, sweep, "trainer.max_epochs=30", "callbacks.sample_grid=null")
    started = time.monotonic()
    while not job_folders(sweep):
        assert process.poll() is None and time.monotonic() - started < 120, "the job was not submitted"
        time.sleep(0.5)
    log = job_log(sweep)
    job = log.parent.name
    while not (log.is_file() and "saves a checkpoint and requeues" in log.read_text()):
        assert process.poll() is None and time.monotonic() - started < 300, "training did not start"
        time.sleep(0.5)
    time.sleep(2)  # a few steps in
    assert slurm.run("scancel", "--signal=USR2", job).returncode == 0  # what Slurm sends before the limit
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output[-3000:]

    saved = sweep / "0" / "checkpoints" / "requeue.ckpt"  # one file, however often requeued
    step = torch.load(saved, weights_only=True)["global_step"]
    assert 0 < step < 120
    states = slurm.run("sacct", "-D", "-X", "-n", "-j", job, "-o", "State").stdout.split()
    assert states[0] == "REQUEUED"
    assert f"Restored all states from the checkpoint at {saved}" in log.read_text()
    final = torch.load(sweep / "0" / "checkpoints" / "last.ckpt", weights_only=True)
    # It went on from that step (mid-epoch: the resumed epoch trains only the batches it had left) and
    # finished all 30 epochs of 4 steps.
    assert final["epoch"] == 29 and final["global_step"] == 120


@pytest.mark.slurm
def test_when_one_rank_of_a_job_fails_the_job_stops_and_fails_instead_of_waiting_for_it(
    slurm: LocalSlurm, smoke_root: Path, tmp_path: Path
) -> None:
    sweep = tmp_path / "sweep"
    process = launch(slurm, smoke_root, sweep, "trainer=ddp_cpu", "trainer.devices=2",
                     "+callbacks.fail._target_=tests.recording.FailOnRank", "+callbacks.fail.rank=1")  # fmt: skip
    output, _ = process.communicate(timeout=300)  # rank 0 waits for rank 1 in a collective until srun stops it
    assert process.returncode != 0, output[-3000:]
    logs = job_log(sweep).parent
    job = logs.name
    assert (
        "rank 1 of this Slurm job failed"
        in (logs / f"{job}_1_log.err").read_text() + (logs / f"{job}_1_log.out").read_text()
    )
    states = slurm.run("sacct", "-X", "-n", "-j", job, "-o", "State").stdout.split()
    assert states and states[0] == "FAILED"


class _Big(ScalarModule):
    """A model whose checkpoint takes a while to write (~200 MB)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("ballast", torch.zeros(50_000_000))


class _SignalAt(pl.Callback):
    """Sends the pre-timeout signal to this process at a micro-batch in the middle of an accumulated step."""

    def __init__(self, batch: int) -> None:
        self.batch = batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.fit_loop.total_batch_idx == self.batch:
            os.kill(os.getpid(), requeue_signal())


def test_a_requeue_checkpoints_on_an_accumulation_boundary_into_one_file(tmp_path: Path, monkeypatch) -> None:
    """Signalled twice (the second time in the requeued job), the run leaves one requeue checkpoint, each time
    written after an optimizer step, never between the micro-batches of one; the requeued job resumes from it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "scontrol.log"}\n')
    (bin_dir / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    data = torch.utils.data.DataLoader(torch.randn(64, 2), batch_size=2)  # 32 micro-batches, 8 steps an epoch
    saved = tmp_path / "checkpoints" / "requeue.ckpt"

    def run(signal_at: int, ckpt_path=None) -> dict:
        callbacks = [Requeue(wait_s=0.1), _SignalAt(signal_at)]
        trainer = pl.Trainer(accelerator="cpu", max_epochs=3, accumulate_grad_batches=4, logger=False,
                             enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                             default_root_dir=tmp_path, callbacks=callbacks)  # fmt: skip
        with pytest.raises(RuntimeError, match="requeued but Slurm did not stop it"):
            trainer.fit(_Big(), data, ckpt_path=ckpt_path)
        checkpoint = torch.load(saved, weights_only=True)
        progress = checkpoint["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]["processed"]
        return {"step": checkpoint["global_step"], "batches": progress}

    first = run(signal_at=5)  # the 2nd micro-batch of step 2: the checkpoint comes after step 2's 4th
    assert first == {"step": 2, "batches": 8}
    second = run(signal_at=13, ckpt_path=saved)  # resumed at batch 8, signalled mid step 4
    assert second == {"step": 4, "batches": 16}
    assert [p.name for p in saved.parent.iterdir()] == ["requeue.ckpt"]  # one file, no temporary left
    assert (tmp_path / "scontrol.log").read_text().split("\n")[:2] == ["requeue 4242", "requeue 4242"]
