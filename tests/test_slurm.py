"""Slurm through the Hydra submitit launcher, on a real one-node cluster started on localhost (tests marked
`slurm`; `make test-slurm`), and the launcher config's agreement with the trainer (always)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO, skip_or_fail
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


@pytest.fixture(scope="session")
def slurm(tmp_path_factory: pytest.TempPathFactory):
    """A one-node Slurm cluster for this test session, stopped (by PID) at its end."""
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
    except RuntimeError as err:
        skip_or_fail(f"Slurm cannot start here: {str(err).splitlines()[0]}")
    yield cluster
    cluster.stop()


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

    (saved,) = (sweep / "0" / "checkpoints").glob("requeue-step*.ckpt")
    step = torch.load(saved, weights_only=True)["global_step"]
    assert 0 < step < 120
    states = slurm.run("sacct", "-D", "-X", "-n", "-j", job, "-o", "State").stdout.split()
    assert states[0] == "REQUEUED"
    assert f"Restored all states from the checkpoint at {saved}" in log.read_text()
    final = torch.load(sweep / "0" / "checkpoints" / "last.ckpt", weights_only=True)
    # It went on from that step (mid-epoch: the resumed epoch trains only the batches it had left) and
    # finished all 30 epochs of 4 steps.
    assert final["epoch"] == 29 and final["global_step"] == 120
