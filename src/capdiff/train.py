"""The task function behind `python train.py`."""

from __future__ import annotations

import logging

import hydra
import pytorch_lightning as pl
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from capdiff.config import apply_extras, save_resolved_config
from capdiff.data import ImageTextDataModule
from capdiff.data.throughput import stream

log = logging.getLogger(__name__)


def build_datamodule(cfg: DictConfig) -> ImageTextDataModule:
    datamodule = hydra.utils.instantiate(cfg.data, _convert_="all")
    datamodule.prepare_data()
    return datamodule


def train(cfg: DictConfig) -> dict[str, float]:
    """Compose → data → (model, arriving with the joint module) → report. Returns the run's metrics."""
    apply_extras(cfg)
    pl.seed_everything(cfg.seed, workers=True)
    save_resolved_config(cfg, cfg.paths.output_dir)
    datamodule = build_datamodule(cfg)
    datamodule.setup("fit")
    console = Console()
    metrics = stream(datamodule, console)
    table = Table("metric", "value", title="data stream")
    for name, value in metrics.items():
        table.add_row(name, f"{value:,.1f}")
    console.print(table)
    if datamodule.skipped:
        console.print(f"skipped samples by reason: {dict(datamodule.skipped)}")
    log.info("run folder: %s", cfg.paths.output_dir)
    return metrics
