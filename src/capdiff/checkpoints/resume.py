"""Resuming and starting from checkpoints: where a run resumes (`ckpt_path`), weights for a new run
(`init_from`), the parts a resumed run takes from its checkpoint, and the repair of Lightning's loop counters
in checkpoints of resumed runs."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from omegaconf import DictConfig

from capdiff.artifacts import DerivedParts, derives_autoencoder, derives_tokenizer, joint_config
from capdiff.checkpoints.portable import (
    PARTS_KEY,
    is_sharded_checkpoint,
    read_checkpoint,
    upgrade_checkpoint,
    write_autoencoder,
    write_files,
)

log = logging.getLogger(__name__)


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
        if path.is_dir() and not is_sharded_checkpoint(path):  # a run folder or its checkpoints/
            path = newest_checkpoint(path) or newest_checkpoint(path.parent) or path / "last.ckpt"
    if not path.exists() or (path.is_dir() and not path.name.endswith(".ckpt")):
        raise FileNotFoundError(
            f"ckpt_path={ckpt_path!r}: no checkpoint at {path}. Pass a .ckpt file, a run folder, or `last` "
            "together with hydra.run.dir=<the run folder to continue> (`auto` starts fresh when there is none)."
        )
    return str(path)


def weight_mismatch(own: dict[str, Any], state: dict[str, Any]) -> str | None:
    """How a checkpoint's weights differ from a model's (its keys and shapes), or None when they fit."""
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    reshaped = [
        f"{k} {tuple(state[k].shape)} → {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    if not (missing or unexpected or reshaped):
        return None
    hint = ""
    if missing and all(".conditioner.lexical." in k for k in missing):
        hint = "; it predates the lexical table: add model.conditioner.lexical=false"
    return (
        f"the checkpoint does not match this model (missing {len(missing)} keys, e.g. {missing[:3]}; unexpected "
        f"{len(unexpected)}, e.g. {unexpected[:3]}; other shapes {len(reshaped)}, e.g. {reshaped[:3]}){hint}"
    )


def load_weights(model: pl.LightningModule, init_from: str) -> None:
    """`init_from=<file>`: start from a checkpoint's weights, with fresh optimizer, schedule and step count."""
    path = Path(init_from)
    if not (path.is_file() or is_sharded_checkpoint(path)):
        raise FileNotFoundError(f"init_from={init_from!r}: no such checkpoint file.")
    checkpoint = read_checkpoint(path)
    state = upgrade_checkpoint(checkpoint)["state_dict"] if "state_dict" in checkpoint else checkpoint
    problem = weight_mismatch(model.state_dict(), state)
    if problem:
        raise ValueError(
            f"init_from={init_from}: {problem}. Build the model with the checkpoint's own `model` config (its run "
            "folder's config.yaml)."
        )
    model.load_state_dict(state)
    log.info("initialised the weights from %s", path)


def check_resumable(model: pl.LightningModule, ckpt_path: str | Path) -> None:
    """`ckpt_path`: the checkpoint's weights fit the model the config builds, checked before any training (the
    strict load inside `Trainer.fit` names the keys, not the cause). The usual cause is a preset default that
    changed since the run started; a checkpoint file is read mapped, so this costs no copy of its weights."""
    checkpoint = upgrade_checkpoint(read_checkpoint(ckpt_path))
    problem = weight_mismatch(model.state_dict(), checkpoint["state_dict"])
    if problem:
        raise ValueError(
            f"ckpt_path={ckpt_path}: {problem}. Resume with the run's own model config (its run folder's config.yaml)."
        )


def repair_epoch_progress(checkpoint: dict[str, Any]) -> None:
    """Puts back the epoch counters of a checkpoint written by a run that was itself resumed from a checkpoint
    of an epoch's last batch (Lightning 2.6 then skips `ready`/`started` for the next epoch, so they lag one
    behind). Lightning reads such a checkpoint as an epoch boundary and trains its epoch again from the start:
    a run killed and resumed a few times ended 4 steps (one epoch) past its plan. Runs before module hooks
    restore the loops (`_restore_modules_and_callbacks`); a consistent checkpoint is left as it is.
    """
    loop = (checkpoint.get("loops") or {}).get("fit_loop") or {}
    epochs, batches = loop.get("epoch_progress"), loop.get("epoch_loop.batch_progress")
    if not epochs or not batches:
        return
    done = batches["current"]
    # saved inside an epoch: after a batch (or a validation in mid-epoch), not after the run's last epoch
    finished = done["completed"] == done["ready"] and batches.get("is_last_batch")
    current = epochs["current"]
    inside_epoch = done["ready"] > 0 and not finished and current["processed"] == current["completed"]
    for counts in (epochs["current"], epochs["total"]):
        # inside an epoch: ready = started = processed + 1; after it (saved at its end): = processed
        expected = counts["processed"] + (1 if inside_epoch else 0)
        if counts["ready"] == counts["started"] == expected - 1:
            counts["ready"] = counts["started"] = expected


def restore_parts(cfg: DictConfig, ckpt_path: str | Path) -> DerivedParts:
    """On resume, the derived parts come from the checkpoint, not from the `data/` caches (which the machine
    that resumes may not have, or may hold for other data): the tokenizer and the first-stage autoencoder are
    written into `<run>/parts/`. Returns where (empty when the model derives nothing or the checkpoint
    carries no parts)."""
    joint, key = joint_config(cfg.model)
    tokenizer, autoencoder = derives_tokenizer(joint), derives_autoencoder(joint)
    if not (tokenizer or autoencoder) or Path(ckpt_path).is_dir():  # a sharded FSDP checkpoint: no parts
        return DerivedParts(key=key)
    checkpoint = read_checkpoint(ckpt_path)
    parts = checkpoint.get(PARTS_KEY)
    if parts is None:
        return DerivedParts(key=key)
    parts = parts.get(key, parts) if key else parts  # the GAN's text side keeps its parts under its key
    folder = Path(cfg.paths.output_dir) / "parts"
    restored = DerivedParts(
        tokenizer=str(write_files(parts["tokenizer"], folder / "tokenizer")) if tokenizer else None,
        autoencoder=(
            str(write_autoencoder(checkpoint, parts["vae"], folder / "autoencoder"))
            if autoencoder and "vae" in parts
            else None
        ),
        key=key,
    )
    log.info("resuming with the tokenizer and first-stage autoencoder the checkpoint carries (%s)", folder)
    return restored


class CheckpointHooks:
    """The checkpoint hooks of every recipe's LightningModule (a mixin before `pl.LightningModule`): on load, an
    older checkpoint in today's layout and Lightning's loop counters repaired; on save, the parts its plain
    model is rebuilt from (`describe`, gathered once: they do not change during a run)."""

    describe: Callable[[Any], dict]
    _parts_record: dict | None = None

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        upgrade_checkpoint(checkpoint)
        repair_epoch_progress(checkpoint)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self._parts_record is None:
            self._parts_record = type(self).describe(self.model)
        checkpoint[PARTS_KEY] = self._parts_record
