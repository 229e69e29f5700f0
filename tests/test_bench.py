"""Every benchmark runs in its quick form and prints its ratio lines (GPU ones skip cleanly), so none rots."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.helpers import REPO

RATIOS = {
    "overhead": ["lightning/bare step time"],
    "data_pipeline": ["capdiff 1 worker / raw", "capdiff 2 workers / 1 worker"],
    "latents": ["tiny preset: on-the-fly / cached step time (CPU)"],
    "sampling": ["capdiff/diffusers sampling images/s"],
    "samplers": ["default sampler images/s over DDIM-50"],
    "step": ["step time before / now"],
    "learning_curve": ["caption attribute accuracy at the end / 0.9"],
    "bootstrap": ["bootstrapped / original probe attribute accuracy"],
    "conditioning": ["best connector / MLP generation probe accuracy"],
    "unet_ceiling": ["best oracle-conditioned probe accuracy / default-run goal"],
    "recipes": ["joint / text_gan probe attribute accuracy", "text_gan with / without median"],
    "first_stage": ["worst seed's reconstructed colour / 0.95"],
    "ema": ["capdiff / fastest diffusers update time", "capdiff / diffusers-foreach memory added per update"],
    "fullsize": [
        "train peak RSS / (weights + grads + AdamW + EMA)",
        "resume peak RSS / (weights + grads + AdamW + EMA)",
    ],
}


# sampling runs by default: its bit-for-bit agreement with diffusers' loop is a correctness check. The others
# (~30 s each on CI's machine) run with the slow tests (`make test-slow`, which CI runs).
@pytest.mark.parametrize(
    "name", [name if name == "sampling" else pytest.param(name, marks=pytest.mark.slow) for name in sorted(RATIOS)]
)
def test_benchmark_runs_and_prints_its_ratios(name: str, tmp_path) -> None:
    command = [sys.executable, f"bench/{name}.py", "--quick", "--data-dir", str(tmp_path)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("RATIO ")]
    assert [line.split(" = ")[0].removeprefix("RATIO ") for line in lines] == RATIOS[name]
    assert all(line.rstrip().endswith(("met", "missed")) for line in lines)
    if name == "sampling":  # the comparison only means something when both loops make the same latents
        difference = next(line for line in done.stdout.splitlines() if line.startswith("max |capdiff - diffusers|"))
        assert float(difference.rsplit(" ", 1)[-1]) < 1e-4


def test_the_gpu_benchmark_skips_without_a_gpu() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: bench/gpu.py measures instead of skipping")
    done = subprocess.run([sys.executable, "bench/gpu.py"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.startswith("SKIP bench/gpu.py")
