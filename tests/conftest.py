"""Test set-up: offline hubs and W&B, and fixtures with tiny shards in tmp_path."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import good_members, write_tar

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"
os.environ["WANDB_SILENT"] = "true"


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
