"""The task function behind `python train.py`: data → derived parts → the recipe's LightningModule → fit."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import hydra
import pytorch_lightning as pl
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf, open_dict
from pytorch_lightning.plugins.environments import SLURMEnvironment

from capdiff.artifacts import DerivedParts, derive_parts, prepare_autoencoder, prepare_latents
from capdiff.checkpoints.io import StreamingCheckpointIO
from capdiff.checkpoints.portable import RunRecord, is_sharded_checkpoint
from capdiff.checkpoints.resume import check_resumable, load_weights, resolve_ckpt_path, restore_parts
from capdiff.config import apply_extras, is_multirun, save_resolved_config
from capdiff.data import ImageTextDataModule
from capdiff.loggers import run_loggers
from capdiff.quiet import quiet_known_warnings
from capdiff.samplers import check_sampler
from capdiff.slurm import Requeue
from capdiff.summary import print_run_summary
from capdiff.training.nonfinite import NonFiniteGuard

log = logging.getLogger(__name__)


def instantiate(node: DictConfig, recursive: bool = True):
    """hydra.utils.instantiate, with a user's config error raised as itself (Hydra wraps every error; the
    original names the key to fix). A model is built with `recursive=False`: its config is handed over as plain
    dicts, and the parts it names by `_target_` (a connector) are the model's to build and check."""
    try:
        return hydra.utils.instantiate(node, _convert_="all", _recursive_=recursive)
    except InstantiationException as err:
        if isinstance(err.__cause__, ValueError | OSError):
            raise err.__cause__ from None
        raise


def instantiate_data(node: DictConfig) -> ImageTextDataModule:
    """The datamodule of a `data` config. Presets set the built-in shapes dataset's own settings
    (`data.shapes`) for when it is the data; with any other data they have no meaning and are left out."""
    if "shapes" in node and not str(node.get("_target_", "")).endswith("ShapesDataModule"):
        node = node.copy()
        with open_dict(node):
            del node["shapes"]
    return instantiate(node)


def build_datamodule(cfg: DictConfig) -> ImageTextDataModule:
    return prepare_datamodule(instantiate_data(cfg.data))


def prepare_datamodule(datamodule: ImageTextDataModule) -> ImageTextDataModule:
    """Write what the data needs (the shapes shards), check the shards and build the streams."""
    datamodule.prepare_data()
    datamodule.setup_streams(0, 1)
    return datamodule


def check_config(cfg: DictConfig) -> None:
    """The checks a run makes before any work, by the recipe's LightningModule (`check_config`): every key is
    known, every pretrained part is found (hub cache, download or folder) and the parts' sizes fit together,
    from their config files alone."""
    hydra.utils.get_class(cfg.model._target_).check_config(OmegaConf.to_container(cfg.model, resolve=True))


def check_samplers(cfg: DictConfig) -> None:
    """Every callback's `sampler` names a sampler that can sample this model, before any work."""
    zero_snr = bool(OmegaConf.select(cfg, "model.diffusion.zero_terminal_snr", default=False))
    for name, node in (cfg.get("callbacks") or {}).items():
        if node and "sampler" in node:
            check_sampler(node.sampler, f"callbacks.{name}.sampler", zero_snr)


def model_config(cfg: DictConfig, derived: DerivedParts) -> DictConfig:
    """The run's `model` config with the derived parts filled in: what builds the model, and what
    `config.yaml` records."""
    return OmegaConf.merge(cfg.model, derived.overrides())


def build_model(cfg: DictConfig, datamodule: ImageTextDataModule, derived: DerivedParts | None = None):
    """Derive what the model needs from the data (tokenizer, first stage), then build the LightningModule."""
    return instantiate(model_config(cfg, derive_parts(cfg, datamodule, derived)), recursive=False)


def check_multirun_strategy(cfg: DictConfig) -> None:
    """Lightning's `strategy=ddp` starts the other ranks by running the same command again; under a local
    `-m` that command is the whole sweep, so every rank would start its own sweep. Refuse it up front."""
    from hydra.core.hydra_config import HydraConfig

    if not is_multirun():
        return
    trainer = cfg.trainer
    strategy = str(trainer.get("strategy") or "")
    devices = trainer.get("devices")
    several = devices not in (None, 1, "1") or int(trainer.get("num_nodes") or 1) > 1
    launcher = str(HydraConfig.get().launcher.get("_target_", ""))
    if strategy.startswith("ddp") and "spawn" not in strategy and several and "submitit" not in launcher:
        raise ValueError(
            f"trainer.strategy={strategy} with trainer.devices={devices} under a local multirun (-m): the extra "
            "DDP ranks would each re-run the whole sweep. Submit the sweep with hydra/launcher=slurm (one job "
            "per point, its ranks started by Slurm), run the points one by one without -m, or use "
            "trainer.strategy=ddp_spawn for a local sweep."
        )


def sweep_value(cfg: DictConfig, metrics: dict[str, float]) -> float | None:
    """The value a sweeper optimizes: `metrics[optimized_metric]`, or None when no metric is named."""
    name = cfg.get("optimized_metric")
    if not name:
        return None
    if name not in metrics:
        raise KeyError(f"optimized_metric={name} is not among this run's final metrics: {sorted(metrics)}.")
    return metrics[name]


class LastValidation(pl.Callback):
    """The optimizer step of the last validation pass (the sanity check's part-pass is not one)."""

    def __init__(self) -> None:
        self.step: int | None = None

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.step = trainer.global_step


def train(cfg: DictConfig, extra_callbacks: list[pl.Callback] | None = None) -> dict[str, float]:
    """Returns the run's final metrics (`trainer.callback_metrics`)."""
    quiet_known_warnings()
    check_multirun_strategy(cfg)
    apply_extras(cfg)
    pl.seed_everything(cfg.seed, workers=True)
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), cfg.paths.output_dir)
    if cfg.get("init_from") and cfg.get("ckpt_path"):
        raise ValueError(
            "init_from and ckpt_path are both set: ckpt_path resumes a run (weights, optimizer, step), init_from "
            "only loads weights into a new run. Give one of them."
        )
    if cfg.get("init_from") and not (Path(cfg.init_from).is_file() or is_sharded_checkpoint(cfg.init_from)):
        raise FileNotFoundError(f"init_from={cfg.init_from!r}: no such checkpoint file (give a .ckpt train.py wrote).")
    if not cfg.data.get("_target_"):
        raise ValueError(
            "data=from_checkpoint is evaluate.py's default (a checkpoint's own data): train with data=synthetic "
            "(the built-in shapes) or data=webdataset data.train_urls=<shards>."
        )
    datamodule = instantiate_data(cfg.data)  # checks the data.* values; nothing is read or written yet
    if not datamodule.train_urls:
        raise ValueError(
            "data.train_urls is not set: give the training shards, e.g. \"data.train_urls='/data/{000..099}.tar'\" "
            "(Hydra's quotes inside the shell's), or a weighted mixture in data.sources."
        )
    record = RunRecord(cfg)  # the run's config as given, before the derived parts are filled in
    check_samplers(cfg)
    if cfg.get("stage") != "autoencoder":
        check_config(cfg)
    datamodule = prepare_datamodule(datamodule)
    if cfg.get("stage") == "autoencoder":
        folder = prepare_autoencoder(cfg, datamodule, force=True)
        save_resolved_config(OmegaConf.merge(cfg, {"model": DerivedParts(autoencoder=str(folder)).overrides()}),
                             cfg.paths.output_dir)  # fmt: skip
        report = json.loads((folder / "capdiff_first_stage.json").read_text())
        return {"autoencoder/val_rec_loss": report["val_rec_loss"]}
    # The tokenizer and first-stage autoencoder the weights were trained with come from the checkpoint, whether
    # the run resumes it or starts from its weights on other data (whose captions would build another tokenizer).
    weights_from = ckpt_path if ckpt_path is not None else cfg.get("init_from")
    derived = derive_parts(cfg, datamodule, restore_parts(cfg, weights_from) if weights_from else None)
    used = cfg.copy()
    with open_dict(used):
        used.model = model_config(cfg, derived)
    model = instantiate(used.model, recursive=False)
    if cfg.get("init_from") and ckpt_path is None:
        load_weights(model, cfg.init_from)
    elif ckpt_path is not None and not is_sharded_checkpoint(ckpt_path):  # a folder would be gathered whole
        check_resumable(model, ckpt_path)
    save_resolved_config(used, cfg.paths.output_dir)
    callbacks = [hydra.utils.instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c]
    validated = LastValidation()
    callbacks += [record, validated]
    if not any(isinstance(c, NonFiniteGuard) for c in callbacks):  # a NaN step never reaches the weights
        callbacks.append(NonFiniteGuard())
    diffusion = getattr(model.model, "diffusion", None)  # recipes without a latent UNet have no latent cache
    if datamodule.latents and diffusion is not None:
        # None: the shards are cached ones already
        cache = prepare_latents(cfg, datamodule, diffusion.vae, str(used.model.vae.name_or_path))
        callbacks += [cache] if cache else []
    callbacks += extra_callbacks or []
    plugins: list = [StreamingCheckpointIO()]
    # A job whose tasks Slurm started (not an interactive allocation): capdiff's Requeue owns the pre-timeout
    # signal, not Lightning's auto-requeue.
    if SLURMEnvironment.detect():
        callbacks.append(Requeue())
        plugins.append(SLURMEnvironment(auto_requeue=False))
    with run_loggers(cfg) as loggers:
        trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=plugins)
        with warnings.catch_warnings():
            # The datamodule resumes its train stream mid-epoch itself (ImageTextDataModule.state_dict); this
            # warning of Lightning's looks only for a `state_dict` on the loader.
            warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch")
            # The frozen parts (VAE, a frozen CLIP tower or LLM) are in eval mode on purpose (JointModel.train).
            warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")
            trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        if cfg.get("optimized_metric") and validated.step != trainer.global_step and not trainer.interrupted:
            # A run that stops at trainer.max_steps mid-epoch has not validated its final weights: the value a
            # sweeper gets would be an earlier epoch's, or missing. Validate once more.
            log.info("validating the final weights (step %d) for optimized_metric", trainer.global_step)
            trainer.validate(model, datamodule=datamodule, verbose=False)
            metrics |= {k: float(v) for k, v in trainer.callback_metrics.items()}
    if trainer.is_global_zero:
        (Path(cfg.paths.output_dir) / "metrics.json").write_text(json.dumps(metrics, indent=1, sort_keys=True))
        log.info("run folder: %s", cfg.paths.output_dir)
    print_run_summary(cfg, trainer, metrics)
    return metrics
