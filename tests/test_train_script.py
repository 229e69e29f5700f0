"""`python train.py` with a bad config fails before any work starts."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.helpers import run_entry_point


def run_train(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    return run_entry_point("train.py", tmp_path, tmp_path / "run", *overrides)


def test_a_bad_config_fails_before_any_work_with_the_key_named(tmp_path: Path) -> None:
    done = run_train(tmp_path, "data=webdataset")
    assert done.returncode != 0
    assert "data.train_urls is not set" in done.stderr
    done = run_train(tmp_path, "data.caption_key=txt.words")
    assert done.returncode != 0
    assert "only the json member has fields" in done.stderr
    assert not (tmp_path / "data").exists()  # nothing was written
