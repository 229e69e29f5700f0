"""Evaluate a capdiff checkpoint: `python evaluate.py ckpt_path=<file>` (see conf/evaluate.yaml)."""

import os
from pathlib import Path

import hydra
from omegaconf import DictConfig

from capdiff.config import register_resolvers

os.environ.setdefault("CAPDIFF_ROOT", str(Path(__file__).resolve().parent))
register_resolvers()


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> float | None:
    from capdiff.evaluate import evaluate
    from capdiff.slurm import failing_the_step

    with failing_the_step():
        metrics = evaluate(cfg)
    return metrics.get("val/loss")


if __name__ == "__main__":
    main()
