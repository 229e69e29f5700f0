"""Weights & Biases for capdiff runs: offline without a key, one W&B run per run folder (resumed and requeued
jobs continue it), grouped by experiment or sweep, the resolved config attached."""

from __future__ import annotations

import logging
import netrc
import os
import secrets
import string
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.utilities import rank_zero_only

log = logging.getLogger(__name__)

RUN_ID_FILE = "wandb_run_id.txt"


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
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return default
    hydra = HydraConfig.get()
    if hydra.mode == RunMode.MULTIRUN:
        return f"{default}-{Path(hydra.sweep.dir).name}"
    return default


def run_id(save_dir: Path) -> str:
    """The W&B run id of this run folder: made once, then read back by every resumed or requeued job."""
    path = save_dir / RUN_ID_FILE
    if path.is_file():
        return path.read_text().strip()
    new = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))  # W&B's id alphabet
    if rank_zero_only.rank == 0:
        save_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(new + "\n")
    return new


def wandb_logger(
    save_dir: str,
    project: str = "capdiff",
    entity: str | None = None,
    name: str | None = None,
    group: str | None = None,
    job_type: str = "train",
    tags: list[str] | None = None,
    offline: bool | None = None,
    log_model: bool = False,
) -> WandbLogger:
    """A `WandbLogger` that never stops a training run for want of W&B.

    `offline: null` picks offline mode when there is no API key (one notice line; `wandb sync` uploads the run
    later) and online otherwise; if W&B cannot be reached online, the run goes on offline with a warning.
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
    kwargs = {
        "save_dir": str(folder),
        "project": project,
        "entity": entity,
        "name": name or folder.name,
        "group": sweep_group(group or project),
        "job_type": job_type,
        "tags": list(tags or []),
        "log_model": log_model,
        "id": run_id(folder),
        "resume": "allow",
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


@contextmanager
def run_loggers(cfg) -> Iterator[list]:
    """The `logger` group's loggers for one run (W&B ones get the whole resolved config), finished when the run
    ends, on success and on error alike."""
    import hydra
    from omegaconf import OmegaConf

    loggers = [hydra.utils.instantiate(c) for c in (cfg.get("logger") or {}).values() if c]
    try:
        for logger in loggers:
            if isinstance(logger, WandbLogger):
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
