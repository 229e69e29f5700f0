"""`python train.py` as a user runs it: compose, write the shapes shards, stream them, save the config."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from tests.helpers import REPO, good_members, write_tar


def run_train(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = os.environ | {"CAPDIFF_ROOT": str(tmp_path)}
    command = [
        sys.executable,
        "train.py",
        f"hydra.run.dir={tmp_path / 'run'}",
        "extras.print_config=false",
        *overrides,
    ]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_train_streams_the_builtin_data_and_saves_the_resolved_config(tmp_path: Path) -> None:
    done = run_train(tmp_path, "experiment=smoke")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "train/samples_per_s" in done.stdout
    assert len(list((tmp_path / "data" / "shapes-32px-seed0").glob("train-*.tar"))) == 8
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["data"]["batch_size"] == 8
    assert saved["data"]["train_urls"].startswith(str(tmp_path / "data"))  # interpolations resolved
    assert "${" not in (tmp_path / "run" / "config.yaml").read_text()


def test_train_on_user_shards(tmp_path: Path) -> None:
    shards = [write_tar(tmp_path / "mine" / f"{n}.tar", good_members(f"s{n}-", 5)) for n in range(2)]
    urls = str(tmp_path / "mine" / "{0..1}.tar")
    done = run_train(
        tmp_path,
        "data=webdataset",
        f"data.train_urls='{urls}'",
        f"data.val_urls={shards[0]}",
        "data.batch_size=2",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "train/samples" in done.stdout


def test_a_bad_config_fails_before_any_work_with_the_key_named(tmp_path: Path) -> None:
    done = run_train(tmp_path, "data=webdataset")
    assert done.returncode != 0
    assert "data.train_urls is not set" in done.stderr
    done = run_train(tmp_path, "data.caption_key=txt.words")
    assert done.returncode != 0
    assert "only the json member has fields" in done.stderr
    assert not (tmp_path / "data").exists()  # nothing was written
