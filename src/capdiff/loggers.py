"""Weights & Biases for capdiff runs: offline without a key, one W&B run per run folder (resumed and requeued
jobs continue it), grouped by experiment or sweep, sweep jobs named by their overrides, the resolved config
attached, and evaluation runs linked to the training run they evaluate (`wandb_identity`, `link_to_training`)."""

from __future__ import annotations

import logging
import netrc
import os
import secrets
import string
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.utilities import rank_zero_only

from capdiff.config import command_line_overrides, is_multirun

log = logging.getLogger(__name__)

RUN_ID_FILE = "wandb_run_id.txt"
DEFAULT_PROJECT = "capdiff"  # conf/logger/wandb.yaml's project
# Overrides that say where a sweep job runs, not what it trains: left out of its W&B run name.
NOISY_OVERRIDES = ("hydra", "paths", "extras", "ckpt_path", "init_from")


def has_api_key() -> bool:
    """A key in WANDB_API_KEY or from `wandb login` (~/.netrc)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def sweep_group(default: str) -> str:
    """In a Hydra multirun, `<task>-<sweep folder>`, so a sweep's jobs share a group; else `default`."""
    from hydra.core.hydra_config import HydraConfig

    if is_multirun():
        return f"{default}-{Path(HydraConfig.get().sweep.dir).name}"
    return default


def _swept_keys(hydra) -> set[str]:
    """The keys a sweep varies: the sweeper's `params` (e.g. an Optuna search space), and the command-line
    overrides written with sweep syntax (`a=1,2`, `range(...)`, `choice(...)`) in the sweep's multirun.yaml.
    Empty when neither can be read (a launcher whose jobs cannot see the sweep folder)."""
    from omegaconf import OmegaConf

    keys = set((hydra.sweeper.get("params") or {}).keys())
    saved = Path(hydra.sweep.dir) / "multirun.yaml"
    if saved.is_file():
        task = OmegaConf.select(OmegaConf.load(saved), "hydra.overrides.task") or []
        keys |= {o.key_or_group for o in command_line_overrides(list(task)) if o.is_sweep_override()}
    return keys


def sweep_run_name() -> str | None:
    """In a Hydra multirun, the job's overrides as `key=value,key=value`: only the swept keys when the sweep's
    own overrides can be read, else all of them, and never the `NOISY_OVERRIDES`. None outside a multirun."""
    if not is_multirun():
        return None
    from hydra.core.hydra_config import HydraConfig

    overrides = [
        o for o in command_line_overrides() if o.key_or_group.replace("/", ".").split(".")[0] not in NOISY_OVERRIDES
    ]
    swept = _swept_keys(HydraConfig.get())
    chosen = [o for o in overrides if o.key_or_group in swept] or overrides
    return ",".join(o.input_line.lstrip("+~") for o in chosen) or None


def run_id(save_dir: Path, given: str | None = None) -> str:
    """The W&B run id of this run folder: made once, then read back by every resumed or requeued job. A
    `given` id (`logger.wandb.id`) wins and replaces the kept one, so later resumes continue that run too."""
    path = save_dir / RUN_ID_FILE
    if given:
        if rank_zero_only.rank == 0:
            save_dir.mkdir(parents=True, exist_ok=True)
            path.write_text(f"{given}\n")
        return given
    if path.is_file():
        return path.read_text().strip()
    new = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))  # W&B's id alphabet
    if rank_zero_only.rank == 0:
        save_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(new + "\n")
    return new


def wandb_logger(
    save_dir: str,
    project: str = DEFAULT_PROJECT,
    entity: str | None = None,
    name: str | None = None,
    group: str | None = None,
    job_type: str = "train",
    tags: list[str] | None = None,
    offline: bool | None = None,
    log_model: bool = False,
    id: str | None = None,
    config: dict[str, Any] | None = None,
) -> WandbLogger:
    """A `WandbLogger` that never stops a training run for want of W&B.

    `offline: null` picks offline mode when there is no API key (one notice line; `wandb sync` uploads the run
    later) and online otherwise; if W&B cannot be reached online, the run goes on offline with a warning.
    `name: null` is the run folder's name, or in a multirun the job's overrides (`sweep_run_name`). `id`
    continues that W&B run (and becomes the run folder's id); null keeps one id per run folder. `config` is
    put in the W&B run's config from the start (`link_to_training` puts the training run's id there); a run
    that has a `training_run_id` in it keeps its `group` as given, in a sweep too.
    """
    folder = Path(save_dir)
    mode = os.environ.get("WANDB_MODE")
    if offline is None:
        offline = mode in ("offline", "dryrun") or (mode is None and not has_api_key())
        if offline and mode is None and rank_zero_only.rank == 0:
            log.info(
                "W&B: no API key (WANDB_API_KEY or `wandb login`): logging offline under %s/wandb; upload "
                "with `wandb sync %s/wandb/offline-run-*`",
                folder,
                folder,
            )
    config = _plain(config)
    linked = bool(config.get("training_run_id"))
    kwargs = {
        "save_dir": str(folder),
        "project": project,
        "entity": entity,
        "name": name or sweep_run_name() or folder.name,
        "group": (group or project) if linked else sweep_group(group or project),
        "job_type": job_type,
        "tags": list(tags or []),
        "log_model": log_model,
        "id": run_id(folder, id),
        "resume": "allow",
        "config": config,
    }
    logger = WandbLogger(offline=offline, **kwargs)
    if offline or rank_zero_only.rank != 0:
        return logger
    try:
        logger.experiment  # noqa: B018 — start the run now, where a failure can still fall back
    except Exception as err:  # wandb raises its own errors, OSError and TimeoutError for a missing network
        log.warning("W&B could not start online (%s): logging offline under %s/wandb instead", err, folder)
        import wandb

        wandb.teardown()  # the failed attempt still holds the run id in W&B's service process
        logger = WandbLogger(offline=True, **kwargs)
    return logger


def _plain(config) -> dict:
    """A config node as a plain dict (what wandb.init takes)."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(config, DictConfig):
        return OmegaConf.to_container(config, resolve=True)
    return dict(config or {})


def wandb_identity(loggers: list) -> dict[str, str | None] | None:
    """The W&B identity of a run's first `WandbLogger`: `{"id", "project", "entity", "group", "name"}`, None
    without one. Read from the live W&B run where this rank has started it (W&B fills in the entity), else
    from what the logger starts it with, so every rank gives the same id."""
    logger = next((x for x in loggers if isinstance(x, WandbLogger)), None)
    if logger is None:
        return None
    init = logger._wandb_init
    identity = {key: init.get(key) for key in ("id", "project", "entity", "group", "name")}
    run = logger._experiment
    if run is not None and rank_zero_only.rank == 0 and hasattr(run, "id"):
        identity |= {key: getattr(run, key, None) or identity[key] for key in identity}
    return {key: (str(value) if value else None) for key, value in identity.items()}


def _given_on_command_line(key: str) -> bool:
    return any(o.key_or_group == key for o in command_line_overrides() or [])


def link_to_training(cfg, identity: dict | None) -> None:
    """Make an evaluation's W&B run (`cfg.logger.wandb`) part of the training run it evaluates: the training
    run's group, its project and entity unless this evaluation chose its own (on the command line, or a value
    other than the default), and `training_run_id` / `training_run_name` / `training_run_group` in the W&B
    run's config. Nothing without a `logger.wandb` node or without an identity (a checkpoint trained without
    W&B). A group given on the command line is kept."""
    from omegaconf import OmegaConf, open_dict

    node = OmegaConf.select(cfg, "logger.wandb")
    if node is None or not identity or not identity.get("id"):
        return
    defaults = {"project": DEFAULT_PROJECT, "entity": None}
    with open_dict(node):
        for key, default in defaults.items():
            chosen = _given_on_command_line(f"logger.wandb.{key}") or node.get(key) != default
            if identity.get(key) and not chosen:
                node[key] = identity[key]
        if identity.get("group") and not _given_on_command_line("logger.wandb.group"):
            node.group = identity["group"]
        extra = _plain(node.get("config"))
        extra |= {
            "training_run_id": identity["id"],
            "training_run_name": identity.get("name"),
            "training_run_group": identity.get("group"),
        }
        node.config = extra


@contextmanager
def run_loggers(cfg) -> Iterator[list]:
    """The `logger` group's loggers for one run (W&B ones get the whole resolved config), finished when the run
    ends, on success and on error alike."""
    import hydra
    from omegaconf import OmegaConf

    loggers = [hydra.utils.instantiate(c) for c in (cfg.get("logger") or {}).values() if c]
    try:
        for logger in loggers:
            if isinstance(logger, WandbLogger) and rank_zero_only.rank == 0:  # other ranks hold no W&B run
                logger.experiment.config.update(OmegaConf.to_container(cfg, resolve=True), allow_val_change=True)
        yield loggers
    finally:
        finish_loggers(loggers)


def finish_loggers(loggers: list) -> None:
    """End every W&B run, on success and on error alike, so the next run in this process starts its own."""
    for logger in loggers:
        if isinstance(logger, WandbLogger) and rank_zero_only.rank == 0:
            logger.experiment.finish()


def log_eval_tables(loggers: list, metrics: dict[str, float], samples_dir: Path, limit: int = 64) -> None:
    """Evaluation results as W&B tables: every metric, and the first `limit` samples with their prompts."""
    import json

    import wandb

    for logger in loggers:
        if not isinstance(logger, WandbLogger):
            continue
        logger.log_table("eval/metrics", columns=["metric", "value"], data=[[k, v] for k, v in sorted(metrics.items())])
        index = samples_dir / "index.jsonl"
        if index.is_file():
            rows = [json.loads(line) for line in index.read_text().splitlines()[:limit]]
            data = [
                [r["prompt"], r["seed"], r["guidance_scale"], wandb.Image(str(samples_dir / r["file"]))] for r in rows
            ]
            logger.log_table("eval/samples_table", columns=["prompt", "seed", "guidance_scale", "image"], data=data)
