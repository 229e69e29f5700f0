"""bench/gpu_check.sh, the script a GPU machine runs first, in its CPU smoke mode: every step runs (the
environment report, bench/gpu.py with the GPU's arguments, which skips without CUDA, FSDP train → resume →
evaluate.py → export, bench/fullsize.py) and the summary and logs land under $OUT."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO

STEPS = ("env", "gpu", "fsdp", "fullsize")


@pytest.mark.slow
def test_the_gpu_check_runs_every_step_in_its_cpu_smoke_mode(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = os.environ | {"OUT": str(out), "GPU_CHECK_WORK": str(tmp_path / "work"), "PYTHON": sys.executable}
    done = subprocess.run(
        ["bash", "bench/gpu_check.sh", "--smoke"], cwd=REPO, env=env, capture_output=True, text=True, timeout=3300
    )
    summary = (out / "summary.txt").read_text()
    logs = {name: (out / f"{name}.log").read_text()[-3000:] for name in STEPS if (out / f"{name}.log").is_file()}
    assert done.returncode == 0, summary + "\n".join(f"--- {k}\n{v}" for k, v in logs.items())
    for name in STEPS:
        assert re.search(rf"^{name}\s+rc=0\s", summary, re.MULTILINE), summary
    assert "exported pipeline captions:" in logs["fsdp"]
    assert "SKIP bench/gpu.py" in logs["gpu"]  # no CUDA here
    assert sorted(p.name for p in out.iterdir()) == sorted(["summary.txt", *(f"{n}.log" for n in STEPS)])
