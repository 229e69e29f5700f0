"""Helpers for tests: tiny images and tar shards written in tmp_path, a minimal LightningModule, and the
skip-or-fail rule for CI."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
from collections.abc import Iterable
from pathlib import Path
from typing import NoReturn

import pytest
import pytorch_lightning as pl
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def image_bytes(color=(200, 30, 30), size=(40, 24), fmt="PNG", mode="RGB") -> bytes:
    image = Image.new("RGB", size, color)
    if mode != "RGB":
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def write_tar(path: Path, members: Iterable[tuple[str, bytes]]) -> Path:
    """A plain tar of (name, bytes) members in the given order, as any WebDataset writer makes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def good_members(prefix: str, count: int, start: int = 0) -> list[tuple[str, bytes]]:
    members = []
    for i in range(start, start + count):
        key = f"{prefix}{i:05d}"
        members.append((f"{key}.png", image_bytes(color=(i % 256, 80, 160))))
        members.append((f"{key}.txt", f"caption  of\n{key} ".encode()))
    return members


def compose_config(root: Path, overrides: list[str], config: str = "train"):
    """The real config tree, with every path under `root` (no Hydra run needed)."""
    from hydra import compose, initialize_config_dir

    base = [
        f"paths.root_dir={root}",
        f"paths.output_dir={root / 'out'}",
        f"paths.work_dir={root}",
        "extras.print_config=false",
    ]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config, overrides=base + overrides)


def run_entry_point(script: str, root: Path, run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    """`python <script> ...` as a user runs it, with capdiff's data under `root` and the run in `run_dir`."""
    env = os.environ | {"CAPDIFF_ROOT": str(root)}
    command = [sys.executable, script, f"hydra.run.dir={run_dir}", "extras.print_config=false", *overrides]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def skip_or_fail(reason: str) -> NoReturn:
    """Skip a test whose environment is missing (a Slurm cluster, Chromium), saying why; under CI (`CI=true`),
    where .ci/run installs that environment first, fail instead, so a broken install cannot pass as skips."""
    if os.environ.get("CI", "").strip().lower() == "true":
        pytest.fail(
            f"{reason} (CI=true: .ci/run installs what this test needs, so it fails instead of skipping)", pytrace=False
        )
    pytest.skip(reason)


class ScalarModule(pl.LightningModule):
    """The least a LightningModule does to train: one scalar fitted to each batch's mean by SGD (for tests of
    callbacks and loops, where the model does not matter)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))

    def training_step(self, batch, batch_idx):
        return (batch.mean() - self.weight) ** 2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)
