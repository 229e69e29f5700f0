"""The task function behind `python evaluate.py`: a checkpoint's validation losses on the configured data."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig

from capdiff.config import apply_extras, save_resolved_config
from capdiff.module import JointModule
from capdiff.train import build_datamodule

log = logging.getLogger(__name__)


def check_checkpoint(cfg: DictConfig) -> Path:
    if cfg.get("ckpt_path") is None:
        raise ValueError("ckpt_path is not set: run `python evaluate.py ckpt_path=<run>/checkpoints/last.ckpt`.")
    path = Path(cfg.ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(f"ckpt_path={cfg.ckpt_path!r} does not exist; pass a checkpoint file.")
    return path


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Writes `metrics.json` in the run folder and returns the metrics."""
    apply_extras(cfg)
    path = check_checkpoint(cfg)
    save_resolved_config(cfg, cfg.paths.output_dir)
    datamodule = build_datamodule(cfg)
    if not datamodule.val_urls:
        raise ValueError("data.val_urls is not set: evaluation needs validation shards.")
    model = JointModule.load_from_checkpoint(path, map_location="cpu")
    loggers = [hydra.utils.instantiate(c) for c in (cfg.get("logger") or {}).values()]
    trainer = hydra.utils.instantiate(cfg.trainer, logger=loggers or False, callbacks=[])
    (results,) = trainer.validate(model, datamodule=datamodule)
    metrics = {"checkpoint": str(path)} | {k: float(v) for k, v in results.items()}
    (Path(cfg.paths.output_dir) / "metrics.json").write_text(json.dumps(metrics, indent=1, sort_keys=True))
    log.info("metrics written to %s", Path(cfg.paths.output_dir) / "metrics.json")
    return metrics
