"""Train capdiff: `python train.py [experiment=<name>] [key=value ...]` (see conf/train.yaml)."""

import os
from pathlib import Path

import hydra
from omegaconf import DictConfig

from capdiff.config import register_resolvers

os.environ.setdefault("CAPDIFF_ROOT", str(Path(__file__).resolve().parent))
register_resolvers()


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from capdiff.slurm import failing_the_step
    from capdiff.train import sweep_value, train

    with failing_the_step():
        return sweep_value(cfg, train(cfg))


if __name__ == "__main__":
    main()
