"""Test set-up: offline hubs and W&B, and fixtures with tiny shards in tmp_path."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
# The session's Hugging Face cache, set before any Hugging Face library is imported (they read it once): empty
# until a test asks for `reduced_hub`, which writes the offline hub of capdiff.testing.hub there.
HUB = Path(tempfile.mkdtemp(prefix="capdiff-hub-"))
os.environ["HF_HUB_CACHE"] = str(HUB)
os.environ.pop("HF_HOME", None)

os.environ["WANDB_MODE"] = "offline"
os.environ["WANDB_SILENT"] = "true"

from tests.helpers import good_members, write_tar  # noqa: E402  (after the environment it must not precede)


@pytest.fixture
def shard_dir(tmp_path: Path) -> Path:
    return tmp_path / "shards"


@pytest.fixture
def uneven_shards(shard_dir: Path) -> list[str]:
    """Eight shards of very different sizes (1 to 30 samples), 80 samples in all."""
    sizes = [1, 3, 7, 20, 2, 9, 8, 30]
    paths, start = [], 0
    for n, size in enumerate(sizes):
        paths.append(str(write_tar(shard_dir / f"train-{n:03d}.tar", good_members("s", size, start))))
        start += size
    return paths


@pytest.fixture(scope="session")
def reduced_hub() -> Path:
    """gpt2, openai/clip-vit-base-patch16, stabilityai/sd-vae-ft-mse and SD-1.5, reduced in width, resolvable
    by their hub ids (HF_HUB_OFFLINE=1) for the whole session."""
    from capdiff.testing.hub import write_hub

    if not (HUB / "models--gpt2").is_dir():
        write_hub(HUB, "reduced")
    return HUB


@pytest.fixture(scope="session")
def slurm(tmp_path_factory: pytest.TempPathFactory):
    """A one-node Slurm cluster on localhost for this test session, stopped (by PID) at its end."""
    from tests.helpers import skip_or_fail
    from tests.slurm_cluster import LocalSlurm

    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
    except RuntimeError as err:
        skip_or_fail(f"Slurm cannot start here: {str(err).splitlines()[0]}")
    yield cluster
    cluster.stop()


def pytest_sessionfinish(session, exitstatus) -> None:
    shutil.rmtree(HUB, ignore_errors=True)


@pytest.fixture(scope="session")
def smoke_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data folder with the smoke experiment's shapes, tokenizer and first-stage autoencoder, made once."""
    from capdiff.artifacts import derive_parts
    from capdiff.train import build_datamodule
    from tests.helpers import compose_config

    root = tmp_path_factory.mktemp("smoke")
    cfg = compose_config(root, ["experiment=smoke"])
    datamodule = build_datamodule(cfg)
    derive_parts(cfg, datamodule)
    return root


@pytest.fixture
def smoke_cfg(smoke_root: Path, tmp_path: Path):
    """Compose `experiment=smoke` (+ overrides) over the shared smoke data, with outputs in tmp_path."""
    from tests.helpers import compose_config

    def make(*overrides: str):
        cfg = compose_config(smoke_root, ["experiment=smoke", f"paths.output_dir={tmp_path / 'run'}", *overrides])
        return cfg

    return make


@pytest.fixture(scope="session")
def trained_checkpoint(smoke_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`last.ckpt` of the smoke experiment trained for 2 epochs, once for the session (Pipeline, CLI, demo)."""
    from capdiff.train import train
    from tests.helpers import compose_config

    out = tmp_path_factory.mktemp("trained")
    train(compose_config(smoke_root, ["experiment=smoke", f"paths.output_dir={out}", "trainer.max_epochs=2"]))
    return out / "checkpoints" / "last.ckpt"
