"""The task function behind `python train.py`: data → derived artefacts → JointModule → Trainer.fit."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
import pytorch_lightning as pl
from hydra.errors import InstantiationException
from omegaconf import DictConfig

from capdiff.config import apply_extras, save_resolved_config
from capdiff.data import ImageTextDataModule
from capdiff.stages import prepare_autoencoder, prepare_latents, prepare_tokenizer

log = logging.getLogger(__name__)


def instantiate(node: DictConfig):
    """hydra.utils.instantiate, with a user's config error raised as itself (Hydra wraps every error; the
    original names the key to fix)."""
    try:
        return hydra.utils.instantiate(node, _convert_="all")
    except InstantiationException as err:
        if isinstance(err.__cause__, ValueError | OSError):
            raise err.__cause__ from None
        raise


def build_datamodule(cfg: DictConfig) -> ImageTextDataModule:
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup_streams(0, 1)
    return datamodule


def build_model(cfg: DictConfig, datamodule: ImageTextDataModule):
    """Derive what the model needs from the data (tokenizer, first stage), then build the JointModule."""
    prepare_tokenizer(cfg, datamodule)
    if cfg.model.loss.weights.get("diffusion"):
        prepare_autoencoder(cfg, datamodule)
    model = instantiate(cfg.model)
    if datamodule.latents and model.diffusion is not None:
        prepare_latents(cfg, datamodule, model.diffusion.vae)
    return model


def resolve_ckpt_path(ckpt_path: str | None, output_dir: str) -> str | None:
    """`last` → this run folder's `checkpoints/last.ckpt`; a run folder → its `last.ckpt`; a file as is."""
    if ckpt_path is None:
        return None
    path = Path(output_dir) / "checkpoints" / "last.ckpt" if ckpt_path == "last" else Path(ckpt_path)
    if path.is_dir():
        path = path / "checkpoints" / "last.ckpt" if (path / "checkpoints").is_dir() else path / "last.ckpt"
    if not path.is_file():
        raise FileNotFoundError(
            f"ckpt_path={ckpt_path!r}: no checkpoint at {path}. Pass a .ckpt file, a run folder, or `last` "
            "together with hydra.run.dir=<the run folder to continue>."
        )
    return str(path)


def train(cfg: DictConfig, extra_callbacks: list[pl.Callback] | None = None) -> dict[str, float]:
    """Returns the run's final metrics (`trainer.callback_metrics`)."""
    apply_extras(cfg)
    pl.seed_everything(cfg.seed, workers=True)
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), cfg.paths.output_dir)
    datamodule = build_datamodule(cfg)
    if cfg.get("stage") == "autoencoder":
        folder = prepare_autoencoder(cfg, datamodule, force=True)
        save_resolved_config(cfg, cfg.paths.output_dir)
        report = json.loads((folder / "capdiff_first_stage.json").read_text())
        return {"autoencoder/val_rec_loss": report["val_rec_loss"]}
    model = build_model(cfg, datamodule)
    save_resolved_config(cfg, cfg.paths.output_dir)
    callbacks = [hydra.utils.instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c]
    callbacks += extra_callbacks or []
    loggers = [hydra.utils.instantiate(c) for c in (cfg.get("logger") or {}).values()]
    trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    finally:
        for logger in loggers:
            if isinstance(logger, pl.loggers.WandbLogger):
                logger.experiment.finish()
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if trainer.is_global_zero:
        (Path(cfg.paths.output_dir) / "metrics.json").write_text(json.dumps(metrics, indent=1, sort_keys=True))
        log.info("run folder: %s", cfg.paths.output_dir)
    return metrics
