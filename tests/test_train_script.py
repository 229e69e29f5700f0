"""`python train.py` with a bad config fails before any work starts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.helpers import REPO


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


def test_a_bad_config_fails_before_any_work_with_the_key_named(tmp_path: Path) -> None:
    done = run_train(tmp_path, "data=webdataset")
    assert done.returncode != 0
    assert "data.train_urls is not set" in done.stderr
    done = run_train(tmp_path, "data.caption_key=txt.words")
    assert done.returncode != 0
    assert "only the json member has fields" in done.stderr
    assert not (tmp_path / "data").exists()  # nothing was written
