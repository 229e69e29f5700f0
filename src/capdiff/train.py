"""The task function behind `python train.py`: data → derived artefacts → JointModule → Trainer.fit."""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path

import hydra
import pytorch_lightning as pl
import torch
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf, open_dict
from pytorch_lightning.plugins.environments import SLURMEnvironment

from capdiff.checkpoints import StreamingCheckpointIO
from capdiff.config import apply_extras, is_multirun, save_resolved_config
from capdiff.data import ImageTextDataModule
from capdiff.loggers import run_loggers
from capdiff.models.compatibility import check_parts
from capdiff.portable import RunRecord, restore_parts
from capdiff.quiet import quiet_known_warnings
from capdiff.slurm import Requeue
from capdiff.stages import prepare_autoencoder, prepare_latents, prepare_tokenizer
from capdiff.summary import print_run_summary

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
    """The checks a run makes before any work: every pretrained part is found (hub cache, download or folder)
    and the parts' sizes fit together, from their config files alone."""
    check_parts(OmegaConf.to_container(cfg.model, resolve=True), int(cfg.data.image_size))


def build_model(cfg: DictConfig, datamodule: ImageTextDataModule):
    """Derive what the model needs from the data (tokenizer, first stage), then build the JointModule."""
    prepare_tokenizer(cfg, datamodule)
    if cfg.model.loss.weights.get("diffusion"):
        prepare_autoencoder(cfg, datamodule)
    return instantiate(cfg.model)


def newest_checkpoint(output_dir: str | Path) -> Path | None:
    """The most recently written `.ckpt` of a run folder (`last.ckpt` unless a later one exists); a sharded
    FSDP checkpoint is a folder named `.ckpt`."""
    folder = Path(output_dir) / "checkpoints"
    found = list(folder.glob("*.ckpt")) if folder.is_dir() else []
    return max(found, key=lambda p: (p.stat().st_mtime_ns, p.name == "last.ckpt"), default=None)


def requeued() -> bool:
    """Whether this process is a Slurm job that was requeued (preempted or timed out, then started again)."""
    return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0


def resolve_ckpt_path(ckpt_path: str | None, output_dir: str) -> str | None:
    """Where training resumes from:
    - `last`: the newest checkpoint in this run's folder (`hydra.run.dir=<the run>`); an error if none;
    - `auto`: the same, or a fresh start when the folder has none (what a requeued Slurm job uses);
    - a run folder: its newest checkpoint; a file: itself; null: a fresh start.
    """
    if ckpt_path is None and requeued():
        ckpt_path = "auto"
    if ckpt_path is None:
        return None
    if ckpt_path in ("last", "auto"):
        path = newest_checkpoint(output_dir)
        if path is None and ckpt_path == "auto":
            return None
        path = path or Path(output_dir) / "checkpoints" / "last.ckpt"
    else:
        path = Path(ckpt_path)
        if path.is_dir():
            path = newest_checkpoint(path) or newest_checkpoint(path.parent) or path / "last.ckpt"
    if not path.exists() or (path.is_dir() and not path.name.endswith(".ckpt")):
        raise FileNotFoundError(
            f"ckpt_path={ckpt_path!r}: no checkpoint at {path}. Pass a .ckpt file, a run folder, or `last` "
            "together with hydra.run.dir=<the run folder to continue> (`auto` starts fresh when there is none)."
        )
    return str(path)


def load_weights(model: pl.LightningModule, init_from: str) -> None:
    """`init_from=<file>`: start from a checkpoint's weights, with fresh optimizer, schedule and step count."""
    path = Path(init_from)
    if not path.is_file():
        raise FileNotFoundError(f"init_from={init_from!r}: no such checkpoint file.")
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    state = state.get("state_dict", state)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    reshaped = [
        f"{k} {tuple(state[k].shape)} → {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or reshaped:
        raise ValueError(
            f"init_from={init_from}: the checkpoint does not match this model (missing {len(missing)} keys, e.g. "
            f"{missing[:3]}; unexpected {len(unexpected)}, e.g. {unexpected[:3]}; other shapes {len(reshaped)}, "
            f"e.g. {reshaped[:3]}). Build the model with the checkpoint's own `model` config (its run folder's "
            "config.yaml)."
        )
    model.load_state_dict(state)
    log.info("initialised the weights from %s", path)


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
    if not cfg.data.get("_target_"):
        raise ValueError(
            "data=from_checkpoint is evaluate.py's default (a checkpoint's own data): train with data=synthetic "
            "(the built-in shapes) or data=webdataset data.train_urls=<shards>."
        )
    datamodule = instantiate_data(cfg.data)  # checks the data.* values; nothing is read or written yet
    if not datamodule.train_urls:
        raise ValueError(
            "data.train_urls is not set: give the training shards, e.g. data.train_urls='/data/{000..099}.tar'."
        )
    record = RunRecord(cfg)  # the run's config as given, before the derived parts are filled in
    if cfg.get("stage") != "autoencoder":
        check_config(cfg)
    datamodule = prepare_datamodule(datamodule)
    if cfg.get("stage") == "autoencoder":
        folder = prepare_autoencoder(cfg, datamodule, force=True)
        save_resolved_config(cfg, cfg.paths.output_dir)
        report = json.loads((folder / "capdiff_first_stage.json").read_text())
        return {"autoencoder/val_rec_loss": report["val_rec_loss"]}
    if ckpt_path is not None:
        restore_parts(cfg, ckpt_path)
    model = build_model(cfg, datamodule)
    if cfg.get("init_from") and ckpt_path is None:
        load_weights(model, cfg.init_from)
    save_resolved_config(cfg, cfg.paths.output_dir)
    callbacks = [hydra.utils.instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c]
    callbacks.append(record)
    if datamodule.latents and model.diffusion is not None:
        cache = prepare_latents(cfg, datamodule, model.diffusion.vae)  # None: the shards are cached ones already
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
            # The frozen parts (VAE, a frozen CLIP tower or LLM) are in eval mode on purpose (JointModule.train).
            warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")
            trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if trainer.is_global_zero:
        (Path(cfg.paths.output_dir) / "metrics.json").write_text(json.dumps(metrics, indent=1, sort_keys=True))
        log.info("run folder: %s", cfg.paths.output_dir)
    print_run_summary(cfg, trainer, metrics)
    return metrics
