"""The task function behind `python evaluate.py`."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from capdiff.config import apply_extras


def check_checkpoint(cfg: DictConfig) -> Path:
    if cfg.get("ckpt_path") is None:
        raise ValueError("ckpt_path is not set: run `python evaluate.py ckpt_path=<run>/checkpoints/last.ckpt`.")
    path = Path(cfg.ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(f"ckpt_path={cfg.ckpt_path!r} does not exist; pass a checkpoint file.")
    return path


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Evaluate a trained checkpoint. The joint model and its metrics are not part of capdiff yet."""
    apply_extras(cfg)
    path = check_checkpoint(cfg)
    raise NotImplementedError(
        f"{path}: capdiff cannot evaluate checkpoints yet; the joint model and its metrics come next."
    )
